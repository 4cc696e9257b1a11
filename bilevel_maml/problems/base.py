"""The two levels every algorithm here shares, as Betty ``Problem`` subclasses.

``MetaLearner`` (the Upper problem) owns the meta-parameters θ and the outer optimizer; its loss is
the adapted learner's loss on the task's query set. ``TaskLearner`` (the Lower problem) holds fast
weights φ, restarts them from θ at every inner loop and takes ``inner_steps`` gradient steps on the
task's support set. Betty drives the order: the Lower steps, and after ``unroll_steps`` steps it
calls the Upper, which accumulates ``meta_batch_size`` tasks before one optimizer step.

A new algorithm is a subclass that overrides a few of these hooks:

* ``TaskLearner.start_params()``: where φ starts (θ itself when the meta-gradient flows through it);
* ``TaskLearner.start_for_task(params, batch)``: a start that depends on the task's support set
  (ProtoMAML's head from class prototypes);
* ``TaskLearner.adapts(name)``: which parameters the inner loop adapts (all by default);
* ``TaskLearner.inner_loss(params, batch, step)``: the support objective (regularisers go here);
* ``TaskLearner.inner_update(params, grads, step)``: one inner step, SGD by default;
* ``TaskLearner.meta_parameters()``: tensors of the inner loop that are meta-learned with θ
  (Meta-SGD's step sizes); the engine adds them to the outer optimizer and to checkpoints;
* ``MetaLearner.meta_gradient(query_loss)``: the gradient it assigns to θ (and to those tensors);
* ``on_meta_iteration_start(iteration, iterations)`` (both problems): schedules that change with
  training (loss weights, learning rates, the derivative order), set before each meta-iteration
  and before an evaluation (for the meta-iteration that produced θ).

``step`` is the index (0 … ``inner_steps`` − 1) of the inner step under way. An evaluation that
adapts with more steps than training (``eval_inner_steps``) passes ``inner_steps`` − 1 to the steps
beyond: per-step values (MAML++'s step sizes and BatchNorm rows) repeat the last trained step's.
A hook may leave it out of its signature (then it is not passed), so variants written before it
existed keep working.
The model's forward sees it too, through :func:`current_inner_step` (per-step BatchNorm reads it),
and ``TaskLearner.trajectory`` holds φ after every inner step taken so far (for a multi-step loss).

Hooks are written for one task. On the engine's vectorized path (the default where the model
allows it) several tasks are adapted at once: φ carries a leading task axis and the base classes
apply the single-task hooks with ``torch.func.vmap``, so a variant gets vectorization for free.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from betty.configs import Config
from betty.problems import Problem
from torch.func import functional_call, vmap

from bilevel_maml.distributed import average_gradients
from bilevel_maml.hypergradient import get_grads, gradients_or_zeros, placed, zeros_for_unused
from bilevel_maml.models import _under_torch_func
from bilevel_maml.validation import (TORCH_FOLDER, check_choice, check_non_negative, check_positive,
                                     check_positive_int, innermost_site_outside)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_INNER_STEP: contextvars.ContextVar[int | None] = contextvars.ContextVar("inner_step", default=None)


def current_inner_step() -> int | None:
    """Inside :meth:`TaskLearner.forward`: the index of the inner step the model is evaluated for
    (the query of an adapted learner counts as its last step); None outside. A module whose
    forward differs per step (per-step BatchNorm, say) reads it here, since ``nn.Sequential``
    and ``functional_call`` pass only the inputs."""
    return _INNER_STEP.get()


@contextmanager
def inner_step_scope(step: int | None):
    token = _INNER_STEP.set(step)
    try:
        yield
    finally:
        _INNER_STEP.reset(token)


@functools.lru_cache(maxsize=None)
def _accepts_step(function) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "step" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def with_step(hook, step: int):
    """``hook`` with ``step=step`` bound when its signature takes a ``step`` (hooks written
    without one are called as they were written).

    :param hook: a hook such as :meth:`TaskLearner.inner_loss`.
    :param step: the inner step to bind.
    """
    function = getattr(hook, "__func__", hook)
    return functools.partial(hook, step=step) if _accepts_step(function) else hook


def predictions(outputs) -> torch.Tensor:
    """The prediction among a model's ``outputs``: the tensor itself, or the first element of a
    tuple or list. A model may return extras after it, ``(logits, features)`` say, for a
    ``loss_fn`` of its own; accuracy and the default losses read the first.

    :param outputs: what the model's forward returned.
    """
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]


def classification_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    """The default loss of classification: cross-entropy of the :func:`predictions`.

    :param outputs: what the model returned, ``(examples, classes)`` scores first.
    :param labels: the class of each example.
    """
    scores = predictions(outputs)
    if _under_torch_func() and scores.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point():
        # vmap runs F.cross_entropy's nll_loss as a decomposition that masks ignore_index (ne, where) at
        # every order of derivative: 24 of a vectorized conv4 meta-iteration's 665 ops at 1 inner
        # step, 72 of 2,189 at 5, each a kernel on a GPU. Picking the log-probabilities is the same loss.
        return -torch.log_softmax(scores, dim=1).gather(1, labels.unsqueeze(1)).mean()
    return F.cross_entropy(scores, labels)


def regression_loss(outputs, targets: torch.Tensor) -> torch.Tensor:
    """The default loss of regression: mean squared error of the :func:`predictions`.

    :param outputs: what the model returned, the predicted values first.
    :param targets: the values to predict.
    """
    return F.mse_loss(predictions(outputs), targets)


def is_classification(outputs, labels: torch.Tensor) -> bool:
    """Whether ``outputs`` hold class scores for integer ``labels`` (then accuracy is reported).

    :param outputs: the model's outputs (see :func:`predictions`), ``(examples, classes)`` for classification.
    :param labels: the targets.
    """
    return predictions(outputs).dim() == 2 and not labels.is_floating_point()


def task_metrics(outputs, labels: torch.Tensor, loss: torch.Tensor) -> dict:
    """Loss, plus accuracy for classification, as 0-d tensors for logging.

    :param outputs: the model's outputs on a query set (see :func:`predictions`).
    :param labels: the query targets.
    :param loss: the query loss already computed from them.
    """
    stats = {"loss": loss.detach()}
    if is_classification(outputs, labels):
        stats["accuracy"] = (predictions(outputs).argmax(dim=1) == labels).float().mean().detach()
    return stats


class NonFiniteError(FloatingPointError):
    """A loss or meta-gradient became NaN or infinite; θ is left as it was."""


class IterationReadout:
    """A meta-iteration's checks (a bool vector: was each finite?) and statistics (0-d tensors),
    joined into one device vector, so that the host reads them with one transfer."""

    def __init__(self, check_names: list[str], checks: torch.Tensor, stats: dict[str, torch.Tensor]):
        """:param check_names: what each check tested, named in the error when one fails.
        :param checks: a bool device vector, one entry per name: was it finite?
        :param stats: the statistics, 0-d device tensors by name.
        """
        self.check_names, self.stat_names = check_names, list(stats)
        self.vector = torch.cat([checks.to(torch.float64), torch.stack(list(stats.values())).to(torch.float64)])

    def read(self) -> dict[str, float]:
        """The statistics as floats; raises :class:`NonFiniteError` for the first failed check."""
        values = self.vector.tolist()
        checks, stats = values[:len(self.check_names)], values[len(self.check_names):]
        stats = dict(zip(self.stat_names, stats))
        for name, passed in zip(self.check_names, checks):
            if not passed:
                detail = f"is {stats['loss']}" if name == "the query loss" else "is not finite"
                raise NonFiniteError(f"{name} {detail}")
        return stats


def _copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    # one multi-tensor kernel per device instead of a copy per tensor
    by_device: dict[torch.device, tuple[list, list]] = {}
    for d, s in zip(destinations, sources):
        by_device.setdefault(d.device, ([], []))
        by_device[d.device][0].append(d)
        by_device[d.device][1].append(s)
    for d, s in by_device.values():
        torch._foreach_copy_(d, s)


class StepSnapshot:
    """θ and the optimizer's state as they were before an outer step, kept on the device so that a
    step the host only later finds non-finite can be undone (:meth:`undo`) without the host
    having read anything before it."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        """:param optimizer: the outer optimizer whose parameters and state are saved.
        """
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.tensors = [t for p in self.params for t in self._tensors_of(p)]
        self.saved = [torch.empty_like(t) for t in self.tensors]
        with torch.no_grad():
            _copy_all(self.saved, self.tensors)

    def _tensors_of(self, p):
        return (p, *(v for v in self.optimizer.state[p].values() if isinstance(v, torch.Tensor)))

    def undo(self) -> None:
        """Put every saved tensor back; state tensors the step created are reset to zero (a
        fresh state)."""
        known = {id(t) for t in self.tensors}
        with torch.no_grad():
            _copy_all(self.tensors, self.saved)
            for p in self.params:
                for t in self._tensors_of(p):
                    if id(t) not in known:
                        t.zero_()


class _BothProblems:
    """What the task learner and the meta-learner add alike to Betty's ``Problem``: no roll-back,
    and a variant's own state in checkpoints."""

    def cache_states(self):
        raise NotImplementedError(
            "EngineConfig(roll_back=True) is not supported: meta-learning problems restart their "
            "inner loop from θ every task, so there is nothing to roll back"
        )

    recover_states = cache_states

    def get_extra_state(self):
        """State of a variant's own that a resumed run needs and that is neither θ, a
        :meth:`~TaskLearner.meta_parameters` tensor nor a function of the meta-iteration (which
        ``on_meta_iteration_start`` recomputes): a running average the meta-gradient uses, say.
        Saved in every checkpoint and handed to :meth:`set_extra_state` on resume, as
        ``torch.nn.Module``'s hooks of the same names are: tensors (copies, ``.clone()``, not ones
        that go on changing) and plain Python values only, which is all a checkpoint loads.
        Default: None (nothing).
        """
        return None

    def set_extra_state(self, state) -> None:
        """Restore what :meth:`get_extra_state` returned when the checkpoint was written.

        :param state: that object, its tensors on the CPU: copy them into your own (in place,
            ``.copy_()``, which also keeps a captured CUDA graph reading them).
        """


def set_learning_rate(group: dict, rate: float) -> None:
    """Set an optimizer param group's learning rate, in place where it is a tensor (a captured CUDA
    graph reads it there).

    :param group: one of ``optimizer.param_groups``.
    :param rate: the new learning rate.
    """
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(rate)
    else:
        group["lr"] = rate


#: the outer learning-rate schedules a :class:`MetaLearner` sets itself (``meta_lr_schedule``)
META_LR_SCHEDULES = ("constant", "cosine")


def cosine_learning_rate(initial: float, minimum: float, iteration: int, iterations: int) -> float:
    """The learning rate of meta-iteration ``iteration`` (1-based) of ``iterations``: ``initial`` at
    the first, falling along half a cosine toward ``minimum`` at the end.

    :param initial: the learning rate at iteration 1.
    :param minimum: the learning rate at the end.
    :param iteration: the meta-iteration, 1-based.
    :param iterations: the run's total.
    """
    return minimum + 0.5 * (initial - minimum) * (1 + math.cos(math.pi * (iteration - 1) / max(iterations, 1)))


class NotVectorizableError(ValueError):
    """A hook (or the model) did what ``vmap`` cannot do over stacked tasks: read a tensor's value on
    the host (``.item()``, ``float(t)``, ``if t:``) or an operation without a batching rule.

    :param what: where and what, ``"MyLower.inner_loss (my_variant.py:12) cannot run on stacked
        tasks (vmap: ...)"``; the message adds the remedy.
    """

    def __init__(self, what: str):
        super().__init__(f"{what}; compute with tensor operations only, or adapt tasks one at a time "
                         f"(--no-vectorize; build_engine(..., vectorize=False))")
        self.what = what

    def __reduce__(self):  # pickled (to another process) as it was made
        return type(self), (self.what,)


def _innermost_outside_torch(error: BaseException) -> str:
    """``Owner.function (file.py:line)`` of the innermost traceback frame outside PyTorch: the line of
    the hook or model that did it."""
    return innermost_site_outside(error, (TORCH_FOLDER,)) or "an operation"


def vmap_over_tasks(fn: Callable, in_dims=0) -> Callable:
    """``torch.func.vmap`` of ``fn`` over stacked tasks. A random op in the model (dropout) draws for
    each task on its own, as on the per-task path; vmap's default would refuse it. What vmap
    cannot batch raises :class:`NotVectorizableError`, one line naming the hook's line and the remedy."""
    mapped = vmap(fn, in_dims=in_dims, randomness="different")

    @functools.wraps(fn)
    def over_tasks(*args):
        try:
            return mapped(*args)
        except RuntimeError as error:
            message = str(error).strip()
            if not (message.startswith("vmap:") or "Batching rule not implemented" in message):
                raise
            raise NotVectorizableError(
                f"{_innermost_outside_torch(error)} cannot run on stacked tasks ({message.split('. ')[0]})") from error

    return over_tasks


class TaskLearner(_BothProblems, Problem):
    """Lower problem: adapts fast weights φ to one task's support set, starting from θ.

    ``module`` is the same ``nn.Module`` the :class:`MetaLearner` holds; the task learner never
    writes into it and evaluates it functionally (``torch.func.functional_call``) with φ.
    """

    #: Keep the graph of each inner step so the meta-gradient can flow through the adaptation.
    second_order = False

    def __init__(
        self,
        module: torch.nn.Module,
        inner_lr: float,
        inner_steps: int = 1,
        loss_fn: LossFn | None = None,
        name: str = "lower",
        config: Config | None = None,
        device=None,
    ):
        """:param module: θ's network, the same object the :class:`MetaLearner` holds.
        :param inner_lr: the inner loop's SGD step size.
        :param inner_steps: SGD steps per inner loop (Betty's ``unroll_steps``).
        :param loss_fn: ``loss_fn(outputs, targets)`` of the support set (default: cross-entropy).
        :param name: the problem's name in Betty's dependency graph.
        :param config: a Betty ``Config`` used as given instead of one built from ``inner_steps``.
        :param device: where the problem's tensors live (the engine sets it).
        """
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module (θ's network), got {type(module).__name__}")
        check_positive("inner_lr", inner_lr)
        if config is None:
            config = Config(unroll_steps=check_positive_int("inner_steps", inner_steps))
        else:
            check_positive_int("config.unroll_steps", config.unroll_steps)
        super().__init__(name=name, config=config, module=module, optimizer=None, device=device)
        self.inner_lr = inner_lr
        self.loss_fn = loss_fn if loss_fn is not None else classification_loss
        self.params: tuple[torch.Tensor, ...] = ()
        self._grads: tuple[torch.Tensor, ...] | None = None
        self.param_names = [name for name, _ in module.named_parameters()]
        #: tasks adapted at once on the vectorized path (φ then has this leading axis), else None
        self.tasks_in_batch: int | None = None
        self._adapted: tuple[tuple[bool, ...], tuple[int, ...]] | None = None  # (requires_grad flags, indices)
        #: index of the inner step under way (0 … inner_steps − 1); it stays at the last step
        #: after the loop, while the meta-learner scores the adapted learner
        self.inner_step = 0
        #: φ after each inner step taken in the current inner loop (``trajectory[-1]`` is ``params``)
        self.trajectory: list[tuple[torch.Tensor, ...]] = []

    @property
    def meta_learner(self) -> "MetaLearner":
        return self.parents[0]

    @property
    def inner_steps(self) -> int:
        return self.config.unroll_steps

    @property
    def keep_update_graph(self) -> bool:
        """Whether each inner update stays in the autograd graph, so that θ and the meta-parameters
        receive gradient through it (the inner gradients themselves are differentiated only when
        :attr:`second_order`). Default: exactly when second order."""
        return self.second_order

    # -- functional model ----------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, params=None, step: int | None = None) -> torch.Tensor:
        """The model with weights ``params`` (default: the current φ), evaluated for inner step
        ``step`` (default: :attr:`inner_step`), which the model reads with :func:`current_inner_step`.

        :param inputs: a batch of inputs (with a leading task axis when vectorized).
        :param params: φ as a tuple in ``module.named_parameters()`` order (default: the current φ).
        :param step: the inner step the model is evaluated for (default: :attr:`inner_step`).
        """
        params = self.params if params is None else params
        weights = dict(zip(self.param_names, params))
        with inner_step_scope(self.inner_step if step is None else step):
            return functional_call(self.module, (weights, dict(self.module.named_buffers())), (inputs,))

    # -- hooks a variant overrides -------------------------------------------------------------
    def start_params(self) -> tuple[torch.Tensor, ...]:
        """φ at the start of an inner loop: a graph-free view of θ (no copy)."""
        return tuple(p.detach().requires_grad_() for p in self.meta_learner.initialization())

    def start_for_task(self, params, batch) -> tuple[torch.Tensor, ...]:
        """φ at the start of one task's inner loop, from :meth:`start_params` and the batch the
        inner loop trains on (:meth:`get_batch`: the task's support set). Default: ``params``
        unchanged (and then it is not called). The inner loop treats the returned weights as
        independent (each inner gradient is a partial derivative), while a meta-gradient that flows
        through ``params`` also flows through what this computes from them (ProtoMAML's prototypes).

        :param params: :meth:`start_params`, a tuple in ``module.named_parameters()`` order.
        :param batch: ``(inputs, targets)`` of one task (vmapped over the stacked tasks when vectorized).
        :returns: φ to start from, one tensor per parameter, each of its parameter's shape.
        """
        return params

    def adapts(self, name: str) -> bool:
        """Whether the inner loop adapts the parameter ``name`` (as in ``module.named_parameters()``).
        A parameter it does not adapt keeps its starting value and gets no inner gradient; one with
        ``requires_grad=False`` is never adapted, whatever this says.

        :param name: a parameter's name in ``module.named_parameters()``.
        """
        return True

    def meta_parameters(self) -> tuple[torch.Tensor, ...]:
        """Leaf tensors of the inner loop itself that the :class:`MetaLearner` learns along with θ
        (added to its optimizer by the engine, saved in checkpoints). None by default."""
        return ()

    def task_loss(self, params, batch, step: int | None = None) -> torch.Tensor:
        """:param params: φ, a tuple in ``module.named_parameters()`` order.
        :param batch: ``(inputs, targets)`` of one task (stacked tasks when vectorized: each hook sees one).
        :param step: the inner step (the query loss of the adapted learner counts as the last step).
        """
        inputs, labels = batch
        return self.loss_fn(self.forward(inputs, params, step), labels)

    def inner_loss(self, params, batch, step: int | None = None) -> torch.Tensor:
        """The support objective at inner step ``step``.

        :param params: φ, a tuple in ``module.named_parameters()`` order.
        :param batch: ``(inputs, targets)`` of the task's support set.
        :param step: the inner step, 0 … ``inner_steps`` − 1 (hooks without this parameter are called without it).
        """
        return self.task_loss(params, batch, step)

    def inner_update(self, params, grads, step: int | None = None) -> tuple[torch.Tensor, ...]:
        """Inner step ``step``. ``grads[i]`` is None for a parameter the learner does not adapt.

        :param params: φ before the step.
        :param grads: the support loss's gradients, one per parameter (None where not adapted).
        :param step: the inner step, 0 … ``inner_steps`` − 1 (hooks without this parameter are called without it).
        :returns: φ after the step.
        """
        if isinstance(self.inner_lr, torch.Tensor):
            return tuple(p if g is None else p - self.inner_lr * g for p, g in zip(params, grads))
        # one kernel per parameter, and one in its derivative, instead of a product and a difference
        return tuple(p if g is None else torch.add(p, g, alpha=-self.inner_lr) for p, g in zip(params, grads))

    def on_meta_iteration_start(self, iteration: int, iterations: int) -> None:
        """Called before meta-iteration ``iteration`` (1-based) of ``iterations``, outside any
        captured CUDA graph: set what changes with training here (in place, for tensors), from
        ``iteration`` alone. Also called before an evaluation, with the meta-iteration that
        produced θ (1 before any training; a loaded checkpoint's own), so that held-out tasks are
        adapted as that iteration's were.

        :param iteration: the meta-iteration about to run, 1-based.
        :param iterations: the run's total.
        """

    def structure(self) -> tuple:
        """What the computation of a meta-iteration depends on besides tensor values; when it
        changes, a captured CUDA graph of the meta-iteration is recorded again."""
        return (self.second_order, self.keep_update_graph)

    def adapted_indices(self) -> tuple[int, ...]:
        """Indices (in ``param_names`` order) of the parameters the inner loop adapts: those
        :meth:`adapts` accepts, less any that does not require a gradient (a frozen parameter is
        held fixed, inner loop and outer step alike)."""
        trainable = tuple(p.requires_grad for p in self.module.parameters())
        if self._adapted is None or self._adapted[0] != trainable:  # read again if a parameter was (un)frozen
            adapted = tuple(i for i, name in enumerate(self.param_names) if trainable[i] and self.adapts(name))
            if not adapted:
                raise ValueError(f"the inner loop would adapt nothing: {type(self).__name__}.adapts() and "
                                 f"requires_grad leave none of the model's parameters ({', '.join(self.param_names)})")
            self._adapted = (trainable, adapted)
        return self._adapted[1]

    def inner_gradients(self, loss, params, create_graph=False) -> tuple[torch.Tensor | None, ...]:
        """Gradients of ``loss`` for the adapted parameters, None for the others.

        :param loss: the support loss.
        :param params: φ.
        :param create_graph: keep the gradients in the graph (second order).
        """
        adapted = self.adapted_indices()
        chosen = [params[i] for i in adapted]
        grads = zeros_for_unused(
            torch.autograd.grad(loss, chosen, create_graph=create_graph, allow_unused=True), chosen)
        return tuple(placed(grads, adapted, len(params)))

    def over_tasks(self, hook, params, batch) -> torch.Tensor:
        """``hook(params, batch)`` for one task, or summed over the stacked tasks when vectorized:
        each task's φ then receives exactly its own task's gradient.

        :param hook: ``hook(params, batch)`` of one task, returning a scalar.
        :param params: φ (stacked over tasks when vectorized).
        :param batch: the batch (stacked over tasks when vectorized).
        """
        def one_number(params, batch):  # inside vmap, for one task
            loss = hook(params, batch)
            if not isinstance(loss, torch.Tensor) or loss.dim():
                # summed over stacked tasks, a loss per example would pass unnoticed
                name = getattr(getattr(hook, "func", hook), "__name__", "its hook")
                got = f"a loss of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"{type(self).__name__}.{name}() gave {got} for one task; a loss is one number per "
                                 f"task (a 0-d tensor: the mean over the task's examples, say)")
            return loss

        return vmap_over_tasks(one_number)(params, batch).sum() if self.tasks_in_batch else one_number(params, batch)

    @property
    def starts_per_task(self) -> bool:
        """Whether :meth:`start_for_task` is overridden (the default is skipped, its batch not read)."""
        return type(self).start_for_task is not TaskLearner.start_for_task

    def starting_point(self, start, batch) -> tuple[torch.Tensor, ...]:
        """:meth:`start_for_task` of ``start`` for one task, or for every stacked task when vectorized
        (φ then gets its leading task axis).

        :param start: :meth:`start_params`.
        :param batch: the batch the inner loop trains on (stacked over tasks when vectorized).
        """
        if not self.starts_per_task:
            return tuple(p.expand(self.tasks_in_batch, *p.shape) for p in start) if self.tasks_in_batch else start
        starts = self._one_per_parameter("start_for_task", self.start_for_task)
        if self.tasks_in_batch:
            starts = vmap_over_tasks(starts, in_dims=(None, 0))
        params = starts(start, batch)
        # Each φ gets a graph node of its own, so that an inner gradient is the partial derivative for
        # that weight: a weight returned as given (θ itself) would otherwise also collect the gradient
        # of the weights the hook computed from it (ProtoMAML's head, through the prototypes).
        return tuple(p.view_as(p) for p in params)

    def apply_update(self, params, grads, step: int = 0) -> tuple[torch.Tensor, ...]:
        """:meth:`inner_update` for one task, or for every stacked task when vectorized.

        :param params: φ (stacked over tasks when vectorized).
        :param grads: their gradients.
        :param step: the inner step.
        """
        update = self._one_per_parameter("inner_update", with_step(self.inner_update, step))
        if self.tasks_in_batch:  # a parameter that is not adapted has no gradient to batch over
            update = vmap_over_tasks(update, in_dims=(0, tuple(None if g is None else 0 for g in grads)))
        return update(params, grads)

    def _one_per_parameter(self, hook_name: str, hook):
        """``hook(params, ...)`` as a tuple, refusing in one line what is not one tensor per entry of
        ``params``, of its shape (a shorter tuple would leave the last parameters at θ unnoticed).
        Inside vmap it sees one task.

        :param hook_name: the hook's name, for the message.
        :param hook: a hook returning φ-shaped tensors from φ (``start_for_task``, ``inner_update``).
        """
        def checked(params, *args):
            returned = hook(params, *args)
            if isinstance(returned, (tuple, list)) and len(returned) == len(params) and all(
                    isinstance(r, torch.Tensor) and r.shape == p.shape for r, p in zip(returned, params)):
                return tuple(returned)
            if isinstance(returned, (tuple, list)):
                tensors, plural = all(isinstance(r, torch.Tensor) for r in returned), "s" if len(returned) != 1 else ""
                got = f"{len(returned)} {'tensor' if tensors else 'value'}{plural} of shape{plural} " + ", ".join(
                    str(tuple(r.shape)) if isinstance(r, torch.Tensor) else type(r).__name__ for r in returned)
            else:
                got = type(returned).__name__
            wanted = ", ".join(f"{name} {tuple(p.shape)}" for name, p in zip(self.param_names, params))
            raise ValueError(f"{type(self).__name__}.{hook_name}() returned {got}; it must return one per parameter, "
                             f"of its shape: {wanted}")
        return checked

    @contextmanager
    def tasks_at_once(self, tasks: int | None):
        """Within the block, hooks treat φ and batches as ``tasks`` stacked tasks (one task if None).

        :param tasks: the number of stacked tasks, or None for one task.
        """
        saved, self.tasks_in_batch = self.tasks_in_batch, tasks
        try:
            yield
        finally:
            self.tasks_in_batch = saved

    # -- Betty hooks ---------------------------------------------------------------------------
    def on_inner_loop_start(self):
        self.inner_step = 0  # before the start: a start_for_task that runs the model runs it for step 0
        self.trajectory = []
        self.params = self.starting_point(self.start_params(), self.get_batch() if self.starts_per_task else None)

    def get_batch(self):
        return self.env.batch["support"]

    def training_step(self, batch):
        """Betty's hook: the support loss of the current inner step.

        :param batch: the support set (:meth:`get_batch`).
        """
        return self.over_tasks(with_step(self.inner_loss, self.inner_step), self.params, batch)

    def get_loss(self, batch):
        # Betty's get_loss reads loss.item() at every step, a host synchronisation per inner step
        # (and one a CUDA graph cannot capture); the statistics stay on the device here.
        """:param batch: the support set.
        """
        loss = self.training_step_exec(batch)
        loss = loss["loss"] if isinstance(loss, dict) else loss
        return loss / self.gas, {"loss": loss.detach()}

    def backward(self, loss, params, paths, create_graph=False, retain_graph=True, allow_unused=True):
        # The gradient is kept off `.grad`: at MAML's first inner step `params` are θ itself, whose
        # `.grad` is accumulating the meta-gradient of the earlier tasks of the meta-batch.
        self._grads = self.inner_gradients(loss, tuple(params), create_graph=self.second_order)

    def optimizer_step(self, *args, **kwargs):
        """Betty's hook: one inner step φ ← :meth:`inner_update` (kept in the graph when :attr:`keep_update_graph`).

        :param args: ignored (Betty's signature).
        :param kwargs: ignored (Betty's signature).
        """
        new_params = self.apply_update(self.params, self._grads, self.inner_step)
        if not self.keep_update_graph:
            new_params = tuple(p if g is None else p.detach().requires_grad_()
                               for p, g in zip(new_params, self._grads))
        self.params = new_params
        self.trajectory.append(new_params)
        self.inner_step = min(self.inner_step + 1, self.inner_steps - 1)

    def zero_grad(self):
        self._grads = None

    def parameters(self):
        return self.params

    def trainable_parameters(self):
        return self.params

    # -- evaluation ----------------------------------------------------------------------------
    def adapt(self, batch, steps: int | None = None, tasks: int | None = None,
              after_step: Callable[[int, tuple], None] | None = None) -> tuple[torch.Tensor, ...]:
        """Adapt a graph-free copy of θ to ``batch`` with the same hooks as training. With ``tasks``,
        ``batch`` holds that many stacked tasks, adapted at once (vmapped) as on the training path;
        the returned φ then has a leading task axis.

        :param batch: ``(inputs, targets)`` of the support set (stacked tasks with ``tasks``).
        :param steps: inner steps to take (default: :attr:`inner_steps`); the hooks of the steps
            past :attr:`inner_steps` see ``step`` = :attr:`inner_steps` − 1, the last one trained.
        :param tasks: the number of stacked tasks in ``batch``, or None for one task.
        :param after_step: called as ``after_step(k, φ)`` with φ after ``k`` = 0 (θ), 1, …, ``steps`` steps.
        """
        steps = self.inner_steps if steps is None else check_positive_int("steps", steps)
        saved_step = self.inner_step
        with torch.enable_grad(), self.tasks_at_once(tasks):
            try:
                self.inner_step = 0
                params = self.starting_point(tuple(p.detach().requires_grad_() for p in self.start_params()), batch)
                if after_step is not None:
                    after_step(0, params)
                for taken in range(steps):
                    step = min(taken, self.inner_steps - 1)
                    self.inner_step = step  # for hooks written without a `step` argument
                    loss = self.over_tasks(with_step(self.inner_loss, step), params, batch)
                    grads = self.inner_gradients(loss, params)
                    params = tuple(p.detach().requires_grad_() for p in self.apply_update(params, grads, step))
                    if after_step is not None:
                        after_step(taken + 1, params)
            finally:
                self.inner_step = saved_step
        return params


class MetaLearner(_BothProblems, Problem):
    """Upper problem: holds θ and scores the adapted task learner on the query set.

    The default :meth:`meta_gradient` follows Betty's semantics (direct gradient plus the
    best-response path through the Lower's ``config.type``) with the corrected hypergradients of
    :mod:`bilevel_maml.hypergradient`; each algorithm overrides it with its own.
    """

    #: where a cosine schedule ends when no ``min_meta_lr`` is given (MAML++: its paper's 1e-5),
    #: or the rate the run starts from where that is lower
    default_min_meta_lr = 0.0

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        meta_batch_size: int = 1,
        loss_fn: LossFn | None = None,
        scheduler=None,
        gradient_clipping: float = 0.0,
        meta_lr_schedule: str = "constant",
        min_meta_lr: float | None = None,
        name: str = "upper",
        config: Config | None = None,
        device=None,
    ):
        """:param module: θ's network; every inner loop starts from its parameters.
        :param optimizer: the outer optimizer over ``module``'s parameters.
        :param meta_batch_size: tasks per meta-update (Betty's ``gradient_accumulation``).
        :param loss_fn: ``loss_fn(outputs, targets)`` of the query set (default: cross-entropy).
        :param scheduler: an LR scheduler over ``optimizer``, stepped once per meta-update, or None.
        :param gradient_clipping: clip the meta-gradient to this global norm; 0 disables clipping.
        :param meta_lr_schedule: ``"constant"``, or ``"cosine"``: every param group's rate falls from
            its initial value along half a cosine toward ``min_meta_lr`` over the run
            (:func:`cosine_learning_rate`). Set in closed form from the iteration before each one
            (:meth:`set_meta_learning_rate`), so a resumed run continues it and one extended to more
            iterations re-spans it over the new total.
        :param min_meta_lr: where the cosine ends (None: :attr:`default_min_meta_lr`, 0 here).
        :param name: the problem's name in Betty's dependency graph.
        :param config: a Betty ``Config`` used as given instead of one built from the arguments above.
        :param device: where the problem's tensors live (the engine sets it).
        """
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module (θ's network), got {type(module).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer over the module's parameters, "
                f"got {type(optimizer).__name__}"
            )
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        learned = [p for p in module.parameters() if p.requires_grad]
        if learned and not any(id(p) in held for p in learned):
            # an optimizer over a copy of the network (or another one) would leave θ as it is
            raise ValueError(f"the optimizer holds none of the module's parameters (θ), so no outer step would "
                             f"change them; build it over this module's parameters() "
                             f"({type(optimizer).__name__}(module.parameters(), ...)), or, to hold θ fixed, set "
                             f"requires_grad=False on them")
        if config is None:
            config = Config(
                gradient_accumulation=check_positive_int("meta_batch_size", meta_batch_size),
                gradient_clipping=gradient_clipping,
            )
        else:
            check_positive_int("config.gradient_accumulation", config.gradient_accumulation)
        meta_lr_schedule = check_choice("meta_lr_schedule", meta_lr_schedule, META_LR_SCHEDULES)
        if meta_lr_schedule != "constant" and scheduler is not None:
            raise ValueError(f"meta_lr_schedule={meta_lr_schedule!r} and a scheduler both set the outer learning "
                             f"rate; pass one of them")
        if min_meta_lr is not None:
            check_non_negative("min_meta_lr", min_meta_lr)
            if meta_lr_schedule == "constant":
                raise ValueError(f"min_meta_lr={min_meta_lr!r} is where a cosine schedule ends, and "
                                 f"meta_lr_schedule is 'constant'; pass meta_lr_schedule='cosine' too")
        if meta_lr_schedule == "cosine":
            start = min(float(group["lr"]) for group in optimizer.param_groups)
            if min_meta_lr is None:
                min_meta_lr = min(self.default_min_meta_lr, start)
            elif min_meta_lr > start:
                raise ValueError(f"min_meta_lr={min_meta_lr!r} is above the outer learning rate {start:g} the cosine "
                                 f"schedule starts from, and it anneals down to min_meta_lr; choose "
                                 f"min_meta_lr <= {start:g}")
        # The scheduler is stepped once per meta-update here, not by Betty once per task.
        super().__init__(name=name, config=config, module=module, optimizer=optimizer, device=device)
        self.lr_scheduler = scheduler
        self.meta_lr_schedule, self.min_meta_lr = meta_lr_schedule, float(min_meta_lr or 0.0)
        self.loss_fn = loss_fn if loss_fn is not None else classification_loss
        self._meta_batch_size = config.gradient_accumulation
        #: set with the task learner's on the vectorized path (one Betty step then covers that many tasks)
        self.tasks_in_batch: int | None = None
        #: False: the non-finite check is read on the host just before the outer step, which is
        #: skipped by raising (one synchronisation per meta-iteration). True (the captured CUDA-graph
        #: step): the step is taken on the device after a copy of θ and the optimizer state is kept
        #: there (StepSnapshot); the engine reads the check with the statistics after the iteration
        #: and, if it failed, puts the copy back before raising.
        self.check_on_device = False
        #: the meta-iteration's statistics and checks, as one device vector (see IterationReadout)
        self.readout: IterationReadout | None = None
        self._step_stats: list[dict[str, torch.Tensor]] = []
        self._read: dict | None = None
        self._snapshot: StepSnapshot | None = None

    @property
    def task_learner(self) -> TaskLearner:
        return self.children[0]

    def on_meta_iteration_start(self, iteration: int, iterations: int) -> None:
        """Called before meta-iteration ``iteration`` (1-based) of ``iterations``, outside any
        captured CUDA graph: set what changes with training here (in place, for tensors), from
        ``iteration`` alone. Also called before an evaluation, with the meta-iteration that
        produced θ (1 before any training; a loaded checkpoint's own), so that held-out tasks are
        adapted as that iteration's were.

        :param iteration: the meta-iteration about to run, 1-based.
        :param iterations: the run's total.
        """

    def set_meta_learning_rate(self, iteration: int, iterations: int) -> None:
        """Set the outer optimizer's rates for meta-iteration ``iteration`` (1-based) of
        ``iterations`` from ``meta_lr_schedule``; the engine calls it before each meta-iteration.
        Each param group's initial rate is kept in its ``"initial_lr"``, as torch's schedulers keep
        it, so it is saved with the optimizer's state.

        :param iteration: the meta-iteration about to run, 1-based.
        :param iterations: the run's total.
        """
        if self.meta_lr_schedule == "constant":
            return
        for group in self.optimizer.param_groups:
            if "initial_lr" not in group:  # read once: a captured run's rate is a device tensor
                group["initial_lr"] = float(group["lr"])
            initial = group["initial_lr"]
            set_learning_rate(group, cosine_learning_rate(initial, self.min_meta_lr, iteration, iterations))

    def structure(self) -> tuple:
        """What the computation of a meta-iteration depends on besides tensor values (see
        :meth:`TaskLearner.structure`)."""
        return ()

    @property
    def schedules_learning_rate(self) -> bool:
        """Whether the outer learning rate changes during training (``meta_lr_schedule``, an LR
        scheduler, or a variant's own schedule), so a captured step must read it from a device
        tensor."""
        return self.meta_lr_schedule != "constant" or self.lr_scheduler is not None

    @property
    def meta_batch_size(self) -> int:
        return self._meta_batch_size

    def reduce_over_tasks(self, grads) -> tuple[torch.Tensor, ...]:
        """Gradients with respect to φ, summed over the task axis when vectorized, so they are
        shaped like θ. (The query loss is already averaged over tasks.)

        :param grads: gradients with respect to φ (stacked over tasks when vectorized).
        """
        if self.tasks_in_batch:
            return tuple(g.sum(0) for g in grads)
        return tuple(grads)

    # -- Betty hooks ---------------------------------------------------------------------------
    def get_batch(self):
        return self.env.batch["query"]

    def score_query(self, batch, params=None, step: int | None = None):
        """``(predictions, labels, loss)`` of the task learner with φ = ``params`` (default: the
        adapted φ) on the query ``batch`` at inner step ``step`` (default: the last); when
        vectorized, the loss is the mean over the stacked tasks and predictions/labels are
        flattened over them. The loss sees the model's whole output (:func:`predictions`).

        :param batch: the query set ``(inputs, targets)``.
        :param params: φ (default: the task learner's adapted φ).
        :param step: the inner step the model is evaluated for (default: the last).
        """
        inputs, labels = batch
        learner = self.task_learner
        params = learner.params if params is None else params
        if self.tasks_in_batch:
            outputs = vmap_over_tasks(functools.partial(learner.forward, step=step))(inputs, params)
            loss = vmap_over_tasks(self.loss_fn)(outputs, labels).mean()
            return predictions(outputs).flatten(0, 1), labels.flatten(0, 1), loss
        outputs = learner.forward(inputs, params, step)
        return predictions(outputs), labels, self.loss_fn(outputs, labels)

    def training_step(self, batch):
        """Betty's hook: the query loss and statistics of the adapted task learner.

        :param batch: the query set (:meth:`get_batch`).
        :returns: a dict: ``loss``, what θ's meta-gradient differentiates, and 0-d statistics
            (``accuracy`` for classification), each averaged over the meta-batch and logged as
            ``train/<name>``. An override adds to it: ``{**out, "loss": out["loss"] + penalty,
            "penalty": penalty.detach()}`` (a plain tensor is taken as the loss).
        """
        outputs, labels, loss = self.score_query(batch)
        return {**task_metrics(outputs, labels, loss), "loss": loss}

    def get_loss(self, batch):
        # Betty's get_loss reads loss.item() at every step (a host synchronisation, and one a CUDA
        # graph cannot capture); the statistics stay on the device until the iteration ends.
        """:param batch: the query set.
        """
        out = self.training_step_exec(batch)
        loss = out["loss"] if isinstance(out, dict) else out
        stats = {k: v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(v, device=loss.device)
                 for k, v in (out.items() if isinstance(out, dict) else [("loss", loss)])}
        self._step_stats.append(stats)
        return loss / self.gas, stats

    def backward(self, loss, params, paths, create_graph=False, retain_graph=True, allow_unused=True):
        grads = self._checked_meta_gradient(self.meta_gradient(loss), params)
        # a frozen parameter gets no gradient, so the outer optimizer leaves it as it is
        self.set_grads(params, [g.detach() if p.requires_grad and g is not None else None
                                for p, g in zip(params, grads)])

    def _checked_meta_gradient(self, grads, params) -> tuple:
        # A variant's meta_gradient that differentiates with respect to φ returns, on the vectorized
        # path, gradients with a task axis; assigned to θ they would fail deep inside PyTorch.
        grads = tuple(grads)
        if len(grads) != len(params):
            raise ValueError(f"{type(self).__name__}.meta_gradient returned {len(grads)} gradients for "
                             f"{len(params)} meta-learned tensors; return one per entry of trainable_parameters() "
                             f"(θ's, then the task learner's meta_parameters()), None where there is none")
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is not None and g.shape != p.shape:
                name = next((name for name, q in self._named_trainable_parameters() if q is p),
                            f"meta-learned tensor {i}")
                stacked = self.tasks_in_batch and g.dim() == p.dim() + 1 and g.shape[1:] == p.shape
                remedy = ("; differentiated with respect to φ, gradients carry a task axis when tasks are adapted "
                          "together: sum it with self.reduce_over_tasks(...), as FOMAMLUpper does") if stacked else ""
                raise ValueError(f"{type(self).__name__}.meta_gradient returned a gradient of shape "
                                 f"{tuple(g.shape)} for {name!r} of shape {tuple(p.shape)}{remedy}")
        return grads

    def _named_trainable_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """:meth:`trainable_parameters` with the names messages give them."""
        return [*self.module.named_parameters(),
                *((f"task learner's meta-parameter {i}", p) for i, p in enumerate(self._task_learner_meta_parameters()))]

    def meta_gradient(self, query_loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The gradient given to θ for one task (or stacked tasks): the direct gradient plus Betty's
        best-response paths; each algorithm overrides it.

        :param query_loss: the query loss of the adapted learner.
        :returns: one tensor per entry of :meth:`trainable_parameters`, shaped like it (None: no
            gradient, the outer step leaves that tensor); a gradient taken with respect to the
            task learner's φ has a task axis on the vectorized path, which :meth:`reduce_over_tasks` sums.
        """
        theta = self.trainable_parameters()
        grads = gradients_or_zeros(query_loss, theta, retain_graph=True)
        for path in self.paths:
            grads = tuple(g + h for g, h in zip(grads, get_grads(query_loss, path, retain_graph=True)))
        return grads

    def optimizer_step(self, *args, **kwargs):
        """Betty's hook: check the meta-gradient is finite (on the device, or on the host before θ changes),
        average it across ranks, and take the outer step.

        :param args: ignored (Betty's signature).
        :param kwargs: ignored (Betty's signature).
        """
        average_gradients(self.trainable_parameters())  # across torch.distributed ranks; no-op otherwise
        named = [(name, p) for name, p in self._named_trainable_parameters() if p.grad is not None]
        stats = {key: torch.stack([s[key] for s in self._step_stats]).mean() for key in self._step_stats[0]}
        self._step_stats = []
        # A sum of |g| is finite exactly when every entry is (short of overflowing float's range),
        # and one multi-tensor kernel takes it for every gradient.
        magnitudes = torch._foreach_norm([p.grad for _, p in named], ord=1) if named else []
        checks = torch.isfinite(torch.stack([stats["loss"], *magnitudes]))  # (stack promotes to their widest dtype)
        names = ["the query loss", *(f"the meta-gradient of {name!r}" for name, _ in named)]
        self.readout = IterationReadout(names, checks, stats)
        if self.check_on_device:
            self._read = None
            self._snapshot = StepSnapshot(self.optimizer)
            self._outer_step()
        else:
            self._read = self.readout.read()  # raises before θ changes if a check failed
            self._outer_step()

    def _outer_step(self):
        if self.gradient_clipping > 0.0:
            self.clip_grad()
        self.optimizer.step()

    def end_iteration(self) -> dict:
        """The meta-iteration's statistics as floats (read from the device now if the check was
        left there), then one step of the LR scheduler. Raises :class:`NonFiniteError` naming what
        was not finite; θ and the optimizer then hold their values from before the iteration."""
        if self._read is not None:
            stats = self._read
        else:
            try:
                stats = self.readout.read()
            except NonFiniteError:
                self._snapshot.undo()
                raise
        self._read = None
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return stats

    def initialization(self) -> list[torch.Tensor]:
        """θ: the module's parameters, where every inner loop starts."""
        return list(self.module.parameters())

    def _task_learner_meta_parameters(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.task_learner.meta_parameters()) if self.children else ()

    def parameters(self):
        return self.trainable_parameters()

    def trainable_parameters(self):
        """Everything meta-learned: θ, then the task learner's :meth:`~TaskLearner.meta_parameters`."""
        return [*self.initialization(), *self._task_learner_meta_parameters()]

    def train(self):
        super().train()
        self.module.train()

    def eval(self):
        super().eval()
        self.module.eval()
