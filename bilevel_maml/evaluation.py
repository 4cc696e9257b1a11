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
import warnings
from collections.abc import Callable

import torch

from bilevel_maml.env import global_rng_state, set_global_rng_state
from bilevel_maml.execution import precision_scope
from bilevel_maml.problems.base import NotVectorizableError, is_classification, predictions, vmap_over_tasks
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


def score_tasks(task_learner, loss_fn, support, query, stacked: bool, steps: int | None = None,
                per_step: bool = False) -> dict[str, torch.Tensor]:
    """Per-task query loss (and accuracy, for classification) after ``steps`` inner steps on
    ``support`` (default: the task learner's ``inner_steps``); ``stacked``: the tasks lie along a
    leading axis and are adapted at once. With ``per_step``, also ``"<key>_per_step"``: the
    scores after 0, 1, …, ``steps`` steps, one row per task.

    The query after ``k`` steps is scored as at the last step taken (inner step ``k`` − 1, at most
    the last trained one; step 0 for θ itself), as the multi-step loss scores it in training."""
    inputs, labels = query
    steps = task_learner.inner_steps if steps is None else steps

    @torch.no_grad()
    def score(params, taken: int) -> dict[str, torch.Tensor]:
        step = min(max(taken - 1, 0), task_learner.inner_steps - 1)
        if not stacked:
            outputs = task_learner.forward(inputs, params, step)
            scores = {"loss": loss_fn(outputs, labels).reshape(1)}
            if is_classification(outputs, labels):
                scores["accuracy"] = (predictions(outputs).argmax(dim=1) == labels).float().mean().reshape(1)
            return scores
        outputs = vmap_over_tasks(functools.partial(task_learner.forward, step=step))(inputs, params)
        scores = {"loss": vmap_over_tasks(loss_fn)(outputs, labels)}
        scores_per_class = predictions(outputs)
        if is_classification(scores_per_class[0], labels[0]):
            scores["accuracy"] = (scores_per_class.argmax(dim=2) == labels).float().mean(dim=1)
        return scores

    tasks = len(inputs) if stacked else None
    if not per_step:
        return score(task_learner.adapt(support, steps, tasks=tasks), steps)
    after: list[dict[str, torch.Tensor]] = []
    task_learner.adapt(support, steps, tasks=tasks, after_step=lambda taken, params: after.append(score(params, taken)))
    return {**after[-1], **{f"{key}_per_step": torch.stack([s[key] for s in after], dim=1) for key in after[-1]}}


def evaluate(engine, env, num_tasks: int, per_task: bool = False, inner_steps: int | None = None,
             per_step: bool = False, on_scored: Callable[[int], None] | None = None) -> dict:
    """Mean and 95% confidence half-width over ``num_tasks`` tasks of ``env`` of the query loss
    and, for classification, the accuracy, with θ adapted by ``engine``'s task learner. With
    ``per_task``, ``report["per_task"]`` also lists each task's values, in the order drawn (two
    checkpoints evaluated from the same env state can then be compared task by task). With
    ``per_step``, ``report["per_step"]`` holds the mean and half-width after 0, 1, …,
    ``inner_steps`` inner steps (``{"loss": [...], "loss_ci95": [...], ...}``; the last entries are
    the report's own), for a plot of how far adaptation gets with more steps.

    :param engine: the :class:`~bilevel_maml.engine.MetaEngine` whose θ and task learner are scored.
    :param env: the task stream to draw from.
    :param num_tasks: tasks to adapt and score.
    :param per_task: also return every task's values.
    :param inner_steps: inner steps per task (default: the task learner's; more than it trained
        with repeat its last step's hooks, see :meth:`~bilevel_maml.problems.base.TaskLearner.adapt`).
    :param per_step: also score the query after every inner step.
    :param on_scored: called with the number of tasks scored so far after each batch of them (a
        progress bar's update; the scores themselves are read once, at the end).
    """
    check_positive_int("num_tasks", num_tasks)
    steps = engine.task_learner.inner_steps if inner_steps is None else check_positive_int("inner_steps", inner_steps)
    score = functools.partial(score_tasks, engine.task_learner, engine.meta_learner.loss_fn, steps=steps,
                              per_step=per_step)
    engine.eval()
    try:
        with precision_scope(engine.precision, engine.device):
            scores = _scores_trying_stacked(engine, env, num_tasks, score, on_scored)
    finally:
        engine.train()
    columns = {key: torch.cat([s[key] for s in scores]).to(torch.float64) for key in scores[0]}
    keys = [key for key in columns if not key.endswith("_per_step")]
    report: dict = {"tasks": num_tasks}
    for key in keys:
        report[key], report[f"{key}_ci95"] = mean_and_ci95(columns[key].tolist())
    if per_step:
        report["per_step"] = {}
        for key in keys:
            after = [mean_and_ci95(column) for column in columns[f"{key}_per_step"].T.tolist()]
            report["per_step"][key], report["per_step"][f"{key}_ci95"] = map(list, zip(*after))
    if per_task:
        report["per_task"] = {key: columns[key].tolist() for key in keys}
    return report


def _scores_trying_stacked(engine, env, num_tasks, score, on_scored) -> list[dict[str, torch.Tensor]]:
    """The tasks' scores, vectorized by :attr:`~bilevel_maml.engine.MetaEngine.evaluation_tasks_per_call`;
    where a variant's hook cannot run on stacked tasks, scored again one task at a time from the
    same point of the task stream (with a one-line warning), and so from then on."""
    per_call = engine.evaluation_tasks_per_call
    if per_call == 1:
        return _scores(env, num_tasks, score, 1, on_scored)
    stream, rng = env.state_dict(), global_rng_state()
    try:
        return _scores(env, num_tasks, score, per_call, on_scored)
    except NotVectorizableError as error:
        env.load_state_dict(stream)
        set_global_rng_state(rng)
        engine.evaluation_tasks_per_call = 1
        warnings.warn(f"{error.what}; scoring tasks one at a time instead", stacklevel=4)
        return _scores(env, num_tasks, score, 1, on_scored)


def _scores(env, num_tasks, score, per_call, on_scored) -> list[dict[str, torch.Tensor]]:
    scores = []
    for start in range(0, num_tasks, TASKS_PER_DRAW):
        count = min(TASKS_PER_DRAW, num_tasks - start)
        if per_call == 1 and not env.on_device:  # one at a time: tasks of any shape
            for _ in range(count):
                support, query = env.sample_task()
                scores.append(score(support, query, stacked=False))
        else:
            (xs, ys), (xq, yq) = env.sample_tasks(count)
            for lo in range(0, count, per_call):
                part = lo if per_call == 1 else slice(lo, min(count, lo + per_call))
                scores.append(score((xs[part], ys[part]), (xq[part], yq[part]), stacked=per_call > 1))
        if on_scored is not None:
            on_scored(start + count)
    return scores


def scalar_scores(report: dict, tag: str) -> dict:
    """An evaluation's report as ``tag/name`` scalars for W&B: the per-step lists become one value
    per number of steps (``tag/accuracy_after_2_steps``), so each point shows in the run's summary.

    :param report: what :func:`evaluate` returned (``per_task`` is left out).
    :param tag: the prefix: ``test``, or ``evaluation`` and the like for ``bilevel-maml evaluate``.
    """
    scalars = {f"{tag}/{key}": value for key, value in report.items() if key not in ("per_step", "per_task")}
    for name, values in report.get("per_step", {}).items():
        scalars.update({f"{tag}/{name}_after_{steps}_steps": value for steps, value in enumerate(values)})
    return scalars


__all__ = ["evaluate", "mean_and_ci95", "scalar_scores"]
