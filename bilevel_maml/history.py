"""A run's metrics as plain JSON lines (``metrics.jsonl`` in the run folder), readable with no W&B.

W&B keeps the same numbers, but only when it runs; this file is written whatever ``--wandb`` says,
and :mod:`bilevel_maml.plots` draws the learning curves from it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bilevel_maml.callbacks import Callback

METRICS_FILE = "metrics.jsonl"
#: keys of a run's config.json that say where and how it ran (its folder, device, W&B, progress,
#: processes), not what it computed: two runs that differ only in these are the same run
RUN_PLACEMENT_KEYS = frozenset({"output", "device", "progress", "dist_timeout", "world_size", "plugins",
                                "plugin_folders",
                                "resume_if_exists", "wandb_id", "wandb", "wandb_project", "run_name", "group", "tags"})


def plain_json(value):
    """``value`` with tensors as numbers and every non-finite float as None, in nested dicts and
    lists too: JSON has no NaN or infinity (Python writes them, strict parsers refuse them), and a
    missing point is drawn as a gap. One task gives no confidence interval, for instance.

    :param value: a number, tensor, string, or a dict/list/tuple of them.
    """
    if isinstance(value, dict):
        return {key: plain_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(item) for item in value]
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsFile(Callback):
    """Engine callback: one JSON line per meta-iteration (``{"step": i, "train/loss": ...,
    "validation/accuracy": ...}``) and one for the final test (``test/*`` at the last step).

    A resumed run first drops the lines past the iteration its checkpoint holds, so the iterations
    it redoes are not written twice.

    :param path: the file (a run folder's ``metrics.jsonl``); its folder is created if missing.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, row: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(plain_json(row)) + "\n")

    def on_train_start(self, engine):
        if self.path.exists():
            kept = [row for row in read_metrics(self.path) if row["step"] <= engine.meta_iteration]
            partial = self.path.with_name(f".{self.path.name}.partial")
            partial.write_text("".join(json.dumps(row) + "\n" for row in kept))
            partial.replace(self.path)

    def on_iteration_end(self, engine, metrics):
        self._append({"step": engine.meta_iteration, **metrics})

    def on_test_end(self, engine, stats):
        self._append({"step": engine.meta_iteration, **{f"test/{key}": value for key, value in stats.items()}})


def read_metrics(path) -> list[dict]:
    """The rows of a ``metrics.jsonl``, one per step in step order, rows of the same step merged
    (a later value of a key replaces an earlier one). A last line cut short by a kill is skipped.

    :param path: a ``metrics.jsonl`` file.
    """
    rows: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.setdefault(row["step"], {}).update(row)
    return [rows[step] for step in sorted(rows)]


__all__ = ["METRICS_FILE", "MetricsFile", "RUN_PLACEMENT_KEYS", "plain_json", "read_metrics"]
