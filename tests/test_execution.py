"""How meta-iterations execute: one host read per eager iteration, a capturable region that reads
nothing on the host, the device-side non-finite check, and the CUDA-graph strategy's logic (on CPU
with stand-ins for its two CUDA-only operations; on a GPU for real)."""

import contextlib
import copy
import math
import warnings
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch import nn

from bilevel_maml import (ALGORITHMS, MAMLLower, MAMLPlusPlusLower, MAMLPlusPlusUpper, MAMLUpper, MetaEngine,
                          build_engine, models)
from bilevel_maml.data import SinusoidTasks
from bilevel_maml.data.device_sampler import DeviceTaskSampler
from bilevel_maml.engine import NonFiniteError
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.execution import (CapturedExecution, HostReadWatch, RecordedState, advance_counters,
                                    capture_blocker, changed_setting, python_state, restore_python_state,
                                    settings)
from bilevel_maml.models import Conv4

from conftest import first_host_read_in_capturable_region, random_classification_source

CLASSES, PER_CLASS = 12, 4


def device_tasks(dtype=torch.float64, seed=0, poison_after=None):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    images = torch.randn(CLASSES * PER_CLASS, 1, 16, 16, generator=generator, dtype=dtype) + labels.view(-1, 1, 1, 1) / 4
    members = [range(c * PER_CLASS, (c + 1) * PER_CLASS) for c in range(CLASSES)]
    return DeviceTaskSampler(images, members, ways=5, shots=1, query_shots=2)


class L2Lower(MAMLLower):
    """A user's variant on the public hooks only: an L2 pull towards θ in the inner loss."""

    def inner_loss(self, params, batch):
        theta = self.meta_learner.initialization()
        return self.task_loss(params, batch) + 0.1 * sum(((p - t) ** 2).sum() for p, t in zip(params, theta))


class ReadingLower(MAMLLower):
    """A variant that reads a tensor on the host in its inner loss (logging a value, say)."""

    def inner_loss(self, params, batch):
        loss = self.task_loss(params, batch)
        self.last_loss = float(loss)
        return loss


VARIANTS = {**ALGORITHMS, "l2 (user variant)": (MAMLUpper, L2Lower)}


def engine(algorithm="maml", vectorize=True, optimizer=None, meta_batch=4, inner_steps=2, sampler=None, cuda_graph=None,
           **env_options):
    torch.manual_seed(0)
    model = Conv4(5, hidden=4, image_size=16).double()
    upper_cls, lower_cls = VARIANTS[algorithm] if isinstance(algorithm, str) else algorithm
    optimizer = (optimizer or (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)))(model.parameters())
    extra = ({"cg_iterations": 3}, {"lam": 0.5}) if algorithm == "imaml" else ({}, {})
    upper = upper_cls(model, optimizer, meta_batch_size=meta_batch, **extra[0])
    lower = lower_cls(model, inner_lr=0.1, inner_steps=inner_steps, **extra[1])
    env = EpisodicEnv(sampler or device_tasks(), ways=5, shots=1, query_shots=2, seed=3, **env_options)
    return MetaEngine(upper, lower, env, meta_iterations=10, vectorize=vectorize, cuda_graph=cuda_graph)


class CountingWatch(HostReadWatch):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in {"item", "tolist", "numpy", "__bool__", "__float__", "__int__",
                                             "__index__", "__format__", "nonzero", "unique"}:
            self.reads.append(func.__name__)
        return super().__torch_function__(func, types, args, kwargs)


@pytest.mark.parametrize("vectorize", [False, True], ids=["per-task", "vectorized"])
@pytest.mark.parametrize("algorithm", list(VARIANTS))
def test_an_eager_meta_iteration_reads_the_host_once(algorithm, vectorize):
    """Betty's get_loss and the old statistics read every step; now one transfer per meta-iteration
    carries the statistics and the non-finite checks."""
    built = engine(algorithm, vectorize)
    built.train()
    built.meta_step()
    watch = CountingWatch()
    with watch:
        stats = built.meta_step()
    assert watch.reads == ["tolist"], watch.reads
    assert {"loss", "accuracy", "lr"} <= set(stats) <= {"loss", "accuracy", "final_step_loss", "lr"} and math.isfinite(stats["loss"])


@pytest.mark.parametrize("vectorize", [False, True], ids=["per-task", "vectorized"])
@pytest.mark.parametrize("algorithm", list(VARIANTS))
def test_with_the_check_on_the_device_the_capturable_region_reads_nothing(algorithm, vectorize):
    built = engine(algorithm, vectorize)
    first = first_host_read_in_capturable_region(built)
    assert first is None, first
    assert math.isfinite(built.meta_learner.end_iteration()["loss"])


@pytest.mark.parametrize("algorithm", ["maml", "imaml"])
def test_closed_form_batch_norm_task_by_task_reads_nothing_in_the_capturable_region(algorithm, monkeypatch):
    """Task by task these small activations would take PyTorch's BatchNorm; forced onto the closed form
    (as a larger model's are), the region still never reads the host."""
    monkeypatch.setattr(models.BatchNorm2d, "closed_form_min_size", 0)
    built = engine(algorithm, vectorize=False)
    with mock.patch.object(models, "batch_norm", wraps=models.batch_norm) as closed_form:
        first = first_host_read_in_capturable_region(built)
    assert closed_form.called and first is None, first
    assert math.isfinite(built.meta_learner.end_iteration()["loss"])


def test_a_hook_that_reads_the_host_is_named_with_its_line():
    built = engine((MAMLUpper, ReadingLower), vectorize=False)  # (under vmap a host read is an error of its own)
    first = first_host_read_in_capturable_region(built, warm_up=False)
    assert first.startswith("ReadingLower.inner_loss (test_execution.py:"), first
    assert first.endswith("reads a tensor on the host (__float__)")


def poisoned(after_tasks):
    """A device sampler whose draws turn NaN after ``after_tasks`` tasks."""
    sampler = device_tasks()
    plain = sampler.sample
    drawn = [0]

    def sample(count, generator, dtype=None):
        (xs, ys), (xq, yq) = plain(count, generator, dtype)
        drawn[0] += count
        return (xs, ys), (xq * (math.nan if drawn[0] > after_tasks else 1.0), yq)

    sampler.sample = sample
    return sampler


def adam(params):
    return torch.optim.Adam(params, lr=0.01)


@pytest.mark.parametrize("first_iteration", [False, True], ids=["with-state", "before-any-state"])
def test_a_failed_device_side_check_undoes_the_step_and_leaves_theta_and_adam_unchanged(first_iteration):
    # the env draws 2 tasks to probe vmap (restored), then 4 a meta-iteration
    built = engine("maml", vectorize=True, optimizer=adam, sampler=poisoned(2 + (0 if first_iteration else 4)))
    built.train()
    if not first_iteration:
        built.meta_step()
    params = [p.detach().clone() for p in built.meta_learner.trainable_parameters()]
    state = copy.deepcopy(built.meta_learner.optimizer.state_dict()["state"])
    built.meta_learner.check_on_device = True
    built.execution.run_tasks()
    with pytest.raises(NonFiniteError, match="^the query loss is nan$"):
        built.meta_learner.end_iteration()
    for before, after in zip(params, built.meta_learner.trainable_parameters()):
        assert torch.equal(before, after)
    after_state = built.meta_learner.optimizer.state_dict()["state"]
    if first_iteration:  # the state the step created is reset to a fresh (zero) one
        assert all(torch.count_nonzero(t) == 0 for s in after_state.values() for t in s.values())
    else:
        for key, values in state.items():
            for name, tensor in values.items():
                assert torch.equal(tensor, after_state[key][name]), name


def test_the_device_side_check_takes_the_same_step_when_all_is_finite():
    host, device = engine(optimizer=adam), engine(optimizer=adam)
    for built in (host, device):
        built.train()
    device.meta_learner.check_on_device = True
    for _ in range(3):
        stats = host.meta_step()
        stats.pop("lr")  # (added by the engine's meta_step, around the execution's)
        device.execution.run_tasks()
        assert device.meta_learner.end_iteration() == stats
    for a, b in zip(host.meta_learner.trainable_parameters(), device.meta_learner.trainable_parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("vectorize", [False, 2, True], ids=["per-task", "chunks", "whole-batch"])
def test_advance_counters_does_to_python_state_what_an_eager_iteration_does(vectorize):
    built = engine("fomaml", vectorize)
    built.train()
    objects = {"engine": built, "upper": built.meta_learner, "lower": built.task_learner, "env": built.env}
    built.meta_step()
    before = python_state(objects)
    built.meta_step()
    after = python_state(objects)
    assert after != before
    restore_python_state(objects, before)
    advance_counters(built)
    assert python_state(objects) == after


def test_the_python_state_a_capture_saves_is_put_back_with_its_types_and_its_own_containers():
    """A capture saves the plain attributes and puts them back after recording: a tuple comes back
    a tuple (the Lower's adapted indices compare their key with a tuple), and lists inside it are
    copies that the capture's changes in place did not reach."""
    built = engine()
    built.train()
    built.meta_step()
    lower = built.task_learner
    lower.schedule = (0.1, [0.2, 0.3])
    adapted = lower._adapted
    objects = {"lower": lower}
    saved = python_state(objects)
    lower.schedule[1].append(0.4)
    restore_python_state(objects, saved)
    assert lower.schedule == (0.1, [0.2, 0.3]) and type(lower.schedule) is tuple
    assert lower._adapted == adapted and type(lower._adapted) is tuple and type(lower.adapted_indices()) is tuple
    restore_python_state(objects, saved)
    lower.schedule[1].append(0.5)
    assert saved[("lower", "schedule")] == (0.1, [0.2, 0.3])  # the saved state keeps its own lists


def test_what_stops_a_capture_is_said_before_running():
    assert capture_blocker(engine()) is None
    assert capture_blocker(engine(optimizer=adam)) is None
    assert capture_blocker(engine(optimizer=lambda p: torch.optim.Adafactor(p))) == \
        "Adafactor has no capturable mode (Adam, AdamW, RMSprop and SGD do)"
    with_scheduler = engine()
    with_scheduler.meta_learner.lr_scheduler = torch.optim.lr_scheduler.StepLR(with_scheduler.meta_learner.optimizer, 5)
    assert "SGD's learning rate is a number fixed into the graph" in capture_blocker(with_scheduler)
    with_cosine = engine()
    with_cosine.meta_learner.meta_lr_schedule = "cosine"
    assert "SGD's learning rate is a number fixed into the graph" in capture_blocker(with_cosine)
    vectors = random_classification_source(5, 3, 16 * 16)
    on_host = engine(sampler=lambda: (lambda x, y: (x.view(-1, 1, 16, 16), y))(*vectors()), vectorize=False)
    assert capture_blocker(on_host).startswith("the training tasks are drawn on the host")
    distributed = engine()
    distributed.world_size = 2
    assert capture_blocker(distributed).startswith("with several processes")


def test_cuda_graphs_are_a_cuda_matter():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine().execution.name == "eager" and engine().eager_reason is None
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^cuda_graph=True needs a CUDA device, the engine is on cpu$"):
            engine(cuda_graph=True)


def test_a_checkpoint_of_a_captured_run_resumes_eagerly():
    """A captured CUDA run saves its optimizer in capturable mode (with a scheduler, its learning rate
    as a tensor); an eager engine, on a CPU say, switches it back when it loads the checkpoint."""
    source = engine(optimizer=adam)
    source.train()
    source.meta_step()
    for group in source.meta_learner.optimizer.param_groups:
        group["capturable"], group["lr"] = True, torch.tensor(0.01)
    resumed = engine(optimizer=adam)
    resumed.load_state_dict(source.state_dict())
    resumed.train()
    assert math.isfinite(resumed.meta_step()["loss"])  # capturable Adam would refuse CPU tensors here
    assert all(g["capturable"] is False and g["lr"] == pytest.approx(0.01)
               for g in resumed.meta_learner.optimizer.param_groups)


# -- the captured strategy's logic, with CPU stand-ins for its CUDA-only operations ----------------
class CPUReplay:
    """What a replayed graph does: the recorded kernels again, none of the recorded Python's side
    effects (counters, flags) — so those are put back after running it — and with the problems'
    numbers of the moment they were recorded (a number a hook read is a constant in the kernels)."""

    def __init__(self, run, objects, engine):
        self.run, self.objects, self.engine, self.replays = run, objects, engine, 0
        # the problems' numbers, and the tensors whose memory the kernels read
        self.recorded = {(side, name): getattr(value, "obj", value) for (side, name), value in settings(engine).items()
                         if "." not in name}

    def replay(self):
        saved = python_state(self.objects)
        restore_python_state(self.objects, self.recorded)
        self.run()
        restore_python_state(self.objects, saved)
        self.replays += 1


class CapturedOnCPU(CapturedExecution):
    fail_with = None

    def _on_side_stream(self):
        return contextlib.nullcontext()

    def _record(self, run):
        if self.fail_with is not None:
            raise self.fail_with
        return CPUReplay(run, self._objects(), self.engine)


def run_both(algorithm="maml", iterations=CapturedExecution.WARMUP_ITERATIONS + 3, fail_with=None, **options):
    eager, captured = engine(algorithm, **options), engine(algorithm, **options)
    strategy = CapturedOnCPU(captured)
    strategy.fail_with = fail_with
    captured.use_execution(strategy)
    for built in (eager, captured):
        built.meta_iterations = iterations
        built.run()
    return eager, captured, strategy


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "imaml", "metasgd", "anil", "maml++", "reptile", "boil",
                                       "l2 (user variant)"])
def test_captured_iterations_equal_eager_ones(algorithm):
    eager, captured, strategy = run_both(algorithm)
    assert captured.execution is strategy and strategy.graph.replays == 3
    for a, b in zip(eager.meta_learner.trainable_parameters(), captured.meta_learner.trainable_parameters()):
        assert torch.equal(a, b)
    assert [h["loss"] for h in eager.history] == [h["loss"] for h in captured.history]
    for counter in ("global_step", "meta_iteration"):
        assert getattr(eager, counter) == getattr(captured, counter)
    assert eager.env.tasks_sampled == captured.env.tasks_sampled == 6 * 4 + 0
    assert eager.task_learner._count == captured.task_learner._count
    assert torch.equal(eager.env.generator.get_state(), captured.env.generator.get_state())


def sinusoid_engine(sampler="auto", device="cpu", cuda_graph=None, optimizer="adam",
                    iterations=CapturedExecution.WARMUP_ITERATIONS + 3, **options):
    torch.manual_seed(0)
    return build_engine("maml", models.MLP(1, 1, (16, 16)), SinusoidTasks(points=10), regression=True, shots=5,
                        optimizer=optimizer, inner_lr=0.1, inner_steps=2, meta_batch_size=4,
                        meta_iterations=iterations, valid_step=10**9, device=device,
                        sampler=sampler, cuda_graph=cuda_graph, precision="fp32", verbose=False, **options)


def test_sinusoid_regression_drawn_on_the_device_runs_captured():
    """The sinusoid example's engine draws its tasks on the device by default, so nothing stops a
    capture: its capturable region reads nothing on the host, and replays equal eager iterations.
    (SGD here: Adam's capturable mode, which CUDA runs switch on, keeps its step count on a CUDA device.)"""
    assert capture_blocker(sinusoid_engine("learn2learn")).startswith("the training tasks are drawn on the host")
    assert capture_blocker(sinusoid_engine()) is None
    assert first_host_read_in_capturable_region(sinusoid_engine(optimizer="sgd")) is None
    eager, captured = sinusoid_engine(optimizer="sgd"), sinusoid_engine(optimizer="sgd")
    strategy = CapturedOnCPU(captured)
    captured.use_execution(strategy)
    for run in (eager, captured):
        run.run()
    assert strategy.graph.replays == 3
    assert all(torch.equal(a, b) for a, b in zip(eager.meta_learner.trainable_parameters(),
                                                 captured.meta_learner.trainable_parameters()))
    assert torch.equal(eager.env.generator.get_state(), captured.env.generator.get_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_sinusoid_engine_runs_captured_and_equals_eager():
    eager, captured = sinusoid_engine(device="cuda", cuda_graph=False), sinusoid_engine(device="cuda")
    for run in (eager, captured):
        run.run()
    assert captured.execution.name == "cuda-graph" and captured.execution.graph is not None, captured.eager_reason
    assert max((a - b).abs().max().item() for a, b in zip(eager.meta_learner.trainable_parameters(),
                                                          captured.meta_learner.trainable_parameters())) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_a_cosine_schedule_reaches_the_replays_and_a_resumed_run_re_spans_it():
    """The captured step reads the rate from the device tensor the schedule fills in place before
    each replay: θ equals eager θ, every iteration logs the formula's rate, and an engine loaded from
    the checkpoint with more iterations (rates already device tensors, Adam capturable) continues
    the cosine over the new total, captured again."""
    total = CapturedExecution.WARMUP_ITERATIONS + 3
    eager, captured = (sinusoid_engine(device="cuda", cuda_graph=graph, meta_lr_schedule="cosine", min_meta_lr=1e-4)
                       for graph in (False, None))
    for run in (eager, captured):
        run.run()
    assert captured.execution.name == "cuda-graph" and captured.execution.graph is not None, captured.eager_reason
    assert max((a - b).abs().max().item() for a, b in zip(eager.meta_learner.trainable_parameters(),
                                                          captured.meta_learner.trainable_parameters())) <= 1e-5

    def cosine(iteration, iterations):
        return 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * (iteration - 1) / iterations))

    assert [h["lr"] for h in captured.history] == pytest.approx([cosine(i, total) for i in range(1, total + 1)])
    extended = sinusoid_engine(device="cuda", iterations=total + 4, meta_lr_schedule="cosine", min_meta_lr=1e-4)
    extended.load_state_dict(captured.state_dict())
    extended.run()
    assert extended.execution.name == "cuda-graph", extended.eager_reason
    assert [h["lr"] for h in extended.history[total:]] == pytest.approx(
        [cosine(i, total + 4) for i in range(total + 1, total + 5)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_a_dropout_model_runs_captured_and_every_replay_draws_new_masks():
    """Dropout's masks come from the default CUDA generator, which a capture registers: each replay
    must move its state on (a graph that replayed the recorded masks would leave it unchanged)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    built = build_engine("maml", model, SinusoidTasks(points=10), regression=True, shots=5, inner_lr=0.1,
                         inner_steps=2, meta_batch_size=4, meta_iterations=CapturedExecution.WARMUP_ITERATIONS + 3,
                         valid_step=10**9, device="cuda", precision="fp32", verbose=False)
    states = []

    class RandomState:
        def on_iteration_end(self, engine, metrics):
            states.append(torch.cuda.get_rng_state(engine.device))

    built.callbacks.append(RandomState())
    built.run()
    assert built.execution.name == "cuda-graph" and built.execution.graph is not None, built.eager_reason
    replays = states[-3:]
    assert not any(torch.equal(a, b) for a, b in zip(replays, replays[1:]))
    assert all(math.isfinite(h["loss"]) for h in built.history)


class SwitchingLower(MAMLPlusPlusLower):
    """Turns second order after the first capture."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, first_order_iterations=CapturedExecution.WARMUP_ITERATIONS + 1, **kwargs)


class FixedRateUpper(MAMLPlusPlusUpper):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, cosine_lr=False, **kwargs)


def test_a_schedule_that_changes_the_computation_is_warmed_up_and_recorded_again():
    warmups = CapturedExecution.WARMUP_ITERATIONS
    records = []

    class Counting(CapturedOnCPU):
        def _record(self, run):
            records.append(self.engine.task_learner.second_order)
            return super()._record(run)

    eager, captured = engine((FixedRateUpper, SwitchingLower)), engine((FixedRateUpper, SwitchingLower))
    strategy = Counting(captured)
    captured.use_execution(strategy)
    for built in (eager, captured):
        built.meta_iterations = 2 * warmups + 3  # warm-ups, a first-order capture, warm-ups, a second-order one
        built.run()
    assert records == [False, True] and strategy.graph.replays == 2  # the capturing iteration replays too
    for a, b in zip(eager.meta_learner.trainable_parameters(), captured.meta_learner.trainable_parameters()):
        assert torch.equal(a, b)


def test_a_variant_that_reads_the_host_falls_back_after_its_first_warm_up_saying_where():
    with pytest.warns(UserWarning, match=r"^CUDA graph off, the meta-iteration runs eagerly: "
                                         r"ReadingLower.inner_loss \(test_execution.py:\d+\) reads a tensor on the "
                                         r"host \(__float__\)$"):
        eager, captured, strategy = run_both((MAMLUpper, ReadingLower), vectorize=False)
    assert captured.execution.name == "eager" and strategy.warmups_done == 1 and strategy.graph is None
    assert not captured.meta_learner.check_on_device
    for a, b in zip(eager.meta_learner.trainable_parameters(), captured.meta_learner.trainable_parameters()):
        assert torch.equal(a, b)


class AnnealedL2Lower(MAMLLower):
    """L2Lower's pull, weakened every meta-iteration; held as a Python number."""

    def on_meta_iteration_start(self, iteration, iterations):
        self.strength = 0.5 / iteration

    def inner_loss(self, params, batch):
        theta = self.meta_learner.initialization()
        return self.task_loss(params, batch) + self.strength * sum(((p - t) ** 2).sum() for p, t in zip(params, theta))


class AnnealedInPlaceL2Lower(AnnealedL2Lower):
    """The same schedule, held in a tensor the hook fills in place: what a replay reads."""

    def on_meta_iteration_start(self, iteration, iterations):
        if not isinstance(getattr(self, "strength", None), torch.Tensor):
            self.strength = torch.zeros((), dtype=torch.float64)
        self.strength.fill_(0.5 / iteration)


class AnnealedNewTensorL2Lower(AnnealedL2Lower):
    """A new tensor every meta-iteration: a graph would go on reading the one it was recorded with."""

    def on_meta_iteration_start(self, iteration, iterations):
        self.strength = torch.tensor(0.5 / iteration, dtype=torch.float64)


def test_a_number_or_tensor_a_schedule_rebinds_after_the_capture_falls_back_naming_it():
    """A replay computes with the numbers of the moment it was recorded (CPUReplay does as a graph
    does). A schedule kept in a Python number would silently stay at its capture-time value; it
    falls back to eager instead, naming the attribute and the remedy, and held in a tensor filled
    in place it runs captured; bound to a new tensor each time it falls back too. Each equals eager θ."""
    warmups = CapturedExecution.WARMUP_ITERATIONS
    with pytest.warns(UserWarning, match=rf"^CUDA graph off, the meta-iteration runs eagerly: AnnealedL2Lower\.strength "
                                         rf"changed after the capture \({0.5 / (warmups + 1)!r} → {0.5 / (warmups + 2)!r}\), "
                                         r"and a replay computes with the value it was recorded with; hold a value "
                                         r"that changes during training in a tensor updated in place \(\.fill_\), "
                                         r"or return it from structure\(\) to record the graph again when it changes$"):
        eager, captured, strategy = run_both((MAMLUpper, AnnealedL2Lower))
    assert captured.execution.name == "eager" and strategy.graph.replays == 1
    assert eager.meta_iteration == captured.meta_iteration == warmups + 3
    for a, b in zip(eager.meta_learner.trainable_parameters(), captured.meta_learner.trainable_parameters()):
        assert torch.equal(a, b)

    eager, captured, strategy = run_both((MAMLUpper, AnnealedInPlaceL2Lower))
    assert captured.execution is strategy and strategy.graph.replays == 3
    for a, b in zip(eager.meta_learner.trainable_parameters(), captured.meta_learner.trainable_parameters()):
        assert torch.equal(a, b)

    with pytest.warns(UserWarning, match=r"^CUDA graph off, the meta-iteration runs eagerly: AnnealedNewTensorL2Lower\."
                                         r"strength changed after the capture \(a tensor of shape \(\) at 0x[0-9a-f]+ → "
                                         r"a tensor of shape \(\) at 0x[0-9a-f]+\), and a replay computes"):
        eager, captured, strategy = run_both((MAMLUpper, AnnealedNewTensorL2Lower))
    assert captured.execution.name == "eager" and strategy.graph.replays == 1
    for a, b in zip(eager.meta_learner.trainable_parameters(), captured.meta_learner.trainable_parameters()):
        assert torch.equal(a, b)


def _bind_equal_float(problems):
    problems["lower"].inner_lr = float(str(problems["lower"].inner_lr))  # another object, the same number


def _change_a_list_of_numbers_in_place(problems):
    problems["lower"].param_names[0] = "renamed"


def _turn_a_list_of_objects_into_numbers(problems):
    problems["upper"]._children.clear()
    problems["upper"]._children.append(3)


def _swap_a_relu_for(kind):
    def swap(problems):
        problems["upper"].module.features[0][2] = kind()
    return swap


CHANGES_AFTER_A_CAPTURE = {
    "nothing": lambda problems: None,
    "Betty's counters": lambda problems: setattr(problems["lower"], "_count", problems["lower"]._count + 7),
    "an int bound anew to itself": lambda problems: setattr(problems["lower"], "inner_step", 1),
    "a float bound to an equal one": _bind_equal_float,
    "a float changed": lambda problems: setattr(problems["lower"], "inner_lr", 0.2),
    "a list of numbers changed in place": _change_a_list_of_numbers_in_place,
    "a list of numbers bound to an equal one": lambda problems: setattr(problems["lower"], "param_names",
                                                                         list(problems["lower"].param_names)),
    "a list of objects changed into numbers": _turn_a_list_of_objects_into_numbers,
    "a dict of numbers changed in place": lambda problems: problems["lower"].schedule.update(strength=0.25),
    "a dict of numbers bound to an equal one": lambda problems: setattr(problems["lower"], "schedule",
                                                                         dict(problems["lower"].schedule)),
    "a list in a dict changed in place": lambda problems: problems["lower"].schedule["per_step"].append(0.3),
    "a list in a tuple changed in place": lambda problems: problems["lower"].steps[1].append(0.3),
    "a new number": lambda problems: setattr(problems["upper"], "strength", 0.5),
    "a new object": lambda problems: setattr(problems["upper"], "helper", object()),
    "an attribute deleted": lambda problems: delattr(problems["upper"], "log_step"),
    "a tensor bound anew": lambda problems: setattr(problems["lower"], "strength", torch.zeros(())),
    "a list of tensors changed in place": lambda problems: problems["lower"].trajectory.append(torch.zeros(2)),
    "a layer's flag changed": lambda problems: setattr(problems["upper"].module.features[0][0], "grouped_grads", True),
    "the model put in eval mode": lambda problems: problems["upper"].module.eval(),
    "a layer swapped for another kind": _swap_a_relu_for(nn.GELU),
    "a layer swapped for an equal one": _swap_a_relu_for(models.ReLU),
    "a buffer filled in place": lambda problems: problems["upper"].module.features[0][1].scale.fill_(2.0),
    "a buffer bound anew": lambda problems: setattr(problems["upper"].module.features[0][1], "scale", torch.ones(())),
}


@pytest.mark.parametrize("change", CHANGES_AFTER_A_CAPTURE)
def test_the_replay_check_says_changed_exactly_when_the_full_comparison_would(change):
    """RecordedState skips comparing settings() while no attribute was bound anew; its verdict is
    the full comparison's in every case: rebound to equal values, changed in place, added, deleted,
    of the problems and of their model's layers."""
    built = engine()
    built.train()
    built.meta_step()
    if change == "a tensor bound anew":
        built.task_learner.strength = torch.zeros(())
    built.task_learner.schedule = {"strength": 0.5, "per_step": [0.1, 0.2]}
    built.task_learner.steps = (0.1, [0.2])
    built.meta_learner.module.features[0][1].register_buffer("scale", torch.ones(()))
    recorded = RecordedState(built)
    problems = {"upper": built.meta_learner, "lower": built.task_learner}
    CHANGES_AFTER_A_CAPTURE[change](problems)
    assert recorded.settings_changed(built) == (settings(built) != recorded.settings)
    assert recorded.settings_changed(built) == (change in {
        "a float changed", "a list of numbers changed in place", "a list of objects changed into numbers",
        "a dict of numbers changed in place", "a list in a dict changed in place", "a list in a tuple changed in place",
        "a new number", "an attribute deleted", "a tensor bound anew", "a layer's flag changed",
        "the model put in eval mode", "a layer swapped for another kind", "a buffer bound anew"})


def test_a_changed_layer_is_named_by_its_path_in_the_model():
    built = engine()
    built.train()
    built.meta_step()
    recorded = settings(built)
    layers = built.meta_learner.module.features[0]
    layers[0].grouped_grads = True
    assert changed_setting(built, recorded).startswith(
        "MAMLUpper.module.features.0.0.grouped_grads changed after the capture (False → True), and a replay computes")
    layers[0].grouped_grads = False
    layers[2] = nn.GELU()
    assert changed_setting(built, recorded).startswith(
        "MAMLUpper.module.features.0.2.__class__ changed after the capture (ReLU → GELU), and a replay computes")


class KernelsOnlyReplay(CapturedOnCPU):
    """Replays that run none of the recorded Python, as a CUDA graph's do (CPUReplay runs it all
    again, binding every attribute it sets anew)."""

    def _record(self, run):
        run()
        return SimpleNamespace(replay=lambda: None)


def test_replays_whose_hooks_change_nothing_skip_the_full_comparison_and_frozen_tensors_are_still_seen(monkeypatch):
    import bilevel_maml.execution as execution

    compared = []
    monkeypatch.setattr(execution, "settings", lambda engine: compared.append(1) or settings(engine))
    captured = engine()
    strategy = KernelsOnlyReplay(captured)
    captured.use_execution(strategy)
    captured.meta_iterations = CapturedExecution.WARMUP_ITERATIONS + 5
    captured.run()
    assert captured.execution is strategy and captured.meta_iteration == CapturedExecution.WARMUP_ITERATIONS + 5
    assert len(compared) == 1  # when recorded, and no replay since
    first = captured.meta_learner.trainable_parameters()[0]
    assert not strategy.recorded.structure_changed(captured)
    first.requires_grad_(False)
    assert strategy.recorded.structure_changed(captured)


def test_validation_and_the_progress_bar_between_replays_change_nothing_a_graph_took_as_given():
    """Validating after every meta-iteration (the model in eval mode and back, adapted copies,
    the progress bar's second line) leaves the problems and the model as the recording found them:
    a false fallback would quietly cost the GPU its speed."""
    torch.manual_seed(0)
    model = Conv4(5, hidden=4, image_size=16).double()
    upper = MAMLUpper(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=4)
    lower = MAMLLower(model, inner_lr=0.1, inner_steps=2)
    streams = [EpisodicEnv(device_tasks(), ways=5, shots=1, query_shots=2, seed=seed) for seed in (3, 4)]
    built = MetaEngine(upper, lower, streams[0], valid_env=streams[1], valid_step=1,
                       meta_iterations=CapturedExecution.WARMUP_ITERATIONS + 4)
    strategy = KernelsOnlyReplay(built)
    built.use_execution(strategy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warns
        built.run(progress=True)
    assert built.execution is strategy and built.eager_reason is None


def test_a_failed_capture_falls_back_and_loses_no_iteration():
    with pytest.warns(UserWarning, match=r"capturing failed \(RuntimeError: operation not permitted\)$"):
        eager, captured, strategy = run_both(fail_with=RuntimeError("operation not permitted\nmore"))
    assert captured.execution.name == "eager" and captured.meta_iteration == eager.meta_iteration
    for a, b in zip(eager.meta_learner.trainable_parameters(), captured.meta_learner.trainable_parameters()):
        assert torch.equal(a, b)


def test_a_non_finite_replay_stops_with_theta_from_before_it():
    warmups = CapturedExecution.WARMUP_ITERATIONS
    built = engine(sampler=poisoned(2 + 4 * (warmups + 1)))  # the second replay draws NaN
    built.use_execution(CapturedOnCPU(built))
    built.meta_iterations = warmups + 3
    kept = []
    built.callbacks.append(type("Keep", (), {"on_iteration_end": lambda self, e, m: kept.append(
        [p.detach().clone() for p in e.meta_learner.trainable_parameters()])})())
    with pytest.raises(NonFiniteError, match=f"^meta-iteration {warmups + 2}: the query loss is nan; θ was not updated"):
        built.run()
    for before, after in zip(kept[-1], built.meta_learner.trainable_parameters()):
        assert torch.equal(before, after)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "imaml", "metasgd", "anil", "maml++", "reptile", "boil",
                                       "maml pool before norm", "maml first block frozen", "imaml first block frozen"])
def test_on_a_gpu_three_captured_meta_iterations_equal_eager_ones(algorithm):
    """The real thing: θ after the warm-up and 3 replayed meta-iterations equals eager θ (fp32,
    same tasks: the replays draw from the registered device generator like eager draws would);
    a frozen block (requires_grad=False) stays as it was."""
    algorithm, pool_before_norm = algorithm.split()[0], algorithm.endswith("pool before norm")
    frozen = algorithm.endswith("frozen")
    results = []
    for cuda_graph in (False, False, True):
        torch.manual_seed(0)
        model = Conv4(5, hidden=16, image_size=16, pool_before_norm=pool_before_norm).cuda()
        if frozen:
            model.features[0].requires_grad_(False)
            initial = [p.detach().clone() for p in model.features[0].parameters()]
        upper_cls, lower_cls = ALGORITHMS[algorithm]
        extra = ({"cg_iterations": 3}, {"lam": 0.5}) if algorithm == "imaml" else ({}, {})
        # Adam's eps well above rounding noise: a conv bias before BatchNorm has a zero meta-gradient
        # in exact arithmetic, and Adam's g/√v would turn the noise left in its place (which differs
        # between cuDNN's eager and captured kernels) into full ±lr steps
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-3)
        upper = upper_cls(model, optimizer, meta_batch_size=8, **extra[0])
        lower = lower_cls(model, inner_lr=0.1, inner_steps=2, **extra[1])
        env = EpisodicEnv(device_tasks(torch.float32).to("cuda"), ways=5, shots=1, query_shots=2, seed=3, device="cuda")
        built = MetaEngine(upper, lower, env, meta_iterations=CapturedExecution.WARMUP_ITERATIONS + 3,
                           cuda_graph=cuda_graph, precision="fp32", device="cuda")
        built.run()
        assert built.execution.name == ("cuda-graph" if cuda_graph else "eager"), built.eager_reason
        if frozen:
            assert all(torch.equal(p, q) for p, q in zip(model.features[0].parameters(), initial))
        results.append(built)
    eager, again, captured = results
    assert captured.execution.graph is not None

    def largest_difference(x, y):
        return max((a - b).abs().max().item() for a, b in zip(x.meta_learner.trainable_parameters(),
                                                                y.meta_learner.trainable_parameters()))

    # the tolerance is 1e-5, or twice what two eager runs differ by if cuDNN's atomics make that more
    noise = largest_difference(eager, again)
    assert largest_difference(eager, captured) <= max(1e-5, 2 * noise), (largest_difference(eager, captured), noise)
    assert torch.equal(eager.env.generator.get_state(), captured.env.generator.get_state())


# -- precision ---------------------------------------------------------------------------------------
def test_precision_is_resolved_per_device_and_bad_combinations_are_refused():
    from bilevel_maml.execution import check_precision

    assert check_precision(None, "cpu") == "fp32" and check_precision(None, "cuda") == "tf32"
    assert check_precision("bf16", "cuda", torch.float32) == "bf16"
    with pytest.raises(ValueError, match="^precision='tf32' is a CUDA tensor-core mode; on cpu use fp32$"):
        check_precision("tf32", "cpu")
    with pytest.raises(ValueError, match=r"^precision='bf16' is a CUDA mode; on cpu use fp32$"):
        check_precision("bf16", "cpu")
    with pytest.raises(ValueError, match="with dtype=torch.float64 use precision='fp32'"):
        check_precision("bf16", "cuda", torch.float64)
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose one of: fp32, tf32, bf16"):
        check_precision("fp16", "cuda")


def test_the_tf32_settings_hold_inside_the_scope_and_are_restored_after():
    from bilevel_maml.execution import _tf32_state, precision_scope

    before = _tf32_state()
    for precision, expected in (("fp32", {"ieee", False}), ("tf32", {"tf32", True})):
        with precision_scope(precision, torch.device("cuda")):
            assert set(_tf32_state()) <= expected, (precision, _tf32_state())
        assert _tf32_state() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_bf16_runs_the_vectorized_convolutions_of_training_and_evaluation_in_bfloat16():
    seen = []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = Conv4(5, hidden=4, image_size=16).cuda()
        upper = MAMLUpper(model, torch.optim.Adam(model.parameters(), lr=1e-3), meta_batch_size=4)
        lower = MAMLLower(model, inner_lr=0.1)
        env = EpisodicEnv(device_tasks(torch.float32).to("cuda"), ways=5, shots=1, query_shots=2, device="cuda")
        built = MetaEngine(upper, lower, env, meta_iterations=5, test_env=env, precision=precision, device="cuda")
        assert built.vectorized
        dtypes = set()
        hook = model.features[0][0].register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
        built.run()
        trained = set(dtypes)
        dtypes.clear()
        report = built.test(20)
        hook.remove()
        seen.append((trained, set(dtypes), report["loss"]))
        assert all(p.dtype == torch.float32 for p in model.parameters())  # θ itself stays float32
    (fp32_train, fp32_eval, _), (bf16_train, bf16_eval, bf16_loss) = seen
    assert fp32_train == fp32_eval == {torch.float32}, seen
    assert bf16_train == bf16_eval == {torch.bfloat16} and math.isfinite(bf16_loss), seen
