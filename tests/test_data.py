"""Data pipeline: Omniglot splits and cache, benchmark file checks, the real get_tasksets path."""

import pytest
import torch

from bilevel_maml.data import omniglot
from bilevel_maml.data.benchmarks import BENCHMARKS, REQUIRED_FILES, benchmark_tasksets
from bilevel_maml.data.sources import default_data_root
from bilevel_maml.env import EpisodicEnv
from conftest import write_mini_imagenet_pickles


@pytest.fixture(scope="module")
def characters(omniglot_root, omniglot_cache):
    return omniglot.load_characters(omniglot_root, omniglot_cache)


def test_subsets_unzip_into_the_cache_and_never_into_shared(omniglot_root, omniglot_cache, characters):
    before = sorted(p.name for p in omniglot_root.iterdir())
    folders = omniglot.extract_subsets(omniglot_root, omniglot_cache)
    assert all(omniglot_cache in folder.parents for folder in folders.values())
    assert (folders["small1"] / "Balinese" / "character01").is_dir()
    assert sorted(p.name for p in omniglot_root.iterdir()) == before
    assert len(characters["small1"]) == 136 and len(characters["small2"]) == 156


def test_images_are_28px_inverted_strokes(characters):
    images = characters["small1"]["0108"]
    assert images.shape == (20, 1, 28, 28)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert images.mean() < 0.3  # mostly background, which is 0 after inversion


def test_splits_are_by_character_without_overlap(omniglot_root, omniglot_cache, characters):
    tasksets = omniglot.omniglot_small_tasksets(omniglot_root, 5, 2, cache_dir=omniglot_cache)

    def character_set(taskset):
        images = taskset.dataset.dataset.images
        return {images[i].numpy().tobytes() for i in range(0, len(images), 20)}  # first drawing of each

    train, valid, test = (character_set(t) for t in tasksets)
    assert len(train) + len(valid) == 136 and len(test) == 156 - 50
    assert not train & valid and not train & test and not valid & test
    shared = set(characters["small1"]) & set(characters["small2"])
    assert len(shared) == 50  # Greek and Latin appear in both subsets; none of them is a test class
    for taskset in tasksets:
        assert taskset.dataset.dataset.num_classes == 4 * len(taskset.dataset.dataset.images) // 20


def test_rotations_are_classes_of_their_own(characters):
    dataset = omniglot.CharacterImages([characters["small1"]["0108"], characters["small1"]["0109"]], rotations=True)
    assert len(dataset) == 160 and dataset.num_classes == 8
    image, label = dataset[0]
    rotated, rotated_label = dataset[40]  # the same drawing turned by 90°
    assert label == 0 and rotated_label == 1
    assert torch.equal(rotated, torch.rot90(image, 1, dims=(1, 2)))
    groups = dataset.labels_to_indices()
    assert sorted(len(v) for v in groups.values()) == [20] * 8
    assert all(dataset[i][1] == label for label, indices in groups.items() for i in indices)


def test_omniglot_tasks_through_learn2learn_transforms(omniglot_root, omniglot_cache):
    tasksets = omniglot.omniglot_small_tasksets(omniglot_root, ways=5, samples_per_class=3, cache_dir=omniglot_cache)
    env = EpisodicEnv(tasksets.test, ways=5, shots=1, query_shots=2)
    env.check()
    env.step()
    (xs, ys), (xq, yq) = env.batch["support"], env.batch["query"]
    assert xs.shape == (5, 1, 28, 28) and xq.shape == (10, 1, 28, 28)
    assert sorted(ys.tolist()) == list(range(5))
    assert sorted(yq.tolist()) == sorted(list(range(5)) * 2)


def test_bilevel_maml_data_names_the_folder_of_the_datasets_or_one_datasets_own(monkeypatch, tmp_path):
    assert default_data_root("omniglot-small") == "../shared/data/omniglot-small"
    monkeypatch.setenv("BILEVEL_MAML_DATA", str(tmp_path))
    assert default_data_root("omniglot-small") == str(tmp_path / "omniglot-small")
    assert default_data_root("mini-imagenet") == str(tmp_path / "mini-imagenet")
    assert default_data_root("sinusoid") is None  # drawn, not read
    # as the GPU machine's setup exports it: the Omniglot subsets' own folder
    monkeypatch.setenv("BILEVEL_MAML_DATA", str(tmp_path / "omniglot-small"))
    assert default_data_root("omniglot-small") == str(tmp_path / "omniglot-small")
    assert default_data_root("mini-imagenet") == str(tmp_path / "omniglot-small" / "mini-imagenet")


@pytest.mark.parametrize("name", BENCHMARKS)
def test_missing_benchmark_files_are_listed_with_where_to_place_them(name, tmp_path):
    with pytest.raises(omniglot.DataNotFoundError) as error:
        benchmark_tasksets(name, tmp_path, ways=5, samples_per_class=2)
    message = str(error.value)
    for path in REQUIRED_FILES[name][0]:
        assert str(tmp_path / path) in message
    assert f"Place {REQUIRED_FILES[name][1]} there" in message
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded or created


def test_present_mini_imagenet_files_go_through_learn2learn_get_tasksets(tmp_path):
    write_mini_imagenet_pickles(tmp_path, classes=6, per_class=4)
    tasksets = benchmark_tasksets("mini-imagenet", tmp_path, ways=5, samples_per_class=2,
                                  data_augmentation="normalize")
    inputs, labels = tasksets.train.sample()
    assert inputs.shape == (10, 3, 84, 84) and sorted(labels.tolist()) == sorted(list(range(5)) * 2)
    assert inputs.max() <= 1.0
