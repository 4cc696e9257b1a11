"""The step-aware hooks: the inner-step index reaches inner_loss, inner_update and the model's forward,
the meta-learner sees φ after every inner step, and hooks written without a step keep working."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel_maml import MetaEngine, current_inner_step
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.problems import MAMLLower, MAMLUpper

from conftest import RecordingEnv, RecordingSGD, functional, random_classification_source

INNER_LR = 0.3


class StepSeeingNet(nn.Module):
    """Records the inner step its forward is evaluated for."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))
        self.seen: list = []

    def forward(self, x):
        self.seen.append(current_inner_step())
        return self.body(x)


class StepRecordingLower(MAMLLower):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses_at, self.updates_at = [], []

    def inner_loss(self, params, batch, step):
        self.losses_at.append(step)
        return super().inner_loss(params, batch, step)

    def inner_update(self, params, grads, step):
        self.updates_at.append(step)
        return super().inner_update(params, grads, step)


class TrajectoryWatchingUpper(MAMLUpper):
    def training_step(self, batch):
        learner = self.task_learner
        self.trajectories = getattr(self, "trajectories", []) + [(len(learner.trajectory),
                                                                  learner.trajectory[-1] is learner.params)]
        return super().training_step(batch)


def build(model, lower_cls, upper_cls=MAMLUpper, steps=3, vectorize=False, lr=0.0, meta_batch=2):
    torch.manual_seed(0)
    env = RecordingEnv(random_classification_source(5, 2, 6), ways=5, shots=1, query_shots=1, seed=7)
    optimizer = RecordingSGD(model.parameters(), lr=lr)
    upper = upper_cls(model, optimizer, meta_batch_size=meta_batch)
    lower = lower_cls(model, inner_lr=INNER_LR, inner_steps=steps)
    return MetaEngine(upper, lower, env, meta_iterations=1, vectorize=vectorize, valid_env=None), optimizer, env


class StartRunningLower(MAMLLower):
    """A start_for_task that runs the model (as Proto-MAML's embedding does)."""

    def start_for_task(self, params, batch):
        self.forward(batch[0], params)
        return params


@pytest.mark.parametrize("vectorize", [False, True], ids=["per-task", "vectorized"])
def test_a_start_for_task_runs_the_model_for_step_zero_in_every_inner_loop(vectorize):
    model = StepSeeingNet().double()
    engine, _, env = build(model, StartRunningLower, vectorize=vectorize)
    model.seen.clear()
    engine.run()
    loops = 1 if vectorize else 2
    assert model.seen == [0, 0, 1, 2, 2] * loops  # the start, three support forwards, the query
    model.seen.clear()
    engine.evaluate(env, num_tasks=2)  # after training left the learner at its last step
    assert model.seen == [0, 0, 1, 2, 2] * loops


@pytest.mark.parametrize("vectorize", [False, True], ids=["per-task", "vectorized"])
def test_every_hook_and_the_model_see_the_inner_step_in_training_and_evaluation(vectorize):
    model = StepSeeingNet().double()
    engine, _, env = build(model, StepRecordingLower, TrajectoryWatchingUpper, vectorize=vectorize)
    model.seen.clear()
    engine.run()
    lower = engine.task_learner
    calls = 1 if vectorize else 2  # inner loops: one for the stacked pair, or one per task
    assert lower.losses_at == lower.updates_at == [0, 1, 2] * calls
    assert model.seen == [0, 1, 2, 2] * calls  # three support forwards, then the query as at the last step
    assert engine.meta_learner.trajectories == [(3, True)] * calls
    model.seen.clear()
    lower.losses_at.clear()
    engine.evaluate(env, num_tasks=2)  # adapt + score: the same steps
    assert lower.losses_at == [0, 1, 2] * (1 if vectorize else 2)
    assert model.seen == [0, 1, 2, 2] * (1 if vectorize else 2)
    model.seen.clear()
    lower.losses_at.clear()
    engine.evaluate(env, num_tasks=2, inner_steps=5)  # steps past the trained ones are the last trained step
    assert lower.losses_at == [0, 1, 2, 2, 2] * (1 if vectorize else 2)
    assert model.seen == [0, 1, 2, 2, 2, 2] * (1 if vectorize else 2)
    assert current_inner_step() is None


class OldStyleHalfStep(MAMLLower):
    """Written against the hooks before they took a step: half the step size, and a loss override."""

    def inner_loss(self, params, batch):
        return self.task_loss(params, batch) * 1.0

    def inner_update(self, params, grads):
        return tuple(p if g is None else p - 0.5 * self.inner_lr * g for p, g in zip(params, grads))


def maml_reference(model, episodes, steps, inner_lr):
    forward = functional(model)
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    total = 0.0
    for (xs, ys), (xq, yq) in episodes:
        phi = theta
        for _ in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(forward(phi, xs), ys), phi, create_graph=True)
            phi = [p - inner_lr * g for p, g in zip(phi, grads)]
        total = total + F.cross_entropy(forward(phi, xq), yq) / len(episodes)
    return torch.autograd.grad(total, theta)


def tanh_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).double()


@pytest.mark.parametrize("vectorize", [False, True], ids=["per-task", "vectorized"])
def test_a_subclass_written_without_the_step_argument_keeps_working(vectorize):
    model = tanh_mlp()
    engine, optimizer, env = build(model, OldStyleHalfStep, steps=2, vectorize=vectorize)
    engine.run()
    expected = maml_reference(model, env.episodes, 2, 0.5 * INNER_LR)
    for got, want in zip(optimizer.seen_grads[0], expected):
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()
    assert engine.evaluate(env, num_tasks=2)["tasks"] == 2


# -- the tutorial's worked example: MAML++'s learned per-layer per-step step sizes (LSLR) ----------
class LSLRLower(MAMLLower):
    """One learned step size per parameter tensor and inner step."""

    def __init__(self, module, inner_lr, **kwargs):
        super().__init__(module, inner_lr, **kwargs)
        self.rates = nn.ParameterList(nn.Parameter(torch.full((self.inner_steps,), inner_lr, dtype=p.dtype))
                                      for p in module.parameters())

    def meta_parameters(self):
        return tuple(self.rates)

    def inner_update(self, params, grads, step):
        return tuple(p if g is None else p - rate[step] * g for p, rate, g in zip(params, self.rates, grads))


@pytest.mark.parametrize("vectorize", [False, True], ids=["per-task", "vectorized"])
def test_the_tutorials_per_step_learning_rates_get_the_reference_gradient(vectorize):
    steps = 3
    model = tanh_mlp()
    engine, optimizer, env = build(model, LSLRLower, steps=steps, vectorize=vectorize)
    engine.run()
    forward = functional(model)
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    rates = [torch.full((steps,), INNER_LR, dtype=torch.float64, requires_grad=True) for _ in theta]
    total = 0.0
    for (xs, ys), (xq, yq) in env.episodes:
        phi = theta
        for k in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(forward(phi, xs), ys), phi, create_graph=True)
            phi = [p - r[k] * g for p, r, g in zip(phi, rates, grads)]
        total = total + F.cross_entropy(forward(phi, xq), yq) / len(env.episodes)
    expected = torch.autograd.grad(total, theta + rates)
    got = optimizer.seen_grads[0]
    assert len(got) == len(expected) == 8
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    assert all(len(set(g.tolist())) == steps for g in got[4:])  # each step's rate gets its own gradient


@pytest.mark.parametrize("vectorize", [False, True], ids=["per-task", "vectorized"])
def test_evaluating_with_more_steps_than_trained_repeats_the_last_steps_rate(vectorize):
    model = tanh_mlp()
    engine, _, _ = build(model, LSLRLower, steps=3, vectorize=vectorize)
    engine.eval_inner_steps = 5
    trained_rates = torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64)
    with torch.no_grad():
        for rate in engine.task_learner.rates:
            rate.copy_(trained_rates)
    test = EpisodicEnv(random_classification_source(5, 2, 6), ways=5, shots=1, query_shots=1, seed=11)
    state = test.state_dict()
    report = engine.evaluate(test, num_tasks=4, per_task=True)
    test.load_state_dict(state)
    forward = functional(model)
    losses = []
    for _ in range(4):
        (xs, ys), (xq, yq) = test.sample_task()
        phi = [p.detach().requires_grad_() for p in model.parameters()]
        for rate in [0.1, 0.2, 0.4, 0.4, 0.4]:
            grads = torch.autograd.grad(F.cross_entropy(forward(phi, xs), ys), phi)
            phi = [(p - rate * g).detach().requires_grad_() for p, g in zip(phi, grads)]
        losses.append(F.cross_entropy(forward(phi, xq), yq).item())
    assert report["per_task"]["loss"] == pytest.approx(losses, abs=1e-10)


class MultiStepUpper(MAMLUpper):
    """A multi-step loss written by a user on the trajectory: the mean of the query losses after every step."""

    def training_step(self, batch):
        inputs, labels = batch
        learner = self.task_learner
        losses = [self.loss_fn(learner.forward(inputs, params, step), labels)
                  for step, params in enumerate(learner.trajectory)]
        return {"loss": torch.stack(losses).mean()}


def test_the_meta_learner_can_score_every_inner_step():
    steps = 2
    model = tanh_mlp()
    engine, optimizer, env = build(model, MAMLLower, MultiStepUpper, steps=steps)
    engine.run()
    forward = functional(model)
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    total = 0.0
    for (xs, ys), (xq, yq) in env.episodes:
        phi, losses = theta, []
        for _ in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(forward(phi, xs), ys), phi, create_graph=True)
            phi = [p - INNER_LR * g for p, g in zip(phi, grads)]
            losses.append(F.cross_entropy(forward(phi, xq), yq))
        total = total + sum(losses) / steps / len(env.episodes)
    for a, b in zip(optimizer.seen_grads[0], torch.autograd.grad(total, theta)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


def test_schedules_are_set_before_each_meta_iteration_with_its_number():
    seen = []

    class Scheduled(MAMLUpper):
        def on_meta_iteration_start(self, iteration, iterations):
            seen.append((iteration, iterations))

    model = tanh_mlp()
    env = RecordingEnv(random_classification_source(5, 2, 6), ways=5, shots=1, query_shots=1, seed=7)
    upper = Scheduled(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=2)
    engine = MetaEngine(upper, MAMLLower(model, inner_lr=0.1), env, meta_iterations=3)
    engine.run()
    assert seen == [(1, 3), (2, 3), (3, 3)]


class AnnealedLower(MAMLLower):
    """An inner step size annealed over the run, set by the schedule hook alone."""

    scale = 1.0

    def on_meta_iteration_start(self, iteration, iterations):
        self.scale = 1.0 - 0.9 * iteration / iterations

    def inner_update(self, params, grads, step):
        return tuple(p if g is None else p - self.inner_lr * self.scale * g for p, g in zip(params, grads))


def test_an_evaluation_adapts_with_the_schedule_of_the_iteration_that_produced_theta():
    """A checkpoint evaluated by a fresh engine (`bilevel-maml evaluate`, the final test of best.pt) scores
    the held-out tasks as the run that wrote it would: its inner step size is the schedule's at the
    checkpoint's iteration, not the variant's initial one."""
    def engine():
        model = tanh_mlp()
        env = EpisodicEnv(random_classification_source(5, 2, 6), ways=5, shots=1, query_shots=1, seed=7)
        upper = MAMLUpper(model, torch.optim.SGD(model.parameters(), lr=0.5), meta_batch_size=2)
        return MetaEngine(upper, AnnealedLower(model, inner_lr=INNER_LR, inner_steps=2), env, meta_iterations=4)

    def held_out(engine):
        stream = EpisodicEnv(random_classification_source(5, 2, 6, seed=1), ways=5, shots=1, query_shots=1, seed=3)
        return engine.evaluate(stream, 6, per_task=True)["per_task"]["loss"]

    trained = engine()
    trained.run()
    assert trained.task_learner.scale == pytest.approx(0.1)  # iteration 4 of 4
    fresh = engine()
    fresh.load_parameters(trained.state_dict())
    assert held_out(fresh) == pytest.approx(held_out(trained), rel=1e-12, abs=0)
    untrained = engine()
    held_out(untrained)  # before any training: the schedule of iteration 1
    assert untrained.task_learner.scale == pytest.approx(1.0 - 0.9 / 4)
