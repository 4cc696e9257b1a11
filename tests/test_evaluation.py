"""Evaluation adapts tasks in vmapped batches and scores exactly what the per-task path scores."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel_maml import ALGORITHMS, MetaEngine
from bilevel_maml.data.device_sampler import DeviceTaskSampler
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.evaluation import mean_and_ci95
from bilevel_maml.execution import evaluation_tasks_per_call
from bilevel_maml.models import Conv4

from conftest import random_classification_source

TASKS = 13  # not a multiple of the batch sizes below: the last call is short


def image_source():
    def sample():
        labels = torch.arange(5).repeat_interleave(3)
        return torch.randn(15, 1, 16, 16, dtype=torch.float64) + labels.view(-1, 1, 1, 1), labels

    return sample


def device_images():
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(10).repeat_interleave(4)
    images = torch.randn(40, 1, 16, 16, generator=generator, dtype=torch.float64) + labels.view(-1, 1, 1, 1) / 3
    return DeviceTaskSampler(images, [range(4 * c, 4 * c + 4) for c in range(10)], ways=5, shots=1, query_shots=2)


def built(algorithm, model, source, vectorize=True, eval_inner_steps=None):
    upper_cls, lower_cls = ALGORITHMS[algorithm]
    extra = ({"cg_iterations": 3}, {"lam": 0.5}) if algorithm == "imaml" else ({}, {})
    upper = upper_cls(model, torch.optim.SGD(model.parameters(), lr=0.5), meta_batch_size=4, **extra[0])
    lower = lower_cls(model, inner_lr=0.3, inner_steps=2, **extra[1])
    env = EpisodicEnv(source, ways=5, shots=1, query_shots=2, seed=2)
    test = EpisodicEnv(source, ways=5, shots=1, query_shots=2, seed=7)
    engine = MetaEngine(upper, lower, env, meta_iterations=2, test_env=test, vectorize=vectorize,
                        eval_inner_steps=eval_inner_steps)
    engine.run()  # θ moved, so that adaptation matters
    return engine


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "imaml", "metasgd", "anil"])
@pytest.mark.parametrize("make_model, source", [
    (lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)), lambda: random_classification_source(5, 3, 6)),
    (lambda: Conv4(5, in_channels=1, hidden=4, image_size=16), image_source),
    (lambda: Conv4(5, in_channels=1, hidden=4, image_size=16), device_images),
], ids=["mlp-host-tasks", "conv-host-tasks", "conv-device-tasks"])
def test_vectorized_evaluation_scores_every_task_as_the_per_task_path_does(algorithm, make_model, source):
    torch.manual_seed(0)
    engine = built(algorithm, make_model().double(), source())
    assert engine.evaluation_tasks_per_call > 4
    state = engine.test_env.state_dict()
    engine.evaluation_tasks_per_call = 4
    vectorized = engine.evaluate(engine.test_env, TASKS, per_task=True)
    after = engine.test_env.state_dict()
    engine.test_env.load_state_dict(state)
    engine.evaluation_tasks_per_call = 1
    per_task = engine.evaluate(engine.test_env, TASKS, per_task=True)
    for key in ("loss", "accuracy"):
        a, b = torch.tensor(vectorized["per_task"][key]), torch.tensor(per_task["per_task"][key])
        assert len(a) == TASKS and torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
        assert vectorized[key] == pytest.approx(per_task[key], abs=1e-6)
    assert len(set(vectorized["per_task"]["loss"])) > 1
    # the same tasks, drawn the same way: the stream is left in the same state
    assert str(engine.test_env.state_dict()) == str(after)


def reference_evaluation(engine, env, tasks, steps=None):
    """The evaluation as first written: draw a task, adapt a copy of θ by plain SGD steps through
    functional_call, score the query set; one task at a time."""
    from torch.func import functional_call

    model = engine.meta_learner.module
    names = [n for n, _ in model.named_parameters()]
    losses, accuracies = [], []
    for _ in range(tasks):
        (xs, ys), (xq, yq) = env.sample_task()
        params = [p.detach().requires_grad_() for p in model.parameters()]
        for _ in range(engine.inner_steps if steps is None else steps):
            loss = F.cross_entropy(functional_call(model, dict(zip(names, params)), (xs,)), ys)
            grads = torch.autograd.grad(loss, params)
            params = [(p - engine.task_learner.inner_lr * g).detach().requires_grad_() for p, g in zip(params, grads)]
        outputs = functional_call(model, dict(zip(names, params)), (xq,))
        losses.append(F.cross_entropy(outputs, yq).item())
        accuracies.append((outputs.argmax(1) == yq).double().mean().item())
    return losses, accuracies


def test_reported_numbers_equal_a_reference_written_out_by_hand():
    torch.manual_seed(0)
    engine = built("maml", Conv4(5, in_channels=1, hidden=4, image_size=16).double(), image_source())
    state = engine.test_env.state_dict()
    report = engine.evaluate(engine.test_env, TASKS, per_task=True)
    engine.test_env.load_state_dict(state)
    engine.eval()
    losses, accuracies = reference_evaluation(engine, engine.test_env, TASKS)
    engine.train()
    assert torch.allclose(torch.tensor(report["per_task"]["loss"]), torch.tensor(losses), atol=1e-6, rtol=0)
    assert report["per_task"]["accuracy"] == pytest.approx(accuracies, abs=1e-6)
    assert (report["accuracy"], report["accuracy_ci95"]) == pytest.approx(mean_and_ci95(accuracies), abs=1e-6)


@pytest.mark.parametrize("per_call", [1, 4], ids=["per-task", "vectorized"])
def test_held_out_tasks_take_the_evaluation_inner_steps(per_call):
    torch.manual_seed(0)
    engine = built("maml", Conv4(5, in_channels=1, hidden=4, image_size=16).double(), image_source(),
                   eval_inner_steps=5)
    engine.evaluation_tasks_per_call = per_call
    state = engine.test_env.state_dict()
    report = engine.test(TASKS)
    engine.test_env.load_state_dict(state)
    trained_steps = engine.evaluate(engine.test_env, TASKS, inner_steps=2)
    engine.test_env.load_state_dict(state)
    engine.eval()
    losses, accuracies = reference_evaluation(engine, engine.test_env, TASKS, steps=5)
    engine.train()
    assert (report["loss"], report["accuracy"]) == pytest.approx((sum(losses) / TASKS, sum(accuracies) / TASKS),
                                                                  abs=1e-6)
    assert report["loss"] < trained_steps["loss"] - 0.01  # three more steps on the support set did something


@pytest.mark.parametrize("per_call", [1, 4], ids=["per-task", "vectorized"])
def test_per_step_scores_are_those_of_adapting_with_that_many_steps(per_call):
    torch.manual_seed(0)
    engine = built("maml", Conv4(5, in_channels=1, hidden=4, image_size=16).double(), image_source())
    engine.evaluation_tasks_per_call = per_call
    state = engine.test_env.state_dict()
    report = engine.evaluate(engine.test_env, TASKS, inner_steps=4, per_step=True)
    curve = report["per_step"]
    assert len(curve["loss"]) == len(curve["accuracy_ci95"]) == 5  # after 0 (θ itself), 1, ..., 4 steps
    assert (curve["loss"][-1], curve["accuracy"][-1], curve["loss_ci95"][-1]) == (
        report["loss"], report["accuracy"], report["loss_ci95"])
    engine.eval()
    for steps in range(5):
        engine.test_env.load_state_dict(state)
        losses, accuracies = reference_evaluation(engine, engine.test_env, TASKS, steps=steps)
        assert (curve["loss"][steps], curve["accuracy"][steps]) == pytest.approx(
            (sum(losses) / TASKS, sum(accuracies) / TASKS), abs=1e-6), steps
        assert curve["accuracy_ci95"][steps] == pytest.approx(mean_and_ci95(accuracies)[1], abs=1e-6)
    engine.train()
    assert curve["loss"][0] > curve["loss"][2]  # adapting helps


def test_mean_and_ci95_by_hand():
    mean, half = mean_and_ci95([1.0, 2.0, 3.0, 4.0])
    # sample variance 5/3; standard error sqrt(5/3 / 4); two-sided 95% normal quantile 1.959964
    assert mean == 2.5 and half == pytest.approx(1.959963984540054 * (5 / 3 / 4) ** 0.5, rel=1e-12)
    assert mean_and_ci95([0.7])[0] == 0.7


def test_tasks_per_evaluation_call_follow_the_activation_budget():
    conv4 = 64 * 28 * 28 * 4  # bytes of the max-pool conv4's largest activation per example
    assert evaluation_tasks_per_call(torch.device("cpu"), 10, conv4) == 16   # 160 examples a call
    assert evaluation_tasks_per_call(torch.device("cpu"), 80, conv4) == 1    # 2 would fit: task by task
    assert evaluation_tasks_per_call(torch.device("cuda"), 10, conv4) == 2 * 2**30 // (10 * conv4)
    torch.manual_seed(0)
    per_task = built("fomaml", Conv4(5, hidden=4, image_size=16).double(), image_source(), vectorize=False)
    assert per_task.evaluation_tasks_per_call == 1
