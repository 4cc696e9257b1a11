"""Checkpoints that survive a kill at any moment, and resume to exactly the same θ.

A checkpoint holds θ, the outer optimizer and scheduler states, the iteration and step counters,
the global torch/NumPy/Python random states, every env's task-sampler state, the best validation
result, the training history and the run's configuration. It is written to a temporary file in the
same folder, flushed to disk and renamed over the old one, so a kill during a write leaves the last
good checkpoint intact.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bilevel_maml.distributed import is_main_process

FORMAT_VERSION = 1


def atomic_save(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path


def save_checkpoint(path, engine, config: dict | None = None) -> Path:
    """Under torch.distributed every rank must call this (the state gathers every rank's task
    stream); rank 0 writes the file."""
    state = engine.state_dict()
    if is_main_process():
        atomic_save({"format": FORMAT_VERSION, "config": config or {}, "engine": state}, path)
    return Path(path)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a bilevel_maml checkpoint of format {FORMAT_VERSION}")
    return checkpoint


class Checkpointer:
    """Engine callback: ``last.pt`` every ``every`` meta-iterations and at the end, ``best.pt``
    whenever validation improves."""

    def __init__(self, folder, every: int, config: dict | None = None):
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 meta-iteration, got {every}")
        self.folder = Path(folder)
        self.every = every
        self.config = config or {}
        # A resumed run keeps the best checkpoint its earlier part found.
        self.last = self.folder / "last.pt" if (self.folder / "last.pt").exists() else None
        self.best = self.folder / "best.pt" if (self.folder / "best.pt").exists() else None

    def on_iteration_end(self, engine, metrics):
        if engine.meta_iteration % self.every == 0:
            self.last = save_checkpoint(self.folder / "last.pt", engine, self.config)

    def on_validation_end(self, engine, stats, improved):
        if improved:
            self.best = save_checkpoint(self.folder / "best.pt", engine, self.config)

    def on_train_end(self, engine):
        self.last = save_checkpoint(self.folder / "last.pt", engine, self.config)
