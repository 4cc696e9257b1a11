"""Task sources: Omniglot from the local official subsets, and sinusoid regression; a dataset of your own for
the command line (:func:`register_dataset`)."""

from bilevel_maml.data.omniglot import (
    CharacterImages,
    DataNotFoundError,
    Tasksets,
    omniglot_small_tasksets,
    task_dataset,
)
from bilevel_maml.data.sinusoid import DeviceSinusoidTasks, SinusoidTasks
from bilevel_maml.data.sources import DatasetSpec, register_dataset

__all__ = [
    "CharacterImages",
    "DatasetSpec",
    "DataNotFoundError",
    "DeviceSinusoidTasks",
    "SinusoidTasks",
    "Tasksets",
    "omniglot_small_tasksets",
    "register_dataset",
    "task_dataset",
]
