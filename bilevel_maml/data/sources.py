"""Named task sources for the CLI and examples: each returns tasksets plus the model shape they need;
:func:`register_dataset` adds a user's own."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from bilevel_maml._factories import call_with_named_keywords, refuse_taken_name
from bilevel_maml.data.benchmarks import BENCHMARKS, benchmark_tasksets
from bilevel_maml.data.omniglot import omniglot_small_tasksets
from bilevel_maml.data.sinusoid import SinusoidTasks
from bilevel_maml.validation import check_non_negative, check_positive, check_positive_int


@dataclass(frozen=True)
class DatasetSpec:
    """What the command line needs to know of a dataset.

    :param in_channels: image channels (1 for Omniglot, 3 for the ImageNet-style sets), or the
        features of a vector input (sinusoid: 1).
    :param image_size: image side in pixels; 0 for vector inputs.
    :param model: the default backbone.
    :param inner_lr: the default inner step size.
    :param regression: tasks are regression.
    :param default_root: the default ``--data-root``.
    :param shots: the default support examples per class (per task for regression).
    :param load: a registered dataset's loader (see :func:`register_dataset`); None for the built-in ones.
    :param inner_loops: the command line's inner loop for algorithms that want another one than
        MAML's single step of ``inner_lr``, by algorithm name, e.g. ``{"fomaml": {"inner_steps": 5,
        "inner_lr": 0.1}}`` (keys: ``inner_steps``, ``inner_lr`` and iMAML's ``lam``); flags given on
        the command line win.
    """
    in_channels: int
    image_size: int
    model: str
    inner_lr: float
    regression: bool = False
    default_root: str | None = None
    shots: int = 1
    load: Callable | None = None
    inner_loops: Mapping[str, Mapping[str, float]] = field(default_factory=dict, hash=False)

    @property
    def vector_inputs(self) -> bool:
        """Whether an input is a vector (of ``in_channels`` features) rather than an image."""
        return self.image_size == 0

    @property
    def in_features(self) -> int:
        """One input's size, flattened."""
        return self.in_channels if self.vector_inputs else self.in_channels * self.image_size**2


#: On Omniglot (5-way 1-shot omniglot-small, the CLI's other defaults, 200 meta-iterations, 600 test
#: tasks) MAML's one step of 0.4 left FOMAML at 37.6%, iMAML at 28.0%, Reptile at 32.6% and MAML++
#: at 67.4%, and these loops reached 88.0%, 73.3%, 72.9% and 91.2% (MAML: 82.5%): FOMAML's gradient
#: ignores how θ moves φ, iMAML's assumes its proximal problem nearly solved, Reptile's signal
#: needs several steps, and MAML++'s per-step losses and step sizes are made for several (its
#: paper's 5).
OMNIGLOT_INNER_LOOPS = {
    "fomaml": {"inner_steps": 5, "inner_lr": 0.1},
    "imaml": {"inner_steps": 5, "inner_lr": 0.1, "lam": 0.5},
    "reptile": {"inner_steps": 5, "inner_lr": 0.1},
    "maml++": {"inner_steps": 5, "inner_lr": 0.1},
}

#: Defaults follow the MAML paper: α = 0.4 on Omniglot, 0.01 on the ImageNet-style sets.
DATASETS: dict[str, DatasetSpec] = {
    "omniglot-small": DatasetSpec(1, 28, "conv4", 0.4, default_root="../shared/data/omniglot-small",
                                  inner_loops=OMNIGLOT_INNER_LOOPS),
    "omniglot": DatasetSpec(1, 28, "conv4", 0.4, default_root="~/data", inner_loops=OMNIGLOT_INNER_LOOPS),
    "mini-imagenet": DatasetSpec(3, 84, "conv4", 0.01, default_root="~/data"),
    "tiered-imagenet": DatasetSpec(3, 84, "conv4", 0.01, default_root="~/data"),
    "cifarfs": DatasetSpec(3, 32, "conv4", 0.01, default_root="~/data"),
    "fc100": DatasetSpec(3, 32, "conv4", 0.01, default_root="~/data"),
    "sinusoid": DatasetSpec(1, 0, "mlp", 0.1, regression=True, shots=10),
}


#: the datasets this package knows by itself; :func:`register_dataset` adds others to :data:`DATASETS`
BUILT_IN_DATASETS = tuple(DATASETS)


def register_dataset(name: str, load: Callable, spec: DatasetSpec) -> None:
    """Make a task source of your own selectable by name: ``--dataset NAME`` on the command line,
    from a module loaded with ``--plugin`` (which the run's config records, so ``evaluate`` and
    ``resume`` load it again), and :func:`load_tasksets`.

    :param name: the name (case-insensitive). A built-in name is refused, and so is one registered
        with another loader; the same loader defined again (a reloaded module) replaces the old one.
    :param load: returns the train, validation and test task sources in any form
        :func:`~bilevel_maml.build_engine` takes (a mapping with those keys, an object with those
        attributes, or one source for all three). It is called with those of these keywords its
        signature names (all of them if it takes ``**kwargs``): ``data_root`` (``--data-root``, else
        ``spec.default_root``), ``ways``, ``shots``, ``query_shots``, ``samples_per_class``
        (``shots + query_shots``: what one task needs of each class), ``seed`` and ``download``
        (without a ``download`` parameter, ``--download`` is refused rather than ignored).
        A source that draws from the global random streams (torch, ``random``, NumPy) draws from the
        env's own seeded stream, which checkpoints hold: ``resume`` then continues it exactly.
    :param spec: what the command line needs to know of its tasks: image channels and size (the
        built-in networks' input), the default model and inner step size, whether it is regression.
    """
    if not callable(load):
        raise TypeError(f"register_dataset needs a callable that returns the tasksets, got {load!r}")
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register_dataset needs a DatasetSpec, got {type(spec).__name__}")
    check_positive_int("spec.in_channels", spec.in_channels)
    check_non_negative("spec.image_size", spec.image_size)
    check_positive("spec.inner_lr", spec.inner_lr)
    check_positive_int("spec.shots", spec.shots)
    check_inner_loops(spec.inner_loops)
    key = name.lower()
    held = DATASETS[key].load if key in DATASETS else None
    refuse_taken_name("dataset", key, BUILT_IN_DATASETS, held, load, "your task source")
    DATASETS[key] = replace(spec, load=load, inner_loops={a.lower(): dict(s) for a, s in spec.inner_loops.items()})


INNER_LOOP_KEYS = ("inner_steps", "inner_lr", "lam")


def check_inner_loops(inner_loops) -> None:
    """Refuse a ``DatasetSpec.inner_loops`` that the command line could not use, naming the bad entry."""
    if not isinstance(inner_loops, Mapping):
        raise TypeError(f"spec.inner_loops must map algorithm names to settings, got {type(inner_loops).__name__}")
    for algorithm, settings in inner_loops.items():
        where = f"spec.inner_loops[{algorithm!r}]"
        if not isinstance(algorithm, str):
            raise TypeError(f"{where}: the keys are algorithm names (strings)")
        if not isinstance(settings, Mapping):
            raise TypeError(f"{where} must map {', '.join(INNER_LOOP_KEYS)} to values, got {settings!r}")
        unknown = sorted(set(settings) - set(INNER_LOOP_KEYS))
        if unknown:
            raise ValueError(f"{where} has {', '.join(map(repr, unknown))}; allowed: {', '.join(INNER_LOOP_KEYS)}")
        for key, value in settings.items():
            (check_positive_int if key == "inner_steps" else check_positive)(f"{where}[{key!r}]", value)


def inner_loop_defaults(dataset: str, algorithm: str) -> dict:
    """The command line's inner loop for ``algorithm`` on ``dataset`` where no flag sets it:
    ``{"inner_steps", "inner_lr", "lam"}``, the spec's entry for the algorithm over MAML's one step
    of the spec's ``inner_lr`` (and iMAML's λ = 1).

    :param dataset: a name of :data:`DATASETS`.
    :param algorithm: an algorithm's name.
    """
    spec = DATASETS[dataset]
    return {"inner_steps": 1, "inner_lr": spec.inner_lr, "lam": 1.0, **spec.inner_loops.get(algorithm.lower(), {})}


def default_data_root(dataset: str) -> str | None:
    """``$BILEVEL_MAML_DATA/<dataset>`` when that variable is set (or the variable itself where it
    names the dataset's own folder, ``.../omniglot-small``), else the dataset's default.

    :param dataset: a name of :data:`DATASETS`.
    """
    root = os.environ.get("BILEVEL_MAML_DATA")
    if root and DATASETS[dataset].default_root:
        # a machine set up for one dataset may point the variable at that dataset's folder itself
        return root if Path(root).name == dataset else str(Path(root) / dataset)
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
    root = data_root if data_root is not None else default_data_root(dataset)
    if DATASETS[dataset].load is not None:
        return call_with_named_keywords(DATASETS[dataset].load, data_root=root, ways=ways, shots=shots,
                                        query_shots=query_shots, samples_per_class=samples, seed=seed,
                                        download=download)
    if dataset == "sinusoid":
        return SinusoidTasks(points=samples)
    if dataset == "omniglot-small":
        return omniglot_small_tasksets(root, ways=ways, samples_per_class=samples, seed=seed, cache_dir=cache_dir)
    assert dataset in BENCHMARKS
    # Pixel values of the ImageNet pickles are 0-255 unless learn2learn is asked to scale them.
    extra = {"data_augmentation": "normalize"} if dataset in ("mini-imagenet", "tiered-imagenet") else {}
    return benchmark_tasksets(dataset, root, ways=ways, samples_per_class=samples, download=download, **extra)


__all__ = ["BUILT_IN_DATASETS", "DATASETS", "DatasetSpec", "default_data_root", "load_tasksets", "register_dataset"]
