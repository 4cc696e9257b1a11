"""Named task sources for the CLI and examples: each returns tasksets plus the model shape they need."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bilevel_maml.data.benchmarks import BENCHMARKS, benchmark_tasksets
from bilevel_maml.data.omniglot import omniglot_small_tasksets
from bilevel_maml.data.sinusoid import SinusoidTasks


@dataclass(frozen=True)
class DatasetSpec:
    """What the command line needs to know of a dataset.

    :param in_channels: image channels (1 for Omniglot, 3 for the ImageNet-style sets).
    :param image_size: image side in pixels.
    :param model: the default backbone.
    :param inner_lr: the default inner step size.
    :param regression: tasks are regression.
    :param default_root: the default ``--data-root``.
    :param shots: the default support examples per class (per task for regression).
    """
    in_channels: int
    image_size: int
    model: str
    inner_lr: float
    regression: bool = False
    default_root: str | None = None
    shots: int = 1


#: Defaults follow the MAML paper: α = 0.4 on Omniglot, 0.01 on the ImageNet-style sets.
DATASETS: dict[str, DatasetSpec] = {
    "omniglot-small": DatasetSpec(1, 28, "conv4", 0.4, default_root="../shared/data/omniglot-small"),
    "omniglot": DatasetSpec(1, 28, "conv4", 0.4, default_root="~/data"),
    "mini-imagenet": DatasetSpec(3, 84, "conv4", 0.01, default_root="~/data"),
    "tiered-imagenet": DatasetSpec(3, 84, "conv4", 0.01, default_root="~/data"),
    "cifarfs": DatasetSpec(3, 32, "conv4", 0.01, default_root="~/data"),
    "fc100": DatasetSpec(3, 32, "conv4", 0.01, default_root="~/data"),
    "sinusoid": DatasetSpec(1, 0, "mlp", 0.1, regression=True, shots=10),
}


def default_data_root(dataset: str) -> str | None:
    """``$BILEVEL_MAML_DATA/<dataset>`` when that variable is set, else the dataset's default.

    :param dataset: a name of :data:`DATASETS`.
    """
    if os.environ.get("BILEVEL_MAML_DATA") and DATASETS[dataset].default_root:
        return str(Path(os.environ["BILEVEL_MAML_DATA"]) / dataset)
    return DATASETS[dataset].default_root


def load_tasksets(dataset: str, data_root, ways: int, shots: int, query_shots: int, seed: int = 0,
                  download: bool = False, cache_dir=None):
    """Train/validation/test task sources for ``dataset`` with ``shots + query_shots`` examples per
    class (per task, for sinusoid regression).

    :param dataset: a name of :data:`DATASETS`.
    :param data_root: the folder holding its files (None: :func:`default_data_root`).
    :param ways: classes per task.
    :param shots: support examples per class.
    :param query_shots: query examples per class.
    :param seed: seeds the train/validation split of Omniglot's characters.
    :param download: let learn2learn download missing benchmark files.
    :param cache_dir: where decoded Omniglot images are cached.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    samples = shots + query_shots
    if dataset == "sinusoid":
        return SinusoidTasks(points=samples)
    root = data_root if data_root is not None else default_data_root(dataset)
    if dataset == "omniglot-small":
        return omniglot_small_tasksets(root, ways=ways, samples_per_class=samples, seed=seed, cache_dir=cache_dir)
    assert dataset in BENCHMARKS
    # Pixel values of the ImageNet pickles are 0-255 unless learn2learn is asked to scale them.
    extra = {"data_augmentation": "normalize"} if dataset in ("mini-imagenet", "tiered-imagenet") else {}
    return benchmark_tasksets(dataset, root, ways=ways, samples_per_class=samples, download=download, **extra)


__all__ = ["DATASETS", "DatasetSpec", "default_data_root", "load_tasksets"]
