"""Evaluation: adapt θ to each held-out task's support set, score the adapted learner on its query set.

Tasks are adapted in vmapped batches through the same hooks as training (``TaskLearner.adapt`` with
``tasks=``), or one at a time where the model cannot be vectorized. Both paths draw the same tasks:
a device-resident env is drawn :data:`TASKS_PER_DRAW` tasks at a time whatever the path, and
learn2learn's host path gives the same tasks however many are drawn at once. The per-task losses
and accuracies stay on the device and are read once, at the end.
"""

from __future__ import annotations

import functools
import math

import torch

from bilevel_maml.execution import precision_scope
from bilevel_maml.problems.base import is_classification, predictions, vmap_over_tasks
from bilevel_maml.validation import check_positive_int

#: two-sided 95% normal quantile, for confidence intervals over tasks
Z_95 = 1.959963984540054
#: tasks an evaluation draws from a device-resident env at a time (fixed, so that the per-task and
#: the vectorized paths score the same tasks)
TASKS_PER_DRAW = 50


def mean_and_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval of the mean (normal approximation,
    sample standard deviation).

    :param values: one value per task (at least one).
    """
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, Z_95 * math.sqrt(variance / n)


def score_tasks(task_learner, loss_fn, support, query, stacked: bool, steps: int | None = None
                ) -> dict[str, torch.Tensor]:
    """Per-task query loss (and accuracy, for classification) after ``steps`` inner steps on
    ``support`` (default: the task learner's ``inner_steps``); ``stacked``: the tasks lie along a
    leading axis and are adapted at once."""
    inputs, labels = query
    last_step = task_learner.inner_steps - 1  # the adapted learner is scored as at its last trained step
    if not stacked:
        params = task_learner.adapt(support, steps)
        with torch.no_grad():
            outputs = task_learner.forward(inputs, params, last_step)
            scores = {"loss": loss_fn(outputs, labels).reshape(1)}
            if is_classification(outputs, labels):
                scores["accuracy"] = (predictions(outputs).argmax(dim=1) == labels).float().mean().reshape(1)
        return scores
    params = task_learner.adapt(support, steps, tasks=len(inputs))
    with torch.no_grad():
        outputs = vmap_over_tasks(functools.partial(task_learner.forward, step=last_step))(inputs, params)
        scores = {"loss": vmap_over_tasks(loss_fn)(outputs, labels)}
        scores_per_class = predictions(outputs)
        if is_classification(scores_per_class[0], labels[0]):
            scores["accuracy"] = (scores_per_class.argmax(dim=2) == labels).float().mean(dim=1)
    return scores


def evaluate(engine, env, num_tasks: int, per_task: bool = False, inner_steps: int | None = None) -> dict:
    """Mean and 95% confidence half-width over ``num_tasks`` tasks of ``env`` of the query loss
    and, for classification, the accuracy, with θ adapted by ``engine``'s task learner. With
    ``per_task``, ``report["per_task"]`` also lists each task's values, in the order drawn (two
    checkpoints evaluated from the same env state can then be compared task by task).

    :param engine: the :class:`~bilevel_maml.engine.MetaEngine` whose θ and task learner are scored.
    :param env: the task stream to draw from.
    :param num_tasks: tasks to adapt and score.
    :param per_task: also return every task's values.
    :param inner_steps: inner steps per task (default: the task learner's; more than it trained
        with repeat its last step's hooks, see :meth:`~bilevel_maml.problems.base.TaskLearner.adapt`).
    """
    check_positive_int("num_tasks", num_tasks)
    steps = engine.task_learner.inner_steps if inner_steps is None else check_positive_int("inner_steps", inner_steps)
    per_call = engine.evaluation_tasks_per_call
    learner, loss_fn = engine.task_learner, engine.meta_learner.loss_fn
    scores: list[dict[str, torch.Tensor]] = []
    engine.eval()
    try:
        with precision_scope(engine.precision, engine.device):
            for start in range(0, num_tasks, TASKS_PER_DRAW):
                count = min(TASKS_PER_DRAW, num_tasks - start)
                if per_call == 1 and not env.on_device:  # one at a time: tasks of any shape
                    for _ in range(count):
                        support, query = env.sample_task()
                        scores.append(score_tasks(learner, loss_fn, support, query, stacked=False, steps=steps))
                    continue
                (xs, ys), (xq, yq) = env.sample_tasks(count)
                for lo in range(0, count, per_call):
                    part = slice(lo, min(count, lo + per_call))
                    if per_call == 1:
                        scores.append(score_tasks(learner, loss_fn, (xs[lo], ys[lo]), (xq[lo], yq[lo]), stacked=False,
                                                  steps=steps))
                    else:
                        scores.append(score_tasks(learner, loss_fn, (xs[part], ys[part]), (xq[part], yq[part]),
                                                  stacked=True, steps=steps))
    finally:
        engine.train()
    keys = list(scores[0])
    per_task_values = torch.stack([torch.cat([s[k] for s in scores]).to(torch.float64) for k in keys]).tolist()
    report: dict = {"tasks": num_tasks}
    for key, values in zip(keys, per_task_values):
        report[key], report[f"{key}_ci95"] = mean_and_ci95(values)
    if per_task:
        report["per_task"] = dict(zip(keys, per_task_values))
    return report


__all__ = ["evaluate", "mean_and_ci95"]
