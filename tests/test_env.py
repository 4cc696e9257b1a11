import random

import numpy as np
import pytest
import torch

from bilevel_maml.env import EpisodicEnv


def labelled_source(classes=20, per_class=6, features=3):
    def sample():
        picked = torch.randperm(classes)[:5] + 100  # labels far from 0..4, so remapping shows
        labels = picked.repeat_interleave(per_class)
        inputs = torch.randn(len(labels), features)
        inputs[:, 0] = labels.float()  # the original class travels with each example
        return inputs, labels

    return sample


def reseed_global_streams():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


def global_draws():
    return torch.rand(1), random.random(), np.random.rand()


def test_support_and_query_are_disjoint_balanced_and_relabelled():
    env = EpisodicEnv(labelled_source(), ways=5, shots=2, query_shots=3, seed=0)
    env.step()
    (xs, ys), (xq, yq) = env.batch["support"], env.batch["query"]
    assert sorted(ys.tolist()) == sorted(list(range(5)) * 2)
    assert sorted(yq.tolist()) == sorted(list(range(5)) * 3)
    support_rows = {tuple(r.tolist()) for r in xs}
    assert not support_rows & {tuple(r.tolist()) for r in xq}
    # Remapped label k is the k-th smallest original class, in support and query alike.
    originals = sorted(set(xs[:, 0].tolist()))
    for x, y in ((xs, ys), (xq, yq)):
        assert [originals[k] for k in y.tolist()] == x[:, 0].tolist()


def test_same_seed_same_tasks_and_global_random_state_is_untouched():
    a = EpisodicEnv(labelled_source(), ways=5, shots=1, seed=11)
    b = EpisodicEnv(labelled_source(), ways=5, shots=1, seed=11)
    c = EpisodicEnv(labelled_source(), ways=5, shots=1, seed=12)
    reseed_global_streams()
    expected = global_draws()
    reseed_global_streams()
    for _ in range(3):
        a.step()
        torch.rand(5)  # unrelated draws between tasks must not change the task stream
        b.step()
        assert torch.equal(a.batch["support"][0], b.batch["support"][0])
        assert torch.equal(a.batch["query"][0], b.batch["query"][0])
    c.step()
    assert not torch.equal(c.batch["support"][0], a.batch["support"][0])
    reseed_global_streams()
    a.step()
    assert global_draws() == expected


def test_a_meta_batch_is_the_next_tasks_of_the_stream_and_leaves_the_global_random_state_untouched():
    """``sample_tasks`` switches to the env's random stream once for the whole meta-batch; the tasks
    are those of as many ``sample_task`` calls, the stream goes on from there, and draws outside see
    the global streams as if no task had been drawn."""
    batched = EpisodicEnv(labelled_source(), ways=5, shots=1, query_shots=2, seed=5)
    one_by_one = EpisodicEnv(labelled_source(), ways=5, shots=1, query_shots=2, seed=5)
    reseed_global_streams()
    expected = global_draws()
    reseed_global_streams()
    (xs, ys), (xq, yq) = batched.sample_tasks(4)
    assert global_draws() == expected
    for i in range(4):
        (xs_i, ys_i), (xq_i, yq_i) = one_by_one.sample_task()
        assert torch.equal(xs[i], xs_i) and torch.equal(ys[i], ys_i)
        assert torch.equal(xq[i], xq_i) and torch.equal(yq[i], yq_i)
    assert torch.equal(batched.sample_task()[0][0], one_by_one.sample_task()[0][0])


def test_state_dict_resumes_the_task_stream():
    a = EpisodicEnv(labelled_source(), ways=5, shots=1, seed=3)
    a.step()
    saved = a.state_dict()
    a.step()
    expected = a.batch["support"][0].clone()
    b = EpisodicEnv(labelled_source(), ways=5, shots=1, seed=99)
    b.load_state_dict(saved)
    b.step()
    assert torch.equal(b.batch["support"][0], expected)


def test_regression_split_and_dtype():
    def sample():
        x = torch.linspace(0, 1, 12).unsqueeze(1)
        return x, 2 * x

    env = EpisodicEnv(sample, shots=5, query_shots=7, regression=True, dtype=torch.float64)
    env.step()
    (xs, ys), (xq, yq) = env.batch["support"], env.batch["query"]
    assert xs.shape == (5, 1) and xq.shape == (7, 1) and xs.dtype == ys.dtype == torch.float64
    assert torch.equal(ys, 2 * xs) and torch.equal(yq, 2 * xq)
    assert not set(xs.flatten().tolist()) & set(xq.flatten().tolist())


def test_wrong_class_count_from_a_callable_source_is_reported():
    env = EpisodicEnv(labelled_source(), ways=4, shots=1)
    with pytest.raises(ValueError, match="5 classes but ways=4"):
        env.check()
