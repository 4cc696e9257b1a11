"""A tqdm progress bar over meta-iterations (loss, accuracy, tasks/s and ETA), and one over the tasks
of each validation and test."""

from __future__ import annotations

import os
import sys

import torch
from tqdm.auto import tqdm

from bilevel_maml.callbacks import Callback


class ProgressBar(Callback):
    """Engine callback: a bar over the meta-iterations and, below it while they run, a passing one
    over the tasks of each validation and test. ``enabled=None`` shows them only when stderr is a
    terminal, so logs of batch jobs and CI stay free of carriage-return noise.

    :param enabled: True shows the bar, False never, None only on a terminal.
    :param file: where to draw it (default: stderr).
    """

    def __init__(self, enabled: bool | None = None, file=None):
        self.file = file if file is not None else sys.stderr
        self.enabled = self.file.isatty() if enabled is None else enabled
        self.bar = self.tasks_bar = None

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.file.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return 0

    def _tqdm(self, **arguments) -> tqdm:
        # Some terminals (serial consoles, `script`) report 0 columns, where tqdm draws nothing.
        sized = self._columns() > 0
        return tqdm(file=self.file, dynamic_ncols=sized, ncols=None if sized else 120, nrows=None if sized else 40,
                    **arguments)

    def on_train_start(self, engine):
        if self.enabled:
            self.bar = self._tqdm(total=engine.meta_iterations, initial=engine.meta_iteration, desc="meta-training",
                                  unit="it")

    def on_tasks_scored(self, engine, split, scored, total):
        if not self.enabled:
            return
        if self.tasks_bar is None:
            self.tasks_bar = self._tqdm(total=total, desc=split, unit="task", leave=False,
                                        position=1 if self.bar is not None else 0)
        if engine.device.type == "cuda":  # the bar shows tasks scored, not tasks queued
            torch.cuda.synchronize(engine.device)
        self.tasks_bar.update(scored - self.tasks_bar.n)
        if scored >= total:
            self.tasks_bar.close()
            self.tasks_bar = None

    def on_iteration_end(self, engine, metrics):
        if self.bar is None:
            return
        shown = {"loss": f"{metrics['train/loss']:.3f}"}
        if "train/accuracy" in metrics:
            shown["acc"] = f"{100 * metrics['train/accuracy']:.1f}%"
        shown["tasks/s"] = f"{metrics['train/tasks_per_second']:.1f}"
        if "validation/accuracy" in metrics:
            shown["val"] = f"{100 * metrics['validation/accuracy']:.1f}%"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def on_train_end(self, engine):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


__all__ = ["ProgressBar"]
