"""Task sources: Omniglot from the local official subsets, and sinusoid regression."""

from bilevel_maml.data.omniglot import (
    CharacterImages,
    DataNotFoundError,
    Tasksets,
    omniglot_small_tasksets,
    task_dataset,
)
from bilevel_maml.data.sinusoid import SinusoidTasks

__all__ = [
    "CharacterImages",
    "DataNotFoundError",
    "SinusoidTasks",
    "Tasksets",
    "omniglot_small_tasksets",
    "task_dataset",
]
