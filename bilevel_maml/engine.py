"""``MetaEngine``: Betty's ``Engine`` ordered for episodic meta-learning.

One meta-iteration is ``meta_batch_size`` tasks; each task is one ``env.step()`` followed by
``inner_steps`` steps of the Lower problem, after which Betty hands control to the Upper problem,
which accumulates the task's meta-gradient and steps the outer optimizer on the last task of the
meta-batch. Every ``valid_step`` meta-iterations the engine adapts θ on tasks of the *validation*
split; :meth:`MetaEngine.test` does the same on the test split for the final report.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import torch
from betty.engine import Engine
from betty.configs import EngineConfig
from betty.logging.logger_base import get_logger

from bilevel_maml.env import EpisodicEnv
from bilevel_maml.problems.base import MetaLearner, TaskLearner, task_metrics
from bilevel_maml.validation import check_positive_int

#: two-sided 95% normal quantile, for confidence intervals over tasks
Z_95 = 1.959963984540054


def mean_and_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval of the mean."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, Z_95 * math.sqrt(variance / n)


@contextlib.contextmanager
def _betty_log_level(level: int):
    betty_logger = get_logger()
    previous = betty_logger.level
    betty_logger.setLevel(level)
    try:
        yield
    finally:
        betty_logger.setLevel(previous)


class MetaEngine(Engine):
    """Runs MAML-family meta-training on one :class:`~bilevel_maml.env.EpisodicEnv`.

    :param upper: the :class:`MetaLearner` (θ and the outer optimizer).
    :param lower: the :class:`TaskLearner` that adapts to each task.
    :param env: training task stream.
    :param meta_iterations: number of outer updates :meth:`run` performs.
    :param valid_env: validation task stream; validation is skipped without one.
    :param test_env: test task stream, used only by :meth:`test`.
    :param valid_step: validate every this many meta-iterations.
    :param valid_tasks: tasks per validation.
    :param device: device for the problems and every env (Betty's ``Engine`` has none).
    :param logger: a Betty-style logger (``log(stats, tag, step)``), e.g.
        :class:`bilevel_maml.logging.WandbLogger`; defaults to Betty's no-op logger.
    :param verbose: keep Betty's INFO messages about problem set-up.
    """

    def __init__(
        self,
        upper: MetaLearner,
        lower: TaskLearner,
        env: EpisodicEnv,
        *,
        meta_iterations: int = 1000,
        valid_env: EpisodicEnv | None = None,
        test_env: EpisodicEnv | None = None,
        valid_step: int = 100,
        valid_tasks: int = 100,
        device: torch.device | str | None = None,
        logger=None,
        verbose: bool = False,
    ):
        if not isinstance(upper, MetaLearner):
            raise TypeError(f"upper must be a MetaLearner, got {type(upper).__name__}")
        if not isinstance(lower, TaskLearner):
            raise TypeError(f"lower must be a TaskLearner, got {type(lower).__name__}")
        self.meta_iterations = check_positive_int("meta_iterations", meta_iterations)
        self.valid_every = check_positive_int("valid_step", valid_step)
        self.valid_tasks = check_positive_int("valid_tasks", valid_tasks)
        self.device = torch.device(device) if device is not None else env.device
        for problem in (upper, lower):
            problem.device = self.device
        for stream in (env, valid_env, test_env):
            if stream is not None:
                stream.device = self.device
        self.meta_learner, self.task_learner = upper, lower
        self.valid_env, self.test_env = valid_env, test_env
        self.inner_steps = lower.inner_steps
        self.meta_batch_size = upper.meta_batch_size
        self.meta_iteration = 0
        self.best_valid: dict | None = None
        self.history: list[dict] = []
        self.callbacks: list[Callable[["MetaEngine", str, dict], None]] = []
        steps_per_iteration = self.inner_steps * self.meta_batch_size
        config = EngineConfig(
            train_iters=self.meta_iterations * steps_per_iteration,
            valid_step=self.valid_every * steps_per_iteration,
        )
        dependencies = {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}
        with _betty_log_level(logging.INFO if verbose else logging.WARNING):
            super().__init__(problems=[upper, lower], config=config, dependencies=dependencies, env=env)
        if logger is not None:
            self.logger = logger
            for problem in self.problems:
                problem.logger = logger

    # -- order of operations ----------------------------------------------------------------
    def train_step(self):
        """One global step: a new task before its first inner step, then the Lower steps."""
        if (self.global_step - 1) % self.inner_steps == 0:
            self.env.step()
        for leaf in self.leaves:
            leaf.step(global_step=self.global_step)

    def meta_step(self) -> dict:
        """One meta-iteration: ``meta_batch_size`` tasks, ending in one outer optimizer step."""
        for _ in range(self.meta_batch_size * self.inner_steps):
            self.global_step += 1
            self.train_step()
        per_task = self.meta_learner.task_stats
        self.meta_learner.task_stats = []
        return {key: sum(s[key] for s in per_task) / len(per_task) for key in per_task[0]}

    def run(self) -> list[dict]:
        """Meta-train until ``meta_iterations``; returns the per-iteration training statistics."""
        self.train()
        for iteration in range(self.meta_iteration + 1, self.meta_iterations + 1):
            stats = self.meta_step()
            self.meta_iteration = iteration
            stats["lr"] = self.meta_learner.optimizer.param_groups[0]["lr"]
            self.history.append(stats)
            self.logger.log(stats, tag="train", step=iteration)
            self._notify("train", stats)
            if self.valid_env is not None and iteration % self.valid_every == 0:
                self.validate()
        return self.history

    def _notify(self, event: str, stats: dict):
        for callback in self.callbacks:
            callback(self, event, stats)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, env: EpisodicEnv, num_tasks: int) -> dict:
        """Adapt a copy of θ on each task's support set and score it on the query set.

        Returns the mean over tasks and the 95% confidence half-width of the query loss and,
        for classification, of the accuracy.
        """
        check_positive_int("num_tasks", num_tasks)
        self.eval()
        per_task: list[dict] = []
        try:
            for _ in range(num_tasks):
                support, (inputs, labels) = env.sample_task()
                params = self.task_learner.adapt(support)
                with torch.no_grad():
                    outputs = self.task_learner.forward(inputs, params)
                    loss = self.meta_learner.loss_fn(outputs, labels)
                per_task.append({k: float(v) for k, v in task_metrics(outputs, labels, loss).items()})
        finally:
            self.train()
        report = {"tasks": num_tasks}
        for key in per_task[0]:
            report[key], report[f"{key}_ci95"] = mean_and_ci95([s[key] for s in per_task])
        return report

    def validation(self) -> dict:
        return self.evaluate(self.valid_env, self.valid_tasks)

    def validate(self) -> dict:
        """Validate now; remembers the best result (highest accuracy, else lowest loss)."""
        stats = self.validation()
        key, sign = ("accuracy", 1) if "accuracy" in stats else ("loss", -1)
        if self.best_valid is None or sign * stats[key] > sign * self.best_valid[key]:
            self.best_valid = {**stats, "iteration": self.meta_iteration}
        self.logger.log(stats, tag="validation", step=self.meta_iteration)
        self._notify("validation", stats)
        return stats

    def test(self, num_tasks: int = 600) -> dict:
        """Final report on the test split: mean and 95% CI over ``num_tasks`` tasks."""
        if self.test_env is None:
            raise ValueError("this engine has no test_env; pass test_env= to report test accuracy")
        stats = self.evaluate(self.test_env, num_tasks)
        self.logger.log(stats, tag="test", step=self.meta_iteration)
        self._notify("test", stats)
        return stats


__all__ = ["MetaEngine", "mean_and_ci95"]
