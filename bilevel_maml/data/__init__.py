"""Task sources: Omniglot from the local official subsets, and sinusoid regression."""

from bilevel_maml.data.omniglot import (
    CharacterImages,
    DataNotFoundError,
    Tasksets,
    omniglot_small_tasksets,
    task_dataset,
)
from bilevel_maml.data.sinusoid import DeviceSinusoidTasks, SinusoidTasks

__all__ = [
    "CharacterImages",
    "DataNotFoundError",
    "DeviceSinusoidTasks",
    "SinusoidTasks",
    "Tasksets",
    "omniglot_small_tasksets",
    "task_dataset",
]
