"""``MetaEngine``: Betty's ``Engine`` ordered for episodic meta-learning.

One meta-iteration is ``meta_batch_size`` tasks; each task is one ``env.step()`` followed by
``inner_steps`` steps of the Lower problem, after which Betty hands control to the Upper problem,
which accumulates the task's meta-gradient and steps the outer optimizer on the last task of the
meta-batch. Every ``valid_step`` meta-iterations the engine adapts θ on tasks of the *validation*
split; :meth:`MetaEngine.test` does the same on the test split for the final report.

This file is that order. How a meta-iteration executes (task by task, vmapped chunks of tasks, a
replayed CUDA graph) is :mod:`bilevel_maml.execution`; evaluation is :mod:`bilevel_maml.evaluation`.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from betty.engine import Engine
from betty.configs import EngineConfig
from betty.logging.logger_base import get_logger

from bilevel_maml import distributed, evaluation, execution
from bilevel_maml.env import EpisodicEnv, global_rng_state, saveable_rng_state, set_global_rng_state
from bilevel_maml.evaluation import mean_and_ci95
from bilevel_maml.problems.base import MetaLearner, NonFiniteError, TaskLearner
from bilevel_maml.progress import ProgressBar
from bilevel_maml.validation import check_device, check_positive_int


def meta_parameters_outside(optimizer: torch.optim.Optimizer, task_learner: TaskLearner) -> list[torch.Tensor]:
    """The task learner's :meth:`~bilevel_maml.problems.base.TaskLearner.meta_parameters` that
    ``optimizer`` does not hold yet (the engine adds them as a param group of their own).

    :param optimizer: the outer optimizer.
    :param task_learner: the Lower problem.
    """
    extra = list(task_learner.meta_parameters())
    for tensor in extra:
        if not (isinstance(tensor, torch.Tensor) and tensor.is_leaf and tensor.requires_grad):
            raise TypeError(f"{type(task_learner).__name__}.meta_parameters() must return leaf tensors "
                            f"that require grad (nn.Parameter), got {type(tensor).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [p for p in extra if id(p) not in held]


def _check_same_network(upper: MetaLearner, lower: TaskLearner) -> None:
    """The task learner runs its module with θ's tensors in place of its own parameters, so the two
    modules must name the same parameters with the same shapes (the same object, as a rule)."""
    if lower.module is upper.module:
        return
    theirs = {name: tuple(p.shape) for name, p in upper.module.named_parameters()}
    ours = {name: tuple(p.shape) for name, p in lower.module.named_parameters()}
    if theirs == ours:
        return
    differ = next((f"{name} is {ours.get(name)} in the task learner's and {theirs.get(name)} in the meta-learner's"
                   for name in [*theirs, *ours] if ours.get(name) != theirs.get(name)))
    raise ValueError(f"the task learner's network is not the meta-learner's ({differ.replace('None', 'absent')}); "
                     f"every inner loop starts from θ, the meta-learner's parameters: pass the same module to both")


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
    :param eval_inner_steps: inner steps of each validation and test task (default: ``lower``'s
        ``inner_steps``); papers often adapt held-out tasks with more steps than training (MAML
        trains mini-ImageNet with 5 and tests with 10). Steps past those trained repeat the last
        trained step's hooks (per-step step sizes and BatchNorm rows).
    :param device: device for the problems and every env (Betty's ``Engine`` has none). An env
        without a ``dtype`` of its own hands out tasks in θ's dtype.
    :param logger: a Betty-style logger (``log(stats, tag, step)``), e.g.
        :class:`bilevel_maml.logging.WandbLogger`; defaults to Betty's no-op logger.
    :param callbacks: progress bars, checkpointers, ... (see :attr:`callbacks`).
    :param vectorize: adapt several tasks at once with ``torch.func.vmap`` (same meta-gradient,
        fewer and larger kernels): ``True`` chooses how many (the whole meta-batch on a GPU;
        on CPU chunks whose largest activation stays within
        :data:`~bilevel_maml.execution.CPU_ACTIVATION_BYTES_PER_CALL`,
        or task by task when fewer than :data:`~bilevel_maml.execution.CPU_MIN_TASKS_PER_CALL` tasks fit in one; see
        there), an int fixes it (a divisor of the meta-batch size), ``False`` adapts task by
        task. A model that cannot run under ``vmap`` (one that writes buffers in ``forward``,
        say) falls back to the per-task path with a warning. Evaluation adapts its tasks in
        vmapped batches too, unless ``vectorize`` is ``False`` or the model cannot be vectorized.
    :param cuda_graph: on CUDA, capture the meta-iteration once as a CUDA graph and replay it
        (:class:`~bilevel_maml.execution.CapturedExecution`). ``None`` (default): wherever it works,
        else eager with a one-line warning saying why; ``False``: always eager; ``True`` on a
        device other than CUDA is an error.
    :param precision: ``fp32``, ``tf32`` (CUDA) or ``bf16`` (autocast); default ``tf32`` on CUDA,
        ``fp32`` elsewhere (:data:`~bilevel_maml.execution.PRECISIONS`).
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
        eval_inner_steps: int | None = None,
        device: torch.device | str | None = None,
        logger=None,
        callbacks=(),
        vectorize: bool | int = True,
        cuda_graph: bool | None = None,
        precision: str | None = None,
        verbose: bool = False,
    ):
        if not isinstance(upper, MetaLearner):
            raise TypeError(f"upper must be a MetaLearner, got {type(upper).__name__}")
        if not isinstance(lower, TaskLearner):
            raise TypeError(f"lower must be a TaskLearner, got {type(lower).__name__}")
        _check_same_network(upper, lower)
        for problem in (upper, lower):
            # Betty binds a problem to one engine: its dependency parse appends to the problem's parents
            # and children, and Problem.initialize deletes _name_orig (a second engine failed on it)
            if problem.parents or problem.children:
                raise ValueError(f"this {type(problem).__name__} already belongs to a MetaEngine (Betty binds a "
                                 f"problem to one engine); build new problems for another engine")
        for name, stream in (("env", env), ("valid_env", valid_env), ("test_env", test_env)):
            if not isinstance(stream, EpisodicEnv) and (stream is not None or name == "env"):
                raise TypeError(f"{name} must be an EpisodicEnv{'' if name == 'env' else ' or None'}, "
                                f"got {type(stream).__name__}")
        self.meta_iterations = check_positive_int("meta_iterations", meta_iterations)
        self.valid_every = check_positive_int("valid_step", valid_step)
        self.valid_tasks = check_positive_int("valid_tasks", valid_tasks)
        self.device = check_device("device", device) if device is not None else env.device
        for problem in (upper, lower):
            problem.device = self.device
        theta_dtype = next((p.dtype for p in upper.module.parameters() if p.is_floating_point()), None)
        for stream in (env, valid_env, test_env):
            if stream is not None:
                stream.device = self.device
                if stream.dtype is None:  # tasks in θ's dtype: a float64 model gets float64 tasks
                    stream.dtype = theta_dtype
        self.meta_learner, self.task_learner = upper, lower
        #: under torch.distributed, this process's rank and the number of ranks (else 0 and 1)
        self.rank, self.world_size = distributed.world()
        self.valid_env, self.test_env = valid_env, test_env
        self.inner_steps = lower.inner_steps
        #: inner steps of each validation and test task
        self.eval_inner_steps = self.inner_steps if eval_inner_steps is None else check_positive_int(
            "eval_inner_steps", eval_inner_steps)
        self.meta_batch_size = upper.meta_batch_size
        self.meta_iteration = 0
        #: the meta-iteration that produced θ (that of a checkpoint :meth:`load_parameters` read); an
        #: evaluation runs the problems' schedules as they were then
        self.theta_iteration = 0
        self.best_valid: dict | None = None
        self.history: list[dict] = []
        #: the signal that asked :meth:`run` to stop after the current meta-iteration (set by
        #: :class:`~bilevel_maml.stopping.GracefulStop`; a callback may set it too), else None
        self.stop_signal: int | None = None
        #: objects with any of the hooks of :class:`~bilevel_maml.callbacks.Callback`
        #: (on_train_start, on_iteration_end, on_validation_end, on_test_end, on_train_end)
        self.callbacks: list = list(callbacks)
        steps_per_iteration = self.inner_steps * self.meta_batch_size
        config = EngineConfig(
            train_iters=self.meta_iterations * steps_per_iteration,
            valid_step=self.valid_every * steps_per_iteration,
        )
        dependencies = {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}
        with _betty_log_level(logging.INFO if verbose else logging.WARNING):
            super().__init__(problems=[upper, lower], config=config, dependencies=dependencies, env=env)
        self._learn_task_learner_meta_parameters()
        if logger is not None:
            self.logger = logger
            for problem in self.problems:
                problem.logger = logger
        self.precision = execution.check_precision(precision, self.device, next(upper.module.parameters()).dtype)
        self.vectorized = False
        self.tasks_per_step = 1
        #: tasks adapted per vmapped call in evaluation (1: one at a time)
        self.evaluation_tasks_per_call = 1
        #: bytes of the model's largest activation per example, measured on the probe tasks
        self.activation_bytes_per_example: int | None = None
        self.env.tasks_per_draw = self.meta_batch_size  # the same tasks however many each step adapts
        execution.plan_vectorization(self, vectorize)
        #: how meta-iterations run (:mod:`bilevel_maml.execution`), and why not captured, if not
        self.execution, self.eager_reason = execution.choose_execution(self, cuda_graph)
        if self.eager_reason is not None:
            execution.warn_eager(self.eager_reason)

    def use_execution(self, strategy, reason: str | None = None) -> None:
        """Switch how meta-iterations run (the captured strategy falls back this way), saying why.

        :param strategy: an :class:`~bilevel_maml.execution.EagerExecution` or :class:`~bilevel_maml.execution.CapturedExecution`.
        :param reason: why the run is not captured (printed as a one-line warning), or None.
        """
        self.execution, self.eager_reason = strategy, reason
        if reason is not None:
            execution.warn_eager(reason)

    def _learn_task_learner_meta_parameters(self) -> None:
        """Put the task learner's meta-parameters (Meta-SGD's step sizes, say) on the device and
        in the outer optimizer, unless the user's optimizer already holds them."""
        missing = meta_parameters_outside(self.meta_learner.optimizer, self.task_learner)
        for tensor in self.task_learner.meta_parameters():
            if tensor.device != self.device:
                tensor.data = tensor.data.to(self.device)
        if missing and self.meta_learner.lr_scheduler is not None:
            # a torch LR scheduler keeps one entry per param group it was built with
            raise ValueError(f"{type(self.task_learner).__name__}.meta_parameters() are not in the outer optimizer, "
                             f"and its LR scheduler was built without them: add them first "
                             f"(optimizer.add_param_group({{'params': list(lower.meta_parameters())}})), then build "
                             f"the scheduler, or let build_engine(scheduler=...) do it")
        if missing:
            self.meta_learner.optimizer.add_param_group({"params": missing})

    # -- order of operations ----------------------------------------------------------------
    def train_step(self):
        """One global step: a new task before its first inner step, then the Lower steps."""
        if (self.global_step - 1) % self.inner_steps == 0:
            self.env.step()
        for leaf in self.leaves:
            leaf.step(global_step=self.global_step)

    def meta_step(self) -> dict:
        """One meta-iteration: ``meta_batch_size`` tasks, ending in one outer optimizer step, run
        by :attr:`execution`; returns the mean query loss (and accuracy) over its tasks."""
        self.meta_learner.set_meta_learning_rate(self.meta_iteration + 1, self.meta_iterations)
        for problem in (self.meta_learner, self.task_learner):
            problem.on_meta_iteration_start(self.meta_iteration + 1, self.meta_iterations)
        # the rate this iteration's outer step uses (an LR scheduler moves it on at the iteration's end)
        lr = self.meta_learner.optimizer.param_groups[0]["lr"]
        lr = lr.clone() if isinstance(lr, torch.Tensor) else lr
        stats = self.execution.meta_step()
        stats["lr"] = float(lr)
        return stats

    def run(self, progress: bool = False) -> list[dict]:
        """Meta-train until ``meta_iterations``, or until :attr:`stop_signal` is set (then after the
        meta-iteration under way); returns the per-iteration training statistics.

        Each meta-iteration's metrics (``train/*`` and, when it validates, ``validation/*``) go to
        the logger as one dict and to every callback's ``on_iteration_end``.

        :param progress: show the command line's progress bar (loss, accuracy, tasks/s, validation
            accuracy, ETA) on stderr, or a notebook widget under Jupyter, for this call; ignored
            when :attr:`callbacks` already holds a :class:`~bilevel_maml.progress.ProgressBar`.
        """
        bar = None
        if progress and not any(isinstance(c, ProgressBar) for c in self.callbacks):
            bar = ProgressBar(enabled=True)
            self.callbacks.append(bar)
        try:
            return self._run()
        finally:
            if bar is not None:
                bar.on_train_end(self)  # closed even when the run stops with an error
                self.callbacks.remove(bar)

    def _run(self) -> list[dict]:
        self.train()
        self.stop_signal = None
        # As DDP does: every rank starts from rank 0's θ, then identical averaged updates keep them equal.
        distributed.broadcast_tensors(self.meta_learner.trainable_parameters())
        self._call("on_train_start")
        for iteration in range(self.meta_iteration + 1, self.meta_iterations + 1):
            started = time.perf_counter()
            try:
                stats = self.meta_step()
            except NonFiniteError as error:
                raise NonFiniteError(
                    f"meta-iteration {iteration}: {error}; θ was not updated at this iteration"
                ) from None
            self.meta_iteration = self.theta_iteration = iteration
            stats["tasks_per_second"] = self.meta_batch_size * self.world_size / (time.perf_counter() - started)
            self.history.append(stats)
            metrics = {f"train/{key}": value for key, value in stats.items()}
            if self.valid_env is not None and iteration % self.valid_every == 0:
                metrics.update({f"validation/{k}": v for k, v in self.validate().items()})
            self.logger.log(metrics, step=iteration)
            self._call("on_iteration_end", metrics)
            if self._agree_to_stop():
                break
        self._call("on_train_end")
        return self.history

    def _agree_to_stop(self) -> bool:
        """Whether any rank was asked to stop; every rank asks at the end of every meta-iteration,
        so all stop after the same one."""
        if self.world_size > 1:
            agreed = distributed.largest(self.stop_signal or 0, "agreeing on whether to stop")
            self.stop_signal = agreed or None
        return self.stop_signal is not None

    def _call(self, hook: str, *args):
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)

    # -- state ----------------------------------------------------------------------------------
    def _envs(self) -> dict[str, EpisodicEnv]:
        envs = {"train": self.env, "validation": self.valid_env, "test": self.test_env}
        return {name: env for name, env in envs.items() if env is not None}

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly as if never stopped."""
        upper = self.meta_learner
        rng = saveable_rng_state(global_rng_state())
        return {
            "meta_iteration": self.meta_iteration,
            "theta": upper.module.state_dict(),
            "task_learner_meta_parameters": [p.detach().clone() for p in self.task_learner.meta_parameters()],
            "extra_state": [upper.get_extra_state(), self.task_learner.get_extra_state()],
            "optimizer": upper.optimizer.state_dict(),
            "scheduler": upper.lr_scheduler.state_dict() if upper.lr_scheduler is not None else None,
            "envs": {name: env.state_dict() for name, env in self._envs().items()},
            "best_valid": self.best_valid,
            "history": self.history,
            "rng": rng,
            # each rank's own task stream and random state, so a distributed run resumes exactly
            "ranks": distributed.gather_objects({"train_env": self.env.state_dict(), "rng": rng}),
        }

    def load_parameters(self, state: dict) -> None:
        """θ, the task learner's meta-parameters and the problems' extra state (their
        ``get_extra_state()``) from a :meth:`state_dict` (e.g. ``best.pt``).

        :param state: a :meth:`state_dict` (a checkpoint's ``"engine"`` entry).
        """
        saved = state.get("task_learner_meta_parameters", [])
        extra = list(self.task_learner.meta_parameters())
        if len(saved) != len(extra):  # refused before anything is loaded
            raise ValueError(f"the checkpoint holds {len(saved)} task-learner meta-parameters, "
                             f"{type(self.task_learner).__name__} has {len(extra)}: was it saved by another algorithm?")
        self.meta_learner.module.load_state_dict(state["theta"])
        self.theta_iteration = state["meta_iteration"]
        with torch.no_grad():
            for tensor, value in zip(extra, saved):
                tensor.copy_(value)
        for problem, state_of_its_own in zip((self.meta_learner, self.task_learner),
                                             state.get("extra_state", (None, None))):
            if state_of_its_own is not None:
                problem.set_extra_state(state_of_its_own)

    def load_state_dict(self, state: dict) -> None:
        """Restore everything :meth:`state_dict` saved, so that :meth:`run` continues exactly as if never stopped.

        :param state: a :meth:`state_dict`, written by the same number of processes.
        """
        ranks = state.get("ranks", [None])
        if len(ranks) != self.world_size:
            raise ValueError(f"the checkpoint was written by {len(ranks)} process(es) and this run has "
                             f"{self.world_size}: resume with the same number of processes "
                             f"(torchrun --nproc_per_node {len(ranks)})")
        upper = self.meta_learner
        self.load_parameters(state)
        upper.optimizer.load_state_dict(state["optimizer"])
        if not isinstance(self.execution, execution.CapturedExecution):
            # a checkpoint of a captured CUDA run holds the optimizer in its capturable mode
            execution.make_capturable(upper, False)
        if upper.lr_scheduler is not None and state["scheduler"] is not None:
            upper.lr_scheduler.load_state_dict(state["scheduler"])
        envs = self._envs()
        for name, env_state in state["envs"].items():
            if name in envs:
                envs[name].load_state_dict(env_state)
        self.meta_iteration = state["meta_iteration"]
        # not the saved counts: the run that saved them may have stacked another number of tasks per step
        execution.count_steps_of_whole_iterations(self)
        self.best_valid = state["best_valid"]
        self.history = list(state["history"])
        set_global_rng_state(state["rng"])
        if ranks[self.rank] is not None:
            self.env.load_state_dict(ranks[self.rank]["train_env"])
            set_global_rng_state(ranks[self.rank]["rng"])

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, env: EpisodicEnv, num_tasks: int, per_task: bool = False,
                 inner_steps: int | None = None, per_step: bool = False) -> dict:
        """Adapt a copy of θ on each task's support set and score it on the query set, in vmapped
        batches of :attr:`evaluation_tasks_per_call` tasks (:func:`bilevel_maml.evaluation.evaluate`).

        Returns the mean over tasks and the 95% confidence half-width of the query loss and,
        for classification, of the accuracy (and, with ``per_task``, every task's values).

        :param env: the task stream to draw from (:attr:`valid_env`, :attr:`test_env` or another).
        :param num_tasks: tasks to adapt and score.
        :param per_task: also return every task's values (``report["per_task"]``).
        :param inner_steps: inner steps per task (default: :attr:`eval_inner_steps`).
        :param per_step: also report the scores after 0, 1, … inner steps (``report["per_step"]``;
            logged as ``test/accuracy_after_K_steps`` and so on).
        """
        # Adapt as the inner loops of the meta-iteration that produced θ did (a variant's inner step
        # size schedule, say), also for a checkpoint just loaded or θ before any training.
        for problem in (self.meta_learner, self.task_learner):
            problem.on_meta_iteration_start(max(self.theta_iteration, 1), self.meta_iterations)
        split = "validation" if env is self.valid_env else "test" if env is self.test_env else "evaluation"
        return evaluation.evaluate(self, env, num_tasks, per_task,
                                   self.eval_inner_steps if inner_steps is None else inner_steps, per_step,
                                   on_scored=lambda scored: self._call("on_tasks_scored", split, scored, num_tasks))

    def validation(self) -> dict:
        return self.evaluate(self.valid_env, self.valid_tasks)

    def validate(self) -> dict:
        """Validate now; remembers the best result (highest accuracy, else lowest loss). Under
        torch.distributed rank 0 validates and every rank receives its result."""
        stats = distributed.broadcast_object(self.validation() if self.rank == 0 else None)
        key, sign = ("accuracy", 1) if "accuracy" in stats else ("loss", -1)
        improved = self.best_valid is None or sign * stats[key] > sign * self.best_valid[key]
        if improved:
            self.best_valid = {**stats, "iteration": self.meta_iteration}
        self._call("on_validation_end", stats, improved)
        return stats

    def test(self, num_tasks: int = 600, per_step: bool = False) -> dict:
        """Final report on the test split: mean and 95% CI over ``num_tasks`` tasks.

        :param num_tasks: test tasks to adapt and score.
        :param per_step: also report the scores after 0, 1, … inner steps (``report["per_step"]``;
            logged as ``test/accuracy_after_K_steps`` and so on).
        """
        if self.test_env is None:
            raise ValueError("this engine has no test_env; pass test_env= to report test accuracy")
        stats = self.evaluate(self.test_env, num_tasks, per_step=per_step)
        self.logger.log(evaluation.scalar_scores(stats, "test"), step=self.meta_iteration)
        self._call("on_test_end", stats)
        return stats


__all__ = ["MetaEngine", "NonFiniteError", "mean_and_ci95"]
