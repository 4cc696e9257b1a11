"""Omniglot from the official small background subsets, as learn2learn task datasets.

``images_background_small1.zip`` and ``images_background_small2.zip`` (brendenlake/omniglot) hold
``<subset>/<alphabet>/<characterNN>/<charid>_<drawer>.png``. The two subsets share 50 characters
(Greek and Latin); the splits here are by character with no overlap:

* train and validation: the characters of ``small1``, split at random (seeded);
* test: the characters of ``small2`` that are not in ``small1`` (Japanese katakana, Sanskrit,
  Tagalog), so test characters and alphabets are never seen in meta-training.

Images are resized to 28×28 and inverted (strokes are 1), as in the MAML paper; with
``rotations=True`` each character rotated by 0/90/180/270 degrees is a class of its own.
The zips are unzipped into ``<cache_dir>/omniglot-small/`` and the decoded images kept there as one
tensor file; nothing is written next to the zips.
"""

from __future__ import annotations

import os
import random
import warnings
import zipfile
import zlib
from collections import namedtuple
from pathlib import Path

import torch
from torch.utils.data import Dataset

from bilevel_maml.data._learn2learn import import_learn2learn

SUBSET_FILES = ("images_background_small1.zip", "images_background_small2.zip")
IMAGE_SIZE = 28

Tasksets = namedtuple("Tasksets", ["train", "validation", "test"])
Tasksets.__doc__ = """The three splits' task sources, as learn2learn's ``get_tasksets`` returns them.

:param train: meta-training tasks.
:param validation: tasks for validation during training.
:param test: tasks for the final report.
"""


class DataNotFoundError(FileNotFoundError, ValueError):
    """A data folder or file is missing; the message says what must be placed where."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return Path(os.environ.get("BILEVEL_MAML_CACHE", os.path.join(base, "bilevel_maml")))


def find_subsets(root: str | os.PathLike) -> tuple[Path, Path]:
    root = Path(root)
    missing = [name for name in SUBSET_FILES if not (root / name).is_file()]
    if missing:
        where = "does not exist" if not root.is_dir() else f"lacks {', '.join(missing)}"
        raise DataNotFoundError(
            f"Omniglot data folder {str(root)!r} {where}. Place {' and '.join(SUBSET_FILES)} "
            f"(from github.com/brendenlake/omniglot, folder python/) in that folder; in this "
            f"repository they are in ../shared/data/omniglot-small."
        )
    return root / SUBSET_FILES[0], root / SUBSET_FILES[1]


def extract_subsets(root, cache_dir=None) -> dict[str, Path]:
    """Unzip both subsets into ``<cache_dir>/omniglot-small/`` (once); returns their folders."""
    zips = find_subsets(root)
    target = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "omniglot-small"
    folders = {}
    for key, archive_path in zip(("small1", "small2"), zips):
        folder = target / archive_path.stem
        done = folder / ".extracted"
        # the marker holds the zip's size: another zip of the same name (a re-download) is unzipped again
        if not done.is_file() or done.read_text().strip() != str(archive_path.stat().st_size):
            try:
                with zipfile.ZipFile(archive_path) as archive:
                    archive.extractall(target)
            except (zipfile.BadZipFile, EOFError, zlib.error) as error:
                raise ValueError(f"{archive_path} is not a readable zip archive ({error}); "
                                 f"replace it with the official file") from None
            if not folder.is_dir():
                raise ValueError(f"{archive_path} does not hold the folder {archive_path.stem}/ that the official "
                                 f"file holds; replace it with the official file")
            done.write_text(f"{archive_path.stat().st_size}\n")
            (target / f"decoded-{IMAGE_SIZE}px.pt").unlink(missing_ok=True)  # decoded from the old files
        folders[key] = folder
    return folders


def read_alphabet_folder(folder) -> dict[str, list[Path]]:
    """``<folder>/<alphabet>/<characterNN>/<charid>_<drawer>.png`` -> ``{charid: [png, ...]}``.

    Characters are keyed by the id in the file names, which is shared across subsets, so the same
    character in two subsets is recognised as one.
    """
    characters: dict[str, list[Path]] = {}
    for png in sorted(Path(folder).glob("*/*/*.png")):
        characters.setdefault(png.stem.split("_")[0], []).append(png)
    if not characters:
        raise DataNotFoundError(f"no <alphabet>/<character>/<image>.png files under {str(folder)!r}")
    return characters


def _decode(png: Path) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms import functional as TF

    try:
        with Image.open(png) as image:
            small = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
    except (OSError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError; truncated PNGs raise either
        raise ValueError(f"{png} does not decode as an image ({error})") from None
    return 1.0 - TF.to_tensor(small)


def load_characters(root, cache_dir=None) -> dict[str, dict[str, torch.Tensor]]:
    """``{"small1": {char_id: images}, "small2": {...}}`` with images of shape (20, 1, 28, 28).

    Decoded images are kept in the cache folder too, so later runs skip the PNG decoding.
    """
    folders = extract_subsets(root, cache_dir)
    cached = folders["small1"].parent / f"decoded-{IMAGE_SIZE}px.pt"
    if cached.is_file():
        try:  # a cache holds tensors only, so it loads without running code
            return torch.load(cached, weights_only=True)
        except Exception as error:
            warnings.warn(f"the decoded-image cache {cached} is unreadable ({type(error).__name__}); decoding the "
                          f"images again")
    decoded = {
        key: {c: torch.stack([_decode(png) for png in pngs]) for c, pngs in read_alphabet_folder(folder).items()}
        for key, folder in folders.items()
    }
    partial = cached.with_suffix(f".tmp{os.getpid()}")
    torch.save(decoded, partial)
    os.replace(partial, cached)
    return decoded


class CharacterImages(Dataset):
    """Images of a set of characters; item ``i`` is ``(image, class)``.

    With ``rotations`` the dataset is four times longer: a class is a (character, rotation) pair.
    ``labels_to_indices`` is precomputed, so learn2learn's ``MetaDataset`` need not scan the data.

    :param characters: one image tensor ``(examples, 1, 28, 28)`` per character.
    :param rotations: also serve each character rotated by 90°, 180° and 270° as classes of their own.
    """

    def __init__(self, characters: list[torch.Tensor], rotations: bool = False):
        self.images = torch.cat(characters)
        self.labels = torch.cat([torch.full((len(imgs),), c) for c, imgs in enumerate(characters)])
        self.turns = 4 if rotations else 1
        self.num_classes = len(characters) * self.turns

    def __len__(self):
        return len(self.images) * self.turns

    def __getitem__(self, index):
        turn, i = divmod(index, len(self.images))
        image = torch.rot90(self.images[i], k=turn, dims=(1, 2)) if turn else self.images[i]
        return image, int(self.labels[i]) * self.turns + turn

    def labels_to_indices(self) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        n = len(self.images)
        for turn in range(self.turns):
            for i, label in enumerate(self.labels.tolist()):
                groups.setdefault(label * self.turns + turn, []).append(turn * n + i)
        return groups


def task_dataset(dataset: CharacterImages, ways: int, samples_per_class: int, num_tasks: int = -1):
    """A learn2learn ``Taskset`` of ``ways``-way tasks with ``samples_per_class`` per class.

    :param dataset: the split's :class:`CharacterImages`.
    :param ways: classes per task.
    :param samples_per_class: examples per class per task.
    :param num_tasks: tasks in the taskset (-1: a new task at every draw).
    """
    l2l = import_learn2learn()
    meta = l2l.data.MetaDataset(dataset, labels_to_indices=dataset.labels_to_indices())
    transforms = [
        l2l.data.transforms.NWays(meta, n=ways),
        l2l.data.transforms.KShots(meta, k=samples_per_class),
        l2l.data.transforms.LoadData(meta),
        l2l.data.transforms.RemapLabels(meta),
        l2l.data.transforms.ConsecutiveLabels(meta),
    ]
    return l2l.data.Taskset(meta, task_transforms=transforms, num_tasks=num_tasks)


def omniglot_small_tasksets(
    root,
    ways: int,
    samples_per_class: int,
    rotations: bool = True,
    validation_fraction: float = 0.2,
    seed: int = 0,
    cache_dir=None,
) -> Tasksets:
    """Train/validation/test learn2learn task datasets over the small Omniglot subsets.

    :param root: the folder holding ``images_background_small1.zip`` and ``images_background_small2.zip`` (or their extracted folders).
    :param ways: classes per task.
    :param samples_per_class: examples per class per task (support + query shots).
    :param rotations: add the 90°/180°/270° rotations as classes (the standard Omniglot protocol).
    :param validation_fraction: the share of the first subset's characters held out for validation; the second
        subset's characters not in the first are the test split.
    :param seed: seeds the split of characters into train and validation.
    :param cache_dir: where the decoded images are cached (default: the user's cache folder).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    characters = load_characters(root, cache_dir)
    seen = sorted(characters["small1"])
    random.Random(seed).shuffle(seen)
    n_valid = max(1, round(len(seen) * validation_fraction))
    held_out = sorted(set(characters["small2"]) - set(characters["small1"]))
    splits = {
        "train": [characters["small1"][c] for c in sorted(seen[n_valid:])],
        "validation": [characters["small1"][c] for c in sorted(seen[:n_valid])],
        "test": [characters["small2"][c] for c in held_out],
    }
    return Tasksets(
        **{
            name: task_dataset(CharacterImages(chars, rotations), ways, samples_per_class)
            for name, chars in splits.items()
        }
    )
