"""Weights & Biases logging for :class:`~bilevel_maml.engine.MetaEngine`.

Betty 0.1.1's ``WandBLogger.__init__`` defines an ``init`` function and never calls it, so no run
is ever started and every ``wandb.log`` fails. :class:`WandbLogger` starts the run itself, logs
each step's metrics as one dict, and degrades to a warning when wandb cannot start.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from betty.logging.logger_base import LoggerBase


def _scalar(value):
    return value.item() if hasattr(value, "item") else value


class WandbLogger(LoggerBase):
    """Starts a wandb run and sends each step's metrics as one ``wandb.log`` call.

    Metrics for the same step (say, ``train/*`` and then ``test/*`` at the last iteration) are
    merged and sent when a later step arrives or at :meth:`finish`.

    :param mode: ``"offline"`` (default: writes a local run folder, needs no account),
        ``"online"`` (uses the user's own API key) or ``"disabled"``.
    :param dir: folder under which wandb writes its ``wandb/`` run folders.
    :param id: the W&B run id; a later logger with the same id continues that run
        (``resume="allow"``), as ``bilevel-maml resume`` does.

    :param project: the W&B project.
    :param name: the run's display name.
    :param group: the W&B group.
    :param tags: W&B tags.
    :param config: the run's configuration, shown in W&B.
    """

    MODES = ("offline", "online", "disabled")

    def __init__(self, project: str = "bilevel-maml", name: str | None = None, group: str | None = None,
                 tags=None, config: dict | None = None, mode: str = "offline", dir=None, id: str | None = None):
        if mode not in self.MODES:
            raise ValueError(f"unknown wandb mode {mode!r}; choose one of: {', '.join(self.MODES)}")
        self.run = None
        self._pending_step, self._pending = None, {}
        try:
            import wandb

            # with an id, a resumed training run continues the W&B run its first part started
            resume = {"id": id, "resume": "allow"} if id else {}
            self.run = wandb.init(project=project, name=name, group=group, tags=list(tags or []) or None,
                                  config=config, mode=mode, dir=dir, settings=wandb.Settings(silent=True), **resume)
        except Exception as error:  # wandb must never be the reason a training run dies
            warnings.warn(f"wandb could not start ({error}); going on without W&B logging")

    @property
    def run_dir(self) -> str | None:
        """The run's local folder (``.../wandb/offline-run-*``), if a run started."""
        return os.path.dirname(self.run.dir) if self.run is not None and self.run.dir else None

    def log(self, stats, tag=None, step=None):
        if self.run is None or not stats:
            return
        prefix = f"{tag}/" if tag else ""
        row = {prefix + key: _scalar(value) for key, value in stats.items()}
        if step is None:
            self.flush()
            self.run.log(row)
            return
        if step != self._pending_step:
            self.flush()
            self._pending_step = step
        self._pending.update(row)

    def flush(self):
        if self.run is not None and self._pending:
            self.run.log(self._pending, step=self._pending_step)
        self._pending = {}

    def summarize(self, stats: dict) -> None:
        """Put ``stats`` in the run's summary, outside its history: a score computed after training
        (``bilevel-maml evaluate``), which belongs to no meta-iteration.

        :param stats: names (e.g. ``evaluation/accuracy``) and values (numbers, strings).
        """
        if self.run is not None and stats:
            self.flush()
            self.run.summary.update({key: _scalar(value) for key, value in stats.items()})

    def log_artifact(self, path, name: str, type: str = "model", metadata: dict | None = None):
        """Attach a file (e.g. the best checkpoint) to the run as a versioned artifact.

        :param path: the file.
        :param name: the artifact's name.
        :param type: the artifact's type.
        :param metadata: a dict stored with it (e.g. the validation result).
        """
        if self.run is None:
            return
        import wandb

        artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", name), type=type, metadata=metadata)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self):
        """End the run with its folder complete on disk.

        ``run.finish()`` can return before wandb's writer process has flushed the run's
        transaction log (seen here: a 7-byte file, complete a second later); shutting the wandb
        service down waits for it, so the folder can be read, synced or copied right away.
        """
        if self.run is not None:
            import wandb

            self.flush()
            self.run.finish()
            self.run = None
            wandb.teardown()


_BLOCK = 32768
_HEADER = 7  # ":W&B" ident, 0xBEE1 magic, version byte; every record header is also 7 bytes
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path):
    """Payloads of a wandb transaction log (LevelDB log format: 32 KiB blocks of framed chunks)."""
    import struct

    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file (no ':W&B' header)")
    position, pending = _HEADER, b""
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:
            position += left_in_block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, position)
        chunk = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
        else:  # zero padding at the end of a block
            position += left_in_block - _HEADER - length


def read_offline_run(run_dir) -> dict:
    """Read an offline wandb run back: ``{"run", "config", "history", "summary", "artifacts", "parts"}``.

    A resumed training run, or ``bilevel-maml evaluate``, continues its W&B run (same id), which
    offline wandb writes as one more ``offline-run-<time>-<id>`` folder beside the first; every such
    folder of ``run_dir``'s id is read, in the order written, and merged as ``wandb sync`` merges
    them: ``history`` is one dict per logged step (with ``_step``), in step order, a step logged
    again (the iterations redone after a kill) replacing the earlier row; ``config`` and ``summary``
    hold the last value of every key, as W&B shows them; ``parts`` lists the folders read. Useful
    on machines that never sync.

    :param run_dir: one ``wandb/offline-run-*`` folder of the run.
    """
    run_dir = Path(run_dir)
    run_id = _run_file(run_dir).stem[len("run-"):]

    def written(part: Path) -> tuple[str, int]:
        # offline-run-<start, to the second>-<id>, and -1, -2, ... after it where a part started in another's second
        return part.name.split("-")[2], int(part.name.split(run_id)[-1][1:] or 0)

    parts = sorted((p for p in run_dir.parent.glob(f"offline-run-*-{run_id}*") if (p / f"run-{run_id}.wandb").is_file()),
                   key=written) or [run_dir]
    read = [_read_one_offline_run(part) for part in parts]
    rows: dict = {}
    for part in read:
        for row in part["history"]:
            rows[row.get("_step", len(rows))] = row
    merged = {"run": read[-1]["run"], "config": {}, "summary": {}, "artifacts": [],
              "history": [rows[step] for step in sorted(rows)], "parts": [os.fspath(p) for p in parts]}
    for part in read:
        merged["config"].update(part["config"])
        merged["summary"].update(part["summary"])
        merged["artifacts"] += part["artifacts"]
    return merged


def _run_file(run_dir) -> Path:
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {str(run_dir)!r}; is it a wandb run folder?")
    return files[0]


def _read_one_offline_run(run_dir) -> dict:
    import json

    from wandb.proto import wandb_internal_pb2

    config, history, summary, artifacts, identity = {}, [], {}, [], {}

    def key_of(item):
        return item.key or "/".join(item.nested_key)

    for payload in _records(_run_file(run_dir)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {key_of(i): json.loads(i.value_json) for i in record.history.item}
            history.append(row)
            summary.update({k: v for k, v in row.items() if not k.startswith("_")})
        elif kind == "artifact":
            artifacts.append({"name": record.artifact.name, "type": record.artifact.type,
                              "files": [entry.path for entry in record.artifact.manifest.contents]})
        elif kind == "summary":
            summary.update({key_of(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "run":
            identity = {"id": record.run.run_id, "project": record.run.project, "name": record.run.display_name,
                        "group": record.run.run_group, "tags": list(record.run.tags)}
        if kind in ("config", "run"):
            items = record.config.update if kind == "config" else record.run.config.update
            for item in items:
                value = json.loads(item.value_json)
                config[key_of(item)] = value.get("value", value) if isinstance(value, dict) else value
    config.pop("_wandb", None)
    return {"run": identity, "config": config, "history": history, "summary": summary, "artifacts": artifacts}


__all__ = ["WandbLogger", "read_offline_run"]
