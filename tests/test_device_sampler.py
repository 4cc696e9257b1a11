"""The device-resident sampler draws the learn2learn path's task distribution, on the device, seeded."""

import itertools
import math
import warnings

import pytest
import torch

from bilevel_maml import build_engine
from bilevel_maml.data import DeviceSinusoidTasks, SinusoidTasks, omniglot_small_tasksets
from bilevel_maml.data.device_sampler import (DeviceTaskSampler, DeviceTaskSource, UnsupportedTaskSource,
                                              sampler_from_taskset)
from bilevel_maml.data.omniglot import CharacterImages, task_dataset
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.models import MLP

COUNTS = (4, 4, 5, 6, 4, 7)  # examples per class: uneven on purpose
WAYS, SHOTS, QUERY = 3, 1, 2


def coded_images(counts=COUNTS):
    """Image j of class c holds the value 100·c + j everywhere: a drawn image names its example."""
    return [torch.full((n, 1, 2, 2), 0.0) + (100 * c + torch.arange(n, dtype=torch.float32)).view(n, 1, 1, 1)
            for c, n in enumerate(counts)]


def decode(images):
    value = images[..., 0, 0, 0].round().long()
    return value // 100, value % 100


def tallies(support, query, classes_drawn):
    """Per class: how often drawn, how often at each label; per example: in support, in query."""
    (xs, ys), (xq, _) = support, query
    s_class, s_example = decode(xs)
    q_class, q_example = decode(xq)
    drawn = torch.zeros(len(COUNTS))
    at_label = torch.zeros(len(COUNTS), WAYS)
    in_support, in_query = {}, {}
    for t in range(len(xs)):
        labels = {int(c): int(y) for c, y in zip(s_class[t], ys[t])}
        for c, y in labels.items():
            drawn[c] += 1
            at_label[c, y] += 1
        for c, e in zip(s_class[t].tolist(), s_example[t].tolist()):
            in_support[(c, e)] = in_support.get((c, e), 0) + 1
        for c, e in zip(q_class[t].tolist(), q_example[t].tolist()):
            in_query[(c, e)] = in_query.get((c, e), 0) + 1
        classes_drawn[tuple(sorted(labels))] = classes_drawn.get(tuple(sorted(labels)), 0) + 1
    return drawn, at_label, in_support, in_query


def assert_marginals(support, query, tasks):
    """Exact marginals of ways-of-classes, shots-then-query-of-examples sampling without replacement,
    within 5 standard errors."""
    subsets = {}
    drawn, at_label, in_support, in_query = tallies(support, query, subsets)

    def close(observed, p, n):
        assert abs(observed / n - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (observed / n, p)

    for c, n in enumerate(COUNTS):
        close(drawn[c], WAYS / len(COUNTS), tasks)                        # a class is in WAYS of the 6 slots
        for label in range(WAYS):
            close(at_label[c, label], 1 / len(COUNTS), tasks)             # uniformly random labelling
        for e in range(n):
            close(in_support.get((c, e), 0), WAYS / len(COUNTS) * SHOTS / n, tasks)
            close(in_query.get((c, e), 0), WAYS / len(COUNTS) * QUERY / n, tasks)
    for subset in itertools.combinations(range(len(COUNTS)), WAYS):      # every class set equally likely
        close(subsets.get(subset, 0), 1 / math.comb(len(COUNTS), WAYS), tasks)


def test_the_draw_has_the_exact_class_label_and_example_marginals_and_disjoint_splits():
    images = torch.cat(coded_images())
    starts = [0, *itertools.accumulate(COUNTS)]
    sampler = DeviceTaskSampler(images, [range(starts[c], starts[c + 1]) for c in range(len(COUNTS))],
                                WAYS, SHOTS, QUERY)
    tasks = 20000
    support, query = sampler.sample(tasks, sampler.generator(0))
    assert support[0].shape == (tasks, WAYS * SHOTS, 1, 2, 2) and query[0].shape == (tasks, WAYS * QUERY, 1, 2, 2)
    assert torch.equal(support[1][0], torch.tensor([0, 1, 2])) and torch.equal(query[1][0], torch.tensor([0, 0, 1, 1, 2, 2]))
    s_class, s_example = decode(support[0])
    q_class, q_example = decode(query[0])
    # labels name one class each, the same one in support and query
    for t in range(200):
        assert len(set(s_class[t].tolist())) == WAYS
        assert (s_class[t].view(WAYS, SHOTS) == s_class[t].view(WAYS, SHOTS)[:, :1]).all()
        assert torch.equal(q_class[t].view(WAYS, QUERY)[:, 0], s_class[t].view(WAYS, SHOTS)[:, 0])
    # no example is in both the support and the query set of a task
    s_keys = (s_class * 100 + s_example).unsqueeze(2)
    q_keys = (q_class * 100 + q_example).unsqueeze(1)
    assert not (s_keys == q_keys).any()
    assert (q_keys.squeeze(1).sort(1).values.diff(dim=1) != 0).all()  # query examples distinct too
    assert_marginals(support, query, tasks)


def test_learn2learns_path_has_the_same_marginals():
    """The reference: the same tiny dataset through learn2learn's Taskset and EpisodicEnv's split."""
    taskset = task_dataset(CharacterImages(coded_images()), ways=WAYS, samples_per_class=SHOTS + QUERY)
    env = EpisodicEnv(taskset, ways=WAYS, shots=SHOTS, query_shots=QUERY, seed=0)
    tasks = 3000
    support, query = env.sample_tasks(tasks)
    assert_marginals(support, query, tasks)


def test_a_wrong_sampler_fails_the_marginals():
    """A sampler that only ever draws each class's first examples is caught by the same check."""
    images = torch.cat(coded_images())
    starts = [0, *itertools.accumulate(COUNTS)]
    sampler = DeviceTaskSampler(images, [range(starts[c], starts[c] + SHOTS + QUERY) for c in range(len(COUNTS))],
                                WAYS, SHOTS, QUERY)
    support, query = sampler.sample(4000, sampler.generator(0))
    with pytest.raises(AssertionError):
        assert_marginals(support, query, 4000)


def test_same_seed_same_tasks_and_the_state_resumes_the_stream():
    sampler = sampler_from_taskset(task_dataset(CharacterImages(coded_images()), WAYS, SHOTS + QUERY),
                                   WAYS, SHOTS, QUERY, "cpu")
    a, b = (EpisodicEnv(sampler, ways=WAYS, shots=SHOTS, query_shots=QUERY, seed=5) for _ in range(2))
    other = EpisodicEnv(sampler, ways=WAYS, shots=SHOTS, query_shots=QUERY, seed=6)
    first = a.sample_tasks(4)
    assert torch.equal(first[0][0], b.sample_tasks(4)[0][0])
    assert not torch.equal(first[0][0], other.sample_tasks(4)[0][0])
    saved = a.state_dict()
    expected = a.sample_tasks(4)
    fresh = EpisodicEnv(sampler, ways=WAYS, shots=SHOTS, query_shots=QUERY, seed=99)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.sample_tasks(4)[1][0], expected[1][0])
    with pytest.raises(ValueError, match="resume with the same --sampler"):
        EpisodicEnv(task_dataset(CharacterImages(coded_images()), WAYS, SHOTS + QUERY), ways=WAYS, shots=SHOTS,
                    query_shots=QUERY).load_state_dict(saved)


def test_steps_hand_out_one_draw_of_the_meta_batch_however_many_tasks_each_takes():
    """A draw of 4 tasks is not the stream of 4 draws of one: the env draws tasks_per_draw (the
    engine's meta-batch) at once and its steps hand them out, so stacked, chunked and one-by-one
    steps see the same tasks; the stream's state is read between draws only."""
    sampler = sampler_from_taskset(task_dataset(CharacterImages(coded_images()), WAYS, SHOTS + QUERY),
                                   WAYS, SHOTS, QUERY, "cpu")

    def env():
        return EpisodicEnv(sampler, ways=WAYS, shots=SHOTS, query_shots=QUERY, seed=5)

    drawing = env()
    draws = torch.cat([drawing.sample_tasks(4)[0][0], drawing.sample_tasks(4)[0][0]])
    one_by_one = env()
    assert not torch.equal(torch.cat([one_by_one.sample_tasks(1)[0][0] for _ in range(4)]), draws[:4])
    for per_step in (1, 2, 4):
        stepping = env()
        stepping.tasks_per_draw, stepping.tasks_per_step, stepping.stacked = 4, per_step, per_step > 1
        handed = []
        for step in range(1, 8 // per_step + 1):
            stepping.step()
            support = stepping.batch["support"][0]
            handed += list(support) if stepping.stacked else [support]
            if step * per_step % 4:
                with pytest.raises(RuntimeError, match=f"not with {4 - step * per_step % 4} of the 4 tasks"):
                    stepping.state_dict()
        assert torch.equal(torch.stack(handed), draws) and stepping.tasks_sampled == 8


def test_random_class_rotation_turns_each_class_of_each_task_uniformly():
    from bilevel_maml.data._learn2learn import import_learn2learn

    l2l = import_learn2learn()
    characters = [torch.rand(5, 1, 3, 3) for _ in range(6)]
    dataset = l2l.data.MetaDataset(CharacterImages(characters))
    taskset = l2l.data.Taskset(dataset, task_transforms=[
        l2l.data.transforms.FusedNWaysKShots(dataset, n=3, k=2, filter_labels=[0, 1, 2, 3]),
        l2l.data.transforms.LoadData(dataset), l2l.data.transforms.RemapLabels(dataset),
        l2l.data.transforms.ConsecutiveLabels(dataset),
        l2l.vision.transforms.RandomClassRotation(dataset, [0.0, 90.0, 180.0, 270.0])])
    sampler = sampler_from_taskset(taskset, ways=3, shots=1, query_shots=1, device="cpu")
    assert sampler.num_classes == 4  # the filter keeps classes 0-3
    (xs, _), (xq, _) = sampler.sample(2000, sampler.generator(1))
    originals = torch.cat(characters[:4])
    turns = torch.zeros(4)
    for t in range(2000):
        for way in range(3):
            support, query = xs[t, way], xq[t, way]
            matches = [k for k in range(4) for o in originals
                       if torch.equal(torch.rot90(o, k, dims=(1, 2)), support)]
            assert len(matches) == 1, "each support image is a rotated original"
            k = matches[0]
            turns[k] += 1
            # the query image of that class is turned the same way
            assert any(torch.equal(torch.rot90(o, k, dims=(1, 2)), query) for o in originals)
    assert ((turns / turns.sum() - 0.25).abs() < 0.02).all(), turns


def test_omniglot_small_splits_move_to_the_device_with_their_rotated_classes(omniglot_root, omniglot_cache):
    tasksets = omniglot_small_tasksets(omniglot_root, ways=5, samples_per_class=2, cache_dir=omniglot_cache)
    sampler = sampler_from_taskset(tasksets.train, ways=5, shots=1, query_shots=1, device="cpu")
    dataset = tasksets.train.dataset
    assert sampler.num_classes == len(dataset.labels_to_indices) and len(sampler.images) == len(dataset)
    (xs, ys), (xq, yq) = sampler.sample(8, sampler.generator(0))
    assert xs.shape == (8, 5, 1, 28, 28) and xq.shape == (8, 5, 1, 28, 28)
    # every drawn image is one of the split's images, and a task's support and query images of one
    # label come from one class of the taskset (a character at one rotation)
    index = {bytes(dataset[i][0].numpy()): dataset[i][1] for i in range(len(dataset))}
    for t in range(8):
        for way in range(5):
            assert index[bytes(xs[t, way].numpy())] == index[bytes(xq[t, way].numpy())]
        assert len({index[bytes(x.numpy())] for x in xs[t]}) == 5


def test_eight_bit_images_are_kept_as_uint8_and_come_back_exactly():
    steps = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8)

    class EightBit(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return steps[i].float() / 255.0, i // 3

    from bilevel_maml.data._learn2learn import import_learn2learn

    l2l = import_learn2learn()
    dataset = l2l.data.MetaDataset(EightBit())
    taskset = l2l.data.Taskset(dataset, task_transforms=[
        l2l.data.transforms.NWays(dataset, 2), l2l.data.transforms.KShots(dataset, 2),
        l2l.data.transforms.LoadData(dataset), l2l.data.transforms.RemapLabels(dataset)])
    sampler = sampler_from_taskset(taskset, ways=2, shots=1, query_shots=1, device="cpu")
    assert sampler.images.dtype == torch.uint8
    (xs, _), (xq, _) = sampler.sample(50, sampler.generator(0))
    originals = {bytes((steps[i].float() / 255.0).numpy()) for i in range(12)}
    assert all(bytes(x.numpy()) in originals for x in torch.cat([xs.flatten(0, 1), xq.flatten(0, 1)]))


def test_a_split_that_is_not_eight_bit_after_all_is_kept_as_floats():
    from bilevel_maml.data._learn2learn import import_learn2learn

    l2l = import_learn2learn()
    values = [torch.randint(0, 256, (1, 3, 3)).float() / 255.0 for _ in range(8)]
    values[5] = torch.rand(1, 3, 3)  # the first images are 8-bit, this one is not

    class Mixed(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return values[i], i // 2

    dataset = l2l.data.MetaDataset(Mixed())
    taskset = l2l.data.Taskset(dataset, task_transforms=[
        l2l.data.transforms.NWays(dataset, 2), l2l.data.transforms.KShots(dataset, 2),
        l2l.data.transforms.LoadData(dataset)])
    sampler = sampler_from_taskset(taskset, ways=2, shots=1, query_shots=1, device="cpu")
    assert sampler.images.dtype == torch.float32
    assert all(torch.equal(sampler.images[i], values[i]) for i in range(8))


def test_what_has_no_device_equivalent_is_named():
    from bilevel_maml.data._learn2learn import import_learn2learn

    l2l = import_learn2learn()
    dataset = l2l.data.MetaDataset(CharacterImages(coded_images()))
    replacement = l2l.data.Taskset(dataset, task_transforms=[
        l2l.data.transforms.NWays(dataset, 3), l2l.data.transforms.KShots(dataset, 3, replacement=True),
        l2l.data.transforms.LoadData(dataset)])
    with pytest.raises(UnsupportedTaskSource, match="with replacement"):
        sampler_from_taskset(replacement, WAYS, SHOTS, QUERY, "cpu")
    pool = task_dataset(CharacterImages(coded_images()), WAYS, SHOTS + QUERY, num_tasks=20)
    with pytest.raises(UnsupportedTaskSource, match="fixed pool of 20 tasks"):
        sampler_from_taskset(pool, WAYS, SHOTS, QUERY, "cpu")
    plain = task_dataset(CharacterImages(coded_images()), WAYS, SHOTS + QUERY)
    with pytest.raises(UnsupportedTaskSource, match=r"need 0 MB on cpu, over the 0 MB left"):
        sampler_from_taskset(plain, WAYS, SHOTS, QUERY, "cpu", max_bytes=10)
    with pytest.raises(UnsupportedTaskSource, match=r"^its 30 examples are more than the 29 loaded up front by "
                                                    r"default \(--sampler device / sampler='device' loads them all\)$"):
        sampler_from_taskset(plain, WAYS, SHOTS, QUERY, "cpu", max_examples=29)


def test_an_item_transform_that_draws_at_random_stays_on_learn2learns_path(omniglot_root, omniglot_cache):
    """learn2learn loads an example afresh at every draw, so a random flip (data augmentation) flips
    anew each time; one loaded copy on the device would freeze it. Refused, naming why; the probe
    leaves the global random streams as they were; a fixed transform still moves to the device."""
    import random

    from bilevel_maml.data._learn2learn import import_learn2learn

    l2l = import_learn2learn()
    images = CharacterImages([torch.rand(4, 1, 3, 3) for _ in range(6)])

    class Flipped(torch.utils.data.Dataset):
        def __init__(self, flip_probability):
            self.flip_probability = flip_probability

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            image, label = images[i]
            return (image.flip(-1) if torch.rand(()) < self.flip_probability else image), label

    def taskset(flip_probability):
        dataset = l2l.data.MetaDataset(Flipped(flip_probability))
        return l2l.data.Taskset(dataset, task_transforms=[
            l2l.data.transforms.NWays(dataset, WAYS), l2l.data.transforms.KShots(dataset, SHOTS + QUERY),
            l2l.data.transforms.LoadData(dataset), l2l.data.transforms.RemapLabels(dataset)])

    augmented = {split: taskset(0.5) for split in ("train", "validation", "test")}
    torch.manual_seed(3)
    random.seed(3)
    before = torch.get_rng_state(), random.getstate()
    with pytest.raises(UnsupportedTaskSource, match=r"^its dataset's item transform draws at random \(data "
                                                    r"augmentation: example \d+ loaded twice differs\)"):
        sampler_from_taskset(augmented["train"], WAYS, SHOTS, QUERY, "cpu")
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert sampler_from_taskset(taskset(0.0), WAYS, SHOTS, QUERY, "cpu").num_classes == 6
    with pytest.warns(UserWarning, match="the train split is sampled task by task on the CPU through learn2learn: "
                                         "its dataset's item transform draws at random"):
        assert not build_engine("fomaml", torch.nn.Sequential(torch.nn.Flatten(), MLP(9, WAYS, (8,))), augmented,
                                ways=WAYS, shots=SHOTS, query_shots=QUERY, meta_batch_size=2).env.on_device


def engine_for(sampler, tasksets):
    return build_engine("fomaml", torch.nn.Sequential(torch.nn.Flatten(), MLP(4, 5, (8,))), tasksets, ways=5, shots=1, query_shots=1, meta_batch_size=2,
                        sampler=sampler, valid_tasks=2)


def test_build_engine_moves_builtin_splits_and_keeps_other_sources_on_learn2learn(omniglot_root, omniglot_cache):
    tasksets = omniglot_small_tasksets(omniglot_root, ways=5, samples_per_class=2, cache_dir=omniglot_cache)
    flat = torch.nn.Sequential(torch.nn.Flatten(), MLP(784, 5, (8,)))
    engine = build_engine("fomaml", flat, tasksets, ways=5, shots=1, meta_batch_size=2, meta_iterations=2,
                          valid_step=1, valid_tasks=3)
    assert all(env.on_device for env in (engine.env, engine.valid_env, engine.test_env))
    engine.run()
    kept = build_engine("fomaml", flat, tasksets, ways=5, shots=1, meta_batch_size=2, sampler="learn2learn")
    assert not any(env.on_device for env in (kept.env, kept.valid_env, kept.test_env))

    def callable_source():
        return torch.randn(10, 4), torch.arange(5).repeat_interleave(2)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain callable stays on its path without a word
        assert not engine_for("auto", callable_source).env.on_device
    with pytest.raises(ValueError, match="sampler='device' needs learn2learn Tasksets, SinusoidTasks or "
                                         "DeviceTaskSources; the train source is a function"):
        engine_for("device", callable_source)
    pool = task_dataset(CharacterImages(coded_images()), 5, 2, num_tasks=20)
    with pytest.raises(ValueError, match="sampler='device': the train split cannot be drawn on the device: it "
                                         "cycles through a fixed pool"):
        engine_for("device", {"train": pool, "validation": pool, "test": pool})
    with pytest.warns(UserWarning, match="the train split is sampled task by task on the CPU through learn2learn: "
                                         "it cycles through a fixed pool of 20 tasks"):
        engine_for("auto", {"train": pool, "validation": pool, "test": pool})
    with pytest.raises(ValueError, match="unknown sampler 'gpu'; choose one of: auto, device, learn2learn"):
        engine_for("gpu", callable_source)


# -- sinusoids ---------------------------------------------------------------------------------------
def sinusoid_fit(x, y):
    """Per task, the least-squares ``a sin x + b cos x`` through all its points: the amplitude and
    phase of ``A sin(x - φ)`` (a = A cos φ, b = -A sin φ) and the largest residual."""
    basis = torch.cat([torch.sin(x), torch.cos(x)], dim=-1)                     # (tasks, points, 2)
    coef = torch.linalg.lstsq(basis, y).solution                                # (tasks, 2, 1)
    a, b = coef[:, 0, 0], coef[:, 1, 0]
    residual = (basis @ coef - y).abs().amax(dim=(1, 2))
    return torch.sqrt(a**2 + b**2), torch.atan2(-b, a), residual


def assert_uniform(values, low, high):
    """Mean, variance and the share below the midpoint of U[low, high], within 5 standard errors."""
    n, width = len(values), high - low
    assert abs(values.mean() - (low + high) / 2) <= 5 * width / math.sqrt(12 * n)
    assert abs(values.var() - width**2 / 12) <= 5 * width**2 * math.sqrt(1 / 180 / n)  # Var of (X - μ)^2: w⁴/180
    assert abs((values < (low + high) / 2).double().mean() - 0.5) <= 5 * 0.5 / math.sqrt(n)
    assert values.min() >= low and values.max() <= high


def test_device_sinusoids_are_one_sine_per_task_with_the_papers_ranges():
    tasks = SinusoidTasks(points=20).on_device(shots=10, query_shots=5, device="cpu")
    (xs, ys), (xq, yq) = tasks.sample(4000, tasks.generator(0), torch.float64)
    assert xs.shape == ys.shape == (4000, 10, 1) and xq.shape == yq.shape == (4000, 5, 1)
    assert xs.dtype == yq.dtype == torch.float64
    # support and query of a task lie on one sine wave: one fit through both leaves nothing over
    amplitude, phase, residual = sinusoid_fit(torch.cat([xs, xq], 1), torch.cat([ys, yq], 1))
    assert residual.max() < 1e-9
    assert_uniform(amplitude, 0.1, 5.0)
    assert_uniform(phase, 0.0, math.pi)
    assert_uniform(torch.cat([xs, xq], 1).flatten(), -5.0, 5.0)
    # each task its own wave
    assert len(torch.unique(amplitude)) == 4000


def test_the_host_sinusoids_have_the_same_distribution():
    """The reference: SinusoidTasks drawn task by task through the env (split at random) pass the same checks."""
    env = EpisodicEnv(SinusoidTasks(points=15, dtype=torch.float64), shots=10, query_shots=5, regression=True)
    (xs, ys), (xq, yq) = env.sample_tasks(2000)
    amplitude, phase, residual = sinusoid_fit(torch.cat([xs, xq], 1), torch.cat([ys, yq], 1))
    assert residual.max() < 1e-9
    assert_uniform(amplitude, 0.1, 5.0)
    assert_uniform(phase, 0.0, math.pi)


def test_device_sinusoids_resume_their_stream_and_are_checked_against_the_env():
    tasks = SinusoidTasks(points=20).on_device(shots=10, query_shots=10, device="cpu")
    a, b = (EpisodicEnv(tasks, shots=10, regression=True, seed=5) for _ in range(2))
    first = a.sample_tasks(3)
    assert a.on_device and torch.equal(first[0][0], b.sample_tasks(3)[0][0])
    saved, expected = a.state_dict(), a.sample_tasks(3)
    fresh = EpisodicEnv(tasks, shots=10, regression=True, seed=99)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.sample_tasks(3)[1][1], expected[1][1])
    with pytest.raises(ValueError, match="the DeviceSinusoidTasks draws regression tasks of 10 \\+ 10 points; this "
                                         "env asks for 5-way tasks of 10 \\+ 10 examples per class"):
        EpisodicEnv(tasks, ways=5, shots=10)
    with pytest.raises(ValueError, match="a sampled task has 20 points but shots \\+ query_shots = 25 are needed"):
        SinusoidTasks(points=20).on_device(shots=10, query_shots=15, device="cpu")


def test_build_engine_draws_sinusoids_on_the_device_unless_told_otherwise():
    def engine(sampler, source=None):
        return build_engine("maml", MLP(1, 1, (8,)), source or SinusoidTasks(points=10), regression=True, shots=5,
                            meta_batch_size=2, sampler=sampler, verbose=False)

    drawn_on_device = engine("auto")
    assert all(isinstance(env.tasks, DeviceSinusoidTasks)
               for env in (drawn_on_device.env, drawn_on_device.valid_env, drawn_on_device.test_env))
    assert engine("device").env.on_device and not engine("learn2learn").env.on_device
    with pytest.raises(ValueError, match="a sampled task has 10 points but shots \\+ query_shots = 12 are needed"):
        build_engine("maml", MLP(1, 1, (8,)), SinusoidTasks(points=10), regression=True, shots=6, verbose=False)


def test_a_device_source_of_ones_own_must_say_what_it_draws():
    class Mine(DeviceTaskSource):
        shots = 1

        @property
        def device(self):
            return torch.device("cpu")

    with pytest.raises(TypeError, match="^Mine is a DeviceTaskSource but does not set query_shots, ways: the episodes"):
        EpisodicEnv(Mine(), ways=5, shots=1)
