"""Checkpoints that survive a kill at any moment, damage on disk, and a hostile sender.

A checkpoint holds θ, the outer optimizer and scheduler states, the iteration and step counters,
the global torch/NumPy/Python random states, every env's task-sampler state, the best validation
result, the training history and the run's configuration.

* Every write goes to a temporary file in the same folder, is flushed to disk and renamed over the
  old one, so a kill or a failed write (a full disk) leaves the checkpoints written before intact.
* ``last.pt`` keeps its predecessor as ``previous.pt``; :func:`newest_intact` picks the newest of
  ``last.pt``, ``previous.pt`` and ``best.pt`` that loads, so a damaged file costs at most a few
  meta-iterations, never the run.
* Loading runs no code: ``torch.load(weights_only=True)`` accepts tensors and plain Python values
  only, so a ``best.pt`` someone shared cannot execute anything when evaluated or resumed.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import torch

from bilevel_maml.callbacks import Callback
from bilevel_maml.distributed import is_main_process

FORMAT_VERSION = 1
#: the files :func:`newest_intact` considers, preferred in this order at equal iteration
CHECKPOINT_FILES = ("last.pt", "previous.pt", "best.pt")


class CheckpointError(ValueError):
    """A checkpoint that is damaged, not a bilevel_maml checkpoint, or unsafe to load."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the older ones are intact)."""


def atomic_save(obj, path, keep_previous=None) -> Path:
    """Write ``obj`` to ``path`` atomically; with ``keep_previous``, the file ``path`` held is
    moved there first (also atomically), once the new one is safely on disk."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous is not None and path.exists():
            _keep_copy(path, Path(keep_previous))
        os.replace(partial, path)
    except BaseException as error:  # a full disk, or a second Ctrl-C mid-write: no half file stays behind
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointWriteError(f"could not write {path} ({error.strerror or error}); "
                                       f"the checkpoints written before it are intact") from None
        raise
    return path


def _keep_copy(path: Path, keep: Path) -> None:
    """``keep`` becomes what ``path`` holds while ``path`` stays in place: a reader (or a kill) never
    finds the newest checkpoint missing between the two renames."""
    linked = keep.with_name(f".{keep.name}.{os.getpid()}.partial")
    linked.unlink(missing_ok=True)
    try:
        os.link(path, linked)
    except OSError:  # a file system without hard links
        shutil.copyfile(path, linked)
    os.replace(linked, keep)


def save_checkpoint(path, engine, config: dict | None = None, keep_previous=None) -> Path:
    """Under torch.distributed every rank must call this (the state gathers every rank's task
    stream); rank 0 writes the file.

    Write ``engine``'s full state (θ, optimizer, iteration, RNG and task-stream states) and ``config`` to ``path`` atomically.

    :param path: the file to write.
    :param engine: the :class:`~bilevel_maml.engine.MetaEngine`.
    :param config: the run's configuration, stored beside the state.
    :param keep_previous: if given, the file ``path`` held before is moved here first.
    :returns: ``path``.
    """
    state = engine.state_dict()
    if is_main_process():
        atomic_save({"format": FORMAT_VERSION, "config": config or {}, "engine": state}, path, keep_previous)
    return Path(path)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:  # torch's refusal puts the reason on a line of its own
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.replace("WeightsUnpickler error: ", "")
    return lines[0] if lines else type(error).__name__


def _written_by_torch_save(path: Path) -> bool:
    """Whether the file starts as torch.save's files do (a zip archive, or a legacy pickle's protocol
    opcode); weights_only refuses any other bytes as an "unpickling" error too (a JSON file, say)."""
    with open(path, "rb") as file:
        head = file.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def _what_it_holds(loaded) -> str:
    if isinstance(loaded, dict) and isinstance(loaded.get("format"), int):
        return f"it is of format {loaded['format']} (another version of bilevel_maml wrote it)"
    if isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        names = [str(name) for name in loaded]
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return (f"it holds a state dict of {len(names)} tensors ({shown}) without the run's config; "
                f"a checkpoint is what bilevel-maml train writes in RUN/checkpoints/")
    return f"it holds a {type(loaded).__name__}" + (f" with keys {', '.join(map(str, list(loaded)[:5]))}"
                                                     if isinstance(loaded, dict) and loaded else "")


def load_checkpoint(path) -> dict:
    """Load and check a checkpoint written by :func:`save_checkpoint`; raises
    :class:`CheckpointError` (one line naming the file and what is wrong) for anything else.

    :param path: the checkpoint file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}") from None
    except pickle.UnpicklingError as error:
        if _written_by_torch_save(path):
            raise CheckpointError(f"{path} holds more than tensors and plain values ({_first_line(error)}); "
                                  f"refused: loading it could run code") from None
        raise CheckpointError(f"{path} is damaged or not a checkpoint (not a file torch.save writes: "
                              f"{_first_line(error)})") from None
    except Exception as error:  # torch reports a truncated or garbled file in many ways
        raise CheckpointError(f"{path} is damaged or not a checkpoint "
                              f"({type(error).__name__}: {_first_line(error)})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a bilevel_maml checkpoint of format {FORMAT_VERSION}: "
                              f"{_what_it_holds(checkpoint)}")
    engine = checkpoint.get("engine")
    if not isinstance(engine, dict) or not {"meta_iteration", "theta", "optimizer"} <= engine.keys():
        raise CheckpointError(f"{path} lacks the engine state a bilevel_maml checkpoint holds")
    return checkpoint


def newest_intact(folder) -> tuple[Path, dict, list[str]]:
    """The newest checkpoint in ``folder`` that loads: ``(path, checkpoint, problems)`` where
    ``problems`` says what was wrong with any newer or preferred file that did not.

    :param folder: a run's ``checkpoints/`` folder.
    """
    folder = Path(folder)
    found, problems = [], []
    for preference, name in enumerate(CHECKPOINT_FILES):
        path = folder / name
        if not path.exists():
            continue
        try:
            checkpoint = load_checkpoint(path)
        except (CheckpointError, OSError) as error:
            problems.append(str(error))
            continue
        found.append((checkpoint["engine"]["meta_iteration"], -preference, path, checkpoint))
    if not found:
        detail = "; ".join(problems) if problems else f"none of {', '.join(CHECKPOINT_FILES)} is there"
        raise FileNotFoundError(f"no intact checkpoint in {folder}: {detail}")
    _, _, path, checkpoint = max(found, key=lambda entry: entry[:2])
    return path, checkpoint, problems


class Checkpointer(Callback):
    """Engine callback: ``last.pt`` (keeping the one before as ``previous.pt``) every ``every``
    meta-iterations and at the end, ``best.pt`` whenever validation improves.

    :param folder: where ``last.pt``, ``previous.pt`` and ``best.pt`` go (created if missing).
    :param every: write ``last.pt`` every this many meta-iterations.
    :param config: the run's configuration, stored in every checkpoint (``resume`` rebuilds the run from it).
    """

    def __init__(self, folder, every: int, config: dict | None = None):
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 meta-iteration, got {every}")
        self.folder = Path(folder)
        self.every = every
        self.config = config or {}
        # A resumed run keeps the best checkpoint its earlier part found.
        self.last = self.folder / "last.pt" if (self.folder / "last.pt").exists() else None
        self.best = self.folder / "best.pt" if (self.folder / "best.pt").exists() else None
        self.last_iteration: int | None = None

    def save_last(self, engine) -> None:
        """Write ``last.pt`` now (the one before becomes ``previous.pt``).

        :param engine: the :class:`~bilevel_maml.engine.MetaEngine` to save.
        """
        self.last = save_checkpoint(self.folder / "last.pt", engine, self.config,
                                    keep_previous=self.folder / "previous.pt")
        self.last_iteration = engine.meta_iteration

    def on_iteration_end(self, engine, metrics):
        if engine.meta_iteration % self.every == 0:
            self.save_last(engine)

    def on_validation_end(self, engine, stats, improved):
        if improved:
            self.best = save_checkpoint(self.folder / "best.pt", engine, self.config)

    def on_train_end(self, engine):
        if self.last_iteration != engine.meta_iteration:  # else previous.pt would be a copy of last.pt
            self.save_last(engine)


__all__ = [
    "CHECKPOINT_FILES",
    "Checkpointer",
    "CheckpointError",
    "CheckpointWriteError",
    "save_checkpoint",
    "load_checkpoint",
    "newest_intact",
]
