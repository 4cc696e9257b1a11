"""The vectorized path (whole meta-batch under torch.func.vmap) gives the per-task meta-gradient."""

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from bilevel_maml import ALGORITHMS, MetaEngine
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.models import Conv4
from bilevel_maml.problems.base import NotVectorizableError, vmap_over_tasks

from conftest import RecordingSGD, random_classification_source


def image_source():
    def sample():
        labels = torch.arange(5).repeat_interleave(3)
        return torch.randn(15, 1, 16, 16, dtype=torch.float64) + labels.view(-1, 1, 1, 1), labels

    return sample


def meta_gradient(algorithm, model, source, vectorize, inner_steps=3):
    upper_cls, lower_cls = ALGORITHMS[algorithm]
    optimizer = RecordingSGD(model.parameters())
    upper_kwargs = {"cg_iterations": 4} if algorithm == "imaml" else {}
    lower_kwargs = {"lam": 0.8} if algorithm == "imaml" else {}
    upper = upper_cls(model, optimizer, meta_batch_size=4, **upper_kwargs)
    lower = lower_cls(model, inner_lr=0.2, inner_steps=inner_steps, **lower_kwargs)
    env = EpisodicEnv(source, ways=5, shots=1, query_shots=2, seed=9)
    engine = MetaEngine(upper, lower, env, meta_iterations=2, vectorize=vectorize)
    assert engine.vectorized == bool(vectorize)
    engine.run()
    return optimizer.seen_grads


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "imaml", "metasgd", "anil", "maml++", "reptile", "boil"])
@pytest.mark.parametrize("make_model, source", [
    (lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)), lambda: random_classification_source(5, 3, 6)),
    (lambda: Conv4(5, in_channels=1, hidden=4, image_size=16), image_source),
], ids=["mlp", "conv-transductive-bn"])
def test_vectorized_and_per_task_meta_gradients_agree(algorithm, make_model, source):
    torch.manual_seed(0)
    model = make_model().double()
    twin = copy.deepcopy(model)
    chunked_twin = copy.deepcopy(model)
    one_each_twin = copy.deepcopy(model)
    per_task = meta_gradient(algorithm, model, source(), vectorize=False)
    vectorized = meta_gradient(algorithm, twin, source(), vectorize=True)
    chunked = meta_gradient(algorithm, chunked_twin, source(), vectorize=2)  # 2 tasks per vmap, 2 chunks
    one_each = meta_gradient(algorithm, one_each_twin, source(), vectorize=1)  # a task axis of 1, 4 chunks
    assert len(per_task) == len(vectorized) == len(chunked) == len(one_each) == 2  # θ moved in between
    for step_a, *steps in zip(per_task, vectorized, chunked, one_each):
        for a, *others in zip(step_a, *steps):
            for b in others:
                assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    assert any(g.abs().max() > 1e-3 for g in per_task[0])


class RunningStatsNet(nn.Module):
    """BatchNorm that updates running statistics in forward: a buffer write vmap cannot batch."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))

    def forward(self, x):
        return self.body(x)


def test_a_model_that_writes_buffers_falls_back_to_the_per_task_path_with_a_warning():
    model = RunningStatsNet()
    upper_cls, lower_cls = ALGORITHMS["maml"]
    upper = upper_cls(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=2)
    lower = lower_cls(model, inner_lr=0.1)
    env = EpisodicEnv(random_classification_source(5, 2, 6, dtype=torch.float32), ways=5, shots=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = MetaEngine(upper, lower, env, meta_iterations=2)
    messages = [str(w.message) for w in caught if "cannot be vectorized" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith("RunningStatsNet cannot be vectorized (RuntimeError: ")
    assert not engine.vectorized
    engine.run()
    assert env.tasks_sampled == 4


def test_a_model_with_dropout_is_vectorized_and_each_task_draws_its_own_mask():
    """Dropout under vmap (which refuses random ops by default) draws for every task on its own, as the
    per-task path does: two identical tasks get different masks, each dropping about half the units."""
    model = nn.Sequential(nn.Linear(6, 400), nn.Dropout(0.5), nn.Tanh(), nn.Linear(400, 5))
    upper_cls, lower_cls = ALGORITHMS["maml"]
    upper = upper_cls(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=4)
    lower = lower_cls(model, inner_lr=0.1)
    env = EpisodicEnv(random_classification_source(5, 2, 6, dtype=torch.float32), ways=5, shots=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot be vectorized" fallback
        engine = MetaEngine(upper, lower, env, meta_iterations=2)
    assert engine.vectorized
    engine.run()
    body = nn.Sequential(model[0], model[1])
    params = tuple(p.detach().expand(2, *p.shape) for p in body.parameters())
    inputs = torch.ones(1, 6).expand(2, 1, 6)  # the same example in two stacked tasks
    names = [name for name, _ in body.named_parameters()]
    with torch.no_grad():
        outputs = vmap_over_tasks(lambda p, x: torch.func.functional_call(body, dict(zip(names, p)), (x,)))(params,
                                                                                                          inputs)
    dropped = outputs == 0
    assert not torch.equal(dropped[0], dropped[1])
    assert 0.4 < dropped.float().mean() < 0.6


class NormClippedLower(ALGORITHMS["maml"][1]):
    """A hook that reads a tensor on the host, which vmap cannot batch."""

    def inner_update(self, params, grads):
        scale = min(1.0, 1.0 / float(sum(g.detach().pow(2).sum() for g in grads)))  # the line named
        return tuple(p - self.inner_lr * scale * g for p, g in zip(params, grads))


class BranchingLower(ALGORITHMS["maml"][1]):
    def inner_loss(self, params, batch):
        loss = super().inner_loss(params, batch)
        return loss * 2 if loss > 1 else loss  # the line named


class ClassCountingLower(ALGORITHMS["maml"][1]):
    """vmap refuses inside PyTorch's Python (torch.unique), below the hook's line."""

    def inner_loss(self, params, batch):
        classes = torch.unique(batch[1]).numel()  # the line named
        return super().inner_loss(params, batch) / classes


@pytest.mark.parametrize("lower_cls, where, what, code", [
    (NormClippedLower, "NormClippedLower.inner_update", "It looks like you're calling .item() on a Tensor",
     "scale = min("),
    (BranchingLower, "BranchingLower.inner_loss",
     "It looks like you're attempting to use a Tensor in some data-dependent control flow", "loss * 2 if"),
    (ClassCountingLower, "ClassCountingLower.inner_loss",
     "We do not support batching operators that can output dynamic shape", "classes = torch.unique("),
])
def test_a_hook_vmap_cannot_batch_is_named_in_one_line_with_the_remedy(lower_cls, where, what, code):
    def engine(vectorize):
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))
        upper = ALGORITHMS["maml"][0](model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=4)
        env = EpisodicEnv(random_classification_source(5, 2, 6, dtype=torch.float32), ways=5, shots=1)
        return MetaEngine(upper, lower_cls(model, inner_lr=0.1), env, meta_iterations=2, vectorize=vectorize)

    line = next(n for n, text in enumerate(Path(__file__).read_text().splitlines(), 1) if code in text)
    with pytest.raises(NotVectorizableError) as raised:
        engine(vectorize=True).run()
    assert str(raised.value) == (
        f"{where} (test_vectorized.py:{line}) cannot run on stacked tasks (vmap: {what}); "
        f"compute with tensor operations only, or adapt tasks one at a time (--no-vectorize; "
        f"build_engine(..., vectorize=False))")
    history = engine(vectorize=False).run()  # the remedy: one task at a time, where a hook may read the host
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)


def test_chunk_size_must_divide_the_meta_batch():
    model = nn.Linear(6, 5)
    upper_cls, lower_cls = ALGORITHMS["maml"]
    with pytest.raises(ValueError, match="vectorize=3 must divide meta_batch_size=4"):
        MetaEngine(upper_cls(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=4),
                   lower_cls(model, inner_lr=0.1),
                   EpisodicEnv(random_classification_source(5, 2, 6, dtype=torch.float32), ways=5, shots=1),
                   vectorize=3)


def test_the_probe_does_not_change_the_task_stream():
    source = random_classification_source(5, 2, 6)
    env = EpisodicEnv(source, ways=5, shots=1, seed=4)
    expected = EpisodicEnv(source, ways=5, shots=1, seed=4).sample_tasks(2)
    model = nn.Linear(6, 5).double()
    upper_cls, lower_cls = ALGORITHMS["fomaml"]
    MetaEngine(upper_cls(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=2),
               lower_cls(model, inner_lr=0.1), env, meta_iterations=1)
    env.step()
    assert torch.equal(env.batch["support"][0], expected[0][0])


CONV4_ACTIVATION = 64 * 28 * 28  # floats of the max-pool conv4's largest activation, per example


@pytest.mark.parametrize("width, per_class, meta_batch, expected_tasks_per_call", [
    (CONV4_ACTIVATION, 2, 32, 16),        # 10 examples a task: 16 tasks fill a call of 160 conv4 examples
    (CONV4_ACTIVATION, 16, 32, 1),        # 80 examples a task: only 2 would fit, task by task is faster on CPU
    (CONV4_ACTIVATION, 16, 2, 2),         # a meta-batch of 2 that fits: vectorized as a whole
    (CONV4_ACTIVATION, 40, 4, 1),         # 200 examples: not even one task fits
    (CONV4_ACTIVATION // 4, 16, 32, 8),   # strided conv4's quarter-size activations: 8 tasks of 80 fit
    (40, 16, 32, 32),                     # a 40-unit MLP: the whole meta-batch
])
def test_the_cpu_auto_rule_sizes_chunks_by_the_models_largest_activation(width, per_class, meta_batch,
                                                                        expected_tasks_per_call):
    model = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 5))
    upper_cls, lower_cls = ALGORITHMS["maml"]
    upper = upper_cls(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=meta_batch)
    lower = lower_cls(model, inner_lr=0.1)
    env = EpisodicEnv(random_classification_source(5, per_class, 6, dtype=torch.float32), ways=5, shots=1,
                      query_shots=per_class - 1)
    engine = MetaEngine(upper, lower, env, meta_iterations=1, vectorize=True, device="cpu")
    assert engine.activation_bytes_per_example == width * 4
    assert engine.tasks_per_step == expected_tasks_per_call
    assert engine.vectorized == (expected_tasks_per_call > 1)
