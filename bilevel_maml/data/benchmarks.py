"""The standard few-shot benchmarks through learn2learn's ``get_tasksets``, with the files checked
first, so a missing dataset fails with a message saying exactly what to place where.

``get_tasksets`` downloads what is missing; on machines without internet access that fails deep
inside learn2learn (and a failed download can leave an error page where a ``.pkl`` should be).
With ``download=False`` (the default here) nothing is fetched: the required files are checked and
listed instead. With ``download=True`` learn2learn's own download path runs unchanged.
"""

from __future__ import annotations

from pathlib import Path

from bilevel_maml.data._learn2learn import import_learn2learn
from bilevel_maml.data.omniglot import DataNotFoundError

#: benchmark -> (paths under root that must exist, where they come from)
REQUIRED_FILES: dict[str, tuple[tuple[str, ...], str]] = {
    "omniglot": (
        (
            "omniglot-py/images_background.zip",
            "omniglot-py/images_evaluation.zip",
            "omniglot-py/images_background/",
            "omniglot-py/images_evaluation/",
        ),
        "the two zips from github.com/brendenlake/omniglot (folder python/), each also unzipped "
        "beside itself",
    ),
    "mini-imagenet": (
        (
            "mini-imagenet-cache-train.pkl",
            "mini-imagenet-cache-validation.pkl",
            "mini-imagenet-cache-test.pkl",
        ),
        "learn2learn's mini-ImageNet pickles (zenodo.org record 7978538)",
    ),
    "tiered-imagenet": (
        tuple(
            f"tiered-imagenet/{split}_{kind}.pkl"
            for split in ("train", "val", "test")
            for kind in ("images_png", "labels")
        ),
        "learn2learn's tiered-ImageNet pickles (zenodo.org record 7978538, files tiered-imagenet-*)",
    ),
    "cifarfs": (
        ("cifarfs/processed/train/", "cifarfs/processed/val/", "cifarfs/processed/test/"),
        "cifar100.zip from zenodo.org record 7978538 unzipped as cifarfs/ (learn2learn builds "
        "cifarfs/processed/ from cifarfs/cifar100/ on first use)",
    ),
    "fc100": (
        ("FC100_train.pickle", "FC100_val.pickle", "FC100_test.pickle"),
        "fc100.zip from zenodo.org record 7978538, unzipped",
    ),
}

BENCHMARKS = tuple(REQUIRED_FILES)


def missing_files(name: str, root) -> list[str]:
    """The files ``name`` needs that ``root`` lacks (empty when all are there).

    :param name: one of :data:`BENCHMARKS`.
    :param root: the folder to look in.
    """
    paths, _ = REQUIRED_FILES[name]
    root = Path(root).expanduser()
    missing = [p for p in paths if not (root / p).exists()]
    if name == "cifarfs" and missing and (root / "cifarfs/cifar100/data").is_dir():
        return []  # learn2learn processes the raw layout itself
    return missing


def benchmark_tasksets(name: str, root, ways: int, samples_per_class: int, download: bool = False, **kwargs):
    """learn2learn ``get_tasksets(name, ...)`` with ``ways``-way tasks of ``samples_per_class``
    examples per class in every split; the files are checked first unless ``download``.

    :param name: one of :data:`BENCHMARKS` (``mini-imagenet``, ``tiered-imagenet``, ``cifarfs``, ``fc100``, ``omniglot``).
    :param root: the folder holding the benchmark's files.
    :param ways: classes per task.
    :param samples_per_class: examples per class per task (support + query).
    :param download: let learn2learn download missing files (needs internet).
    :param kwargs: passed on to learn2learn's ``get_tasksets``.
    """
    if name not in REQUIRED_FILES:
        raise ValueError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    root = Path(root).expanduser()
    missing = missing_files(name, root)
    if missing and not download:
        _, source = REQUIRED_FILES[name]
        raise DataNotFoundError(
            f"{name} data not found under {str(root)!r}: missing "
            + ", ".join(str(root / p) for p in missing)
            + f". Place {source} there (or pass download=True / --download on a machine with "
            f"internet access to let learn2learn fetch them)."
        )
    l2l = import_learn2learn()
    return l2l.vision.benchmarks.get_tasksets(
        name, train_ways=ways, train_samples=samples_per_class, test_ways=ways,
        test_samples=samples_per_class, root=str(root), **kwargs,
    )


__all__ = ["BENCHMARKS", "benchmark_tasksets", "missing_files"]
