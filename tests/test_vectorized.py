"""The vectorized path (whole meta-batch under torch.func.vmap) gives the per-task meta-gradient."""

import copy
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap
from torch.utils._python_dispatch import TorchDispatchMode

from bilevel_maml import ALGORITHMS, MetaEngine
from bilevel_maml.data.device_sampler import DeviceTaskSampler
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.execution import _BeforeAnIteration
from bilevel_maml.models import Conv4
from bilevel_maml.problems.base import NotVectorizableError, classification_loss, vmap_over_tasks

from conftest import RecordingSGD, random_classification_source, vmapped_meta_gradient


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


class CountingNormClippedLower(NormClippedLower):
    """Counts its calls in a nested container, changed in place before vmap stops the hook."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {"inner_update": [0]}

    def inner_update(self, params, grads):
        self.calls["inner_update"][0] += 1
        return super().inner_update(params, grads)


class BranchingLower(ALGORITHMS["maml"][1]):
    def inner_loss(self, params, batch):
        loss = super().inner_loss(params, batch)
        return loss * 2 if loss > 1 else loss  # the line named


class ClassCountingLower(ALGORITHMS["maml"][1]):
    """vmap refuses inside PyTorch's Python (torch.unique), below the hook's line."""

    def inner_loss(self, params, batch):
        classes = torch.unique(batch[1]).numel()  # the line named
        return super().inner_loss(params, batch) / classes


class LateBranchingLower(ALGORITHMS["maml"][1]):
    """Reads the host only from the second meta-iteration on, after stacked tasks went through."""

    def on_meta_iteration_start(self, iteration, iterations):
        self.branching = iteration > 1

    def inner_loss(self, params, batch):
        loss = super().inner_loss(params, batch)
        return loss * 2 if self.branching and loss > 1 else loss  # the line named


def device_vectors():
    """Tasks of 6-feature vectors drawn by the device-resident sampler (its own generator)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(12).repeat_interleave(4)
    vectors = torch.randn(48, 6, generator=generator) + labels.view(-1, 1) / 4
    return DeviceTaskSampler(vectors, [range(c * 4, c * 4 + 4) for c in range(12)], ways=5, shots=1, query_shots=1)


def mlp_engine(lower_cls, vectorize, meta_iterations=2, source="callable"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))
    upper = ALGORITHMS["maml"][0](model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=4)
    tasks = random_classification_source(5, 2, 6, dtype=torch.float32) if source == "callable" else device_vectors()
    env = EpisodicEnv(tasks, ways=5, shots=1, seed=1)
    return MetaEngine(upper, lower_cls(model, inner_lr=0.1), env, meta_iterations=meta_iterations,
                      vectorize=vectorize)


def line_of(code: str) -> int:
    return next(n for n, text in enumerate(Path(__file__).read_text().splitlines(), 1) if code in text)


@pytest.mark.parametrize("lower_cls, where, what, code, source", [
    (NormClippedLower, "NormClippedLower.inner_update", "It looks like you're calling .item() on a Tensor",
     "scale = min(", "callable"),
    (BranchingLower, "BranchingLower.inner_loss",
     "It looks like you're attempting to use a Tensor in some data-dependent control flow", "loss * 2 if loss",
     "device sampler"),
    (ClassCountingLower, "ClassCountingLower.inner_loss",
     "We do not support batching operators that can output dynamic shape", "classes = torch.unique(", "callable"),
])
def test_a_hook_vmap_cannot_batch_is_named_in_one_line_and_the_run_goes_on_one_task_at_a_time(lower_cls, where,
                                                                                                what, code, source):
    """The first meta-iteration on stacked tasks stops in the hook; it is put back as it was before
    it began and run again one task at a time, as the rest of the run is: losses, θ and the task
    stream (a callable's global generator, the device sampler's own) end exactly as in a run built
    with vectorize=False. Evaluation likewise, on its own."""
    said = f"{where} (test_vectorized.py:{line_of(code)}) cannot run on stacked tasks (vmap: {what})"
    vectorized, per_task = mlp_engine(lower_cls, True, source=source), mlp_engine(lower_cls, False, source=source)
    with pytest.warns(UserWarning) as caught:
        history = vectorized.run()
    assert [str(w.message) for w in caught] == [f"{said}; adapting tasks one at a time instead"]
    assert [h["loss"] for h in history] == [h["loss"] for h in per_task.run()]
    for a, b in zip(vectorized.meta_learner.trainable_parameters(), per_task.meta_learner.trainable_parameters()):
        assert torch.equal(a, b)
    assert vectorized.env.tasks_sampled == per_task.env.tasks_sampled
    assert torch.equal(vectorized.env.sample_task()[0][0], per_task.env.sample_task()[0][0])  # the stream goes on alike
    assert not vectorized.vectorized and vectorized.evaluation_tasks_per_call == 1

    vectorized, per_task = mlp_engine(lower_cls, True, source=source), mlp_engine(lower_cls, False, source=source)
    assert vectorized.evaluation_tasks_per_call > 1
    with pytest.warns(UserWarning) as caught:
        report = vectorized.evaluate(vectorized.env, 12, per_task=True)
    assert [str(w.message) for w in caught] == [f"{said}; scoring tasks one at a time instead"]
    assert report == per_task.evaluate(per_task.env, 12, per_task=True)


def test_what_the_stopped_meta_iteration_changed_in_place_in_nested_containers_is_put_back():
    vectorized, per_task = mlp_engine(CountingNormClippedLower, True), mlp_engine(CountingNormClippedLower, False)
    with pytest.warns(UserWarning, match="adapting tasks one at a time instead"):
        vectorized.run()
    per_task.run()
    assert vectorized.task_learner.calls == per_task.task_learner.calls == {"inner_update": [8]}  # 2 × 4 tasks


def test_being_ready_to_redo_a_meta_iteration_does_not_copy_what_grows_with_the_run():
    """Every eager vectorized meta-iteration takes a snapshot to redo it one task at a time; the
    engine's history grows by an entry per iteration (between them, never in one), so copying it
    would make each snapshot cost more than the last. A problem's own lists are copied."""
    engine = mlp_engine(ALGORITHMS["maml"][1], True, meta_iterations=3)
    engine.run()
    engine.task_learner.schedule = [0.1, 0.2]
    before = _BeforeAnIteration(engine)
    assert before.engine_attributes["history"] is engine.history and len(engine.history) == 3
    engine.task_learner.schedule.append(0.3)
    engine.global_step += 5
    before.restore()
    assert engine.task_learner.schedule == [0.1, 0.2] and engine.global_step == 3
    assert engine.history == before.engine_attributes["history"] and len(engine.history) == 3


@pytest.mark.parametrize("source", ["callable", "device sampler"])
def test_a_hook_that_stops_stacked_tasks_only_at_a_later_meta_iteration_falls_back_there(source):
    """Iteration 1 runs on stacked tasks; iteration 2, which the hook stops, is put back and run
    one task at a time, as iteration 3 is: the run ends as one built with vectorize=False (to
    float rounding, iteration 1's sums being taken in another order), the task stream exactly."""
    vectorized, per_task = mlp_engine(LateBranchingLower, True, meta_iterations=3, source=source), \
        mlp_engine(LateBranchingLower, False, meta_iterations=3, source=source)
    with pytest.warns(UserWarning) as caught:
        history = vectorized.run()
    assert [str(w.message) for w in caught] == [
        f"LateBranchingLower.inner_loss (test_vectorized.py:{line_of('loss * 2 if self.branching')}) cannot run "
        f"on stacked tasks (vmap: It looks like you're attempting to use a Tensor in some data-dependent control "
        f"flow); adapting tasks one at a time instead"]
    assert not vectorized.vectorized and vectorized.meta_iteration == 3
    expected = per_task.run()
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in expected], rel=1e-6)
    for a, b in zip(vectorized.meta_learner.trainable_parameters(), per_task.meta_learner.trainable_parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert vectorized.env.tasks_sampled == per_task.env.tasks_sampled
    assert torch.equal(vectorized.env.sample_task()[0][0], per_task.env.sample_task()[0][0])


def test_not_vectorizable_error_names_the_hook_and_the_remedy_and_pickles_back():
    engine = mlp_engine(LateBranchingLower, True)
    engine.task_learner.branching = True
    tasks = engine.env.sample_tasks(4)[0]
    with pytest.raises(NotVectorizableError) as raised:
        engine.task_learner.over_tasks(engine.task_learner.inner_loss,
                                       tuple(p.expand(4, *p.shape) for p in engine.meta_learner.module.parameters()),
                                       tasks)
    assert str(raised.value) == (
        f"LateBranchingLower.inner_loss (test_vectorized.py:{line_of('loss * 2 if self.branching')}) cannot run on "
        f"stacked tasks (vmap: It looks like you're attempting to use a Tensor in some data-dependent control flow); "
        f"compute with tensor operations only, or adapt tasks one at a time (--no-vectorize; "
        f"build_engine(..., vectorize=False))")
    assert str(pickle.loads(pickle.dumps(raised.value))) == str(raised.value)  # as another process would see it


def test_chunk_size_must_divide_the_meta_batch():
    model = nn.Linear(6, 5)
    upper_cls, lower_cls = ALGORITHMS["maml"]
    with pytest.raises(ValueError, match="vectorize=3 must divide meta_batch_size=4"):
        MetaEngine(upper_cls(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=4),
                   lower_cls(model, inner_lr=0.1),
                   EpisodicEnv(random_classification_source(5, 2, 6, dtype=torch.float32), ways=5, shots=1),
                   vectorize=3)


@pytest.mark.parametrize("vectorize", [True, False])
def test_the_probe_does_not_change_the_task_stream(vectorize):
    """Neither the vmap probe nor the check that the model takes the tasks (one task, task by task)."""
    source = random_classification_source(5, 2, 6)
    env = EpisodicEnv(source, ways=5, shots=1, seed=4)
    expected = EpisodicEnv(source, ways=5, shots=1, seed=4).sample_tasks(2)
    model = nn.Linear(6, 5).double()
    upper_cls, lower_cls = ALGORITHMS["fomaml"]
    MetaEngine(upper_cls(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=2),
               lower_cls(model, inner_lr=0.1), env, meta_iterations=1, vectorize=vectorize)
    env.step()
    assert torch.equal(env.batch["support"][0], expected[0][0] if vectorize else expected[0][0][0])


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


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_default_classification_loss_is_cross_entropy_without_its_ignore_index_masks_under_vmap():
    """Under vmap, F.cross_entropy's nll_loss runs as a decomposition that masks ignore_index (ne,
    where) at every order of derivative, a kernel each on a GPU; the default loss picks the
    log-probabilities there instead: the same losses and meta-gradient to the bit, without those ops."""
    torch.manual_seed(0)
    w = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    inputs = (torch.randn(6, 7, 10, dtype=torch.float64), torch.randint(0, 5, (6, 7)))

    def run(loss_fn):
        def loss(p, batch):
            return loss_fn(batch[0] @ p[0], batch[1])

        with OpNames() as dispatched:
            losses = vmap(loss)((w.expand(6, 10, 5),), inputs)
            meta_gradient = vmapped_meta_gradient(loss, (w.expand(6, 10, 5),), inputs, (w,))[0]
        return losses, meta_gradient, dispatched.names

    ours, reference = run(classification_loss), run(F.cross_entropy)
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    assert {"ne", "where"} <= reference[2], "the reference no longer masks: this test has lost its point"
    assert not {"ne", "where"} & ours[2], ours[2]
    # outside vmap (the per-task path) it is F.cross_entropy itself
    scores, labels = torch.randn(7, 5, requires_grad=True), torch.randint(0, 5, (7,))
    assert torch.equal(classification_loss(scores, labels), F.cross_entropy(scores, labels))
