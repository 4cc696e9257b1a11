"""MAML++ (Antoniou et al., "How to train your MAML", ICLR 2019): MAML with the fixes that make it train stably.

Each piece is on by default, as in the paper, and each is an option of the two classes:

* **multi-step loss** (``multi_step_loss``): the query loss after *every* inner step, weighted; the
  weights start equal (1/K each) and over the first ``multi_step_loss_iterations`` meta-iterations
  the earlier steps' weights fall linearly to 0.03/K while the last step's rises to take up the
  rest; after that only the last step's loss counts (:func:`multi_step_weights`).
* **derivative-order annealing** (``first_order_iterations``): the first N meta-iterations keep the
  inner updates in the graph but not the inner gradients' own graph (first order: dφ_{k+1}/dθ is
  taken to be dφ_k/dθ), then second order. 0 turns it off.
* **per-step BatchNorm weights and biases** (``per_step_bn_weights``) and **per-step running
  statistics** (``per_step_bn_statistics``): every BatchNorm layer of the model gets one row of
  γ/β and of running mean/variance per inner step (:class:`PerStepBatchNorm`). γ/β are
  meta-learned, not adapted. Training normalises with the batch's statistics and, once per
  meta-iteration, moves each step's running statistics toward the mean over the meta-batch's tasks
  of that step's support statistics (by ``bn_momentum``, after a cumulative mean over the first
  1/``bn_momentum`` meta-iterations); evaluation (``module.eval()``) normalises with them.
* **learned per-layer per-step inner learning rates** (``learned_inner_lr``, "LSLR"): one step size
  per parameter tensor and inner step, starting at ``inner_lr``, meta-learned with θ.
* **cosine annealing of the outer learning rate** (``cosine_lr``) from its initial value to
  ``min_meta_lr`` over the run: the ``meta_lr_schedule="cosine"`` every
  :class:`~bilevel_maml.problems.base.MetaLearner` has, on by default here.

The meta-gradient is MAML's, d/d(θ, α) of the (weighted) query loss, through the inner updates.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from bilevel_maml import distributed
from bilevel_maml.problems.base import META_LR_SCHEDULES, current_inner_step, vmap_over_tasks, with_step
from bilevel_maml.problems.maml import MAMLLower, MAMLUpper
from bilevel_maml.validation import check_choice

_STATISTICS: contextvars.ContextVar[list | None] = contextvars.ContextVar("bn_statistics", default=None)


@contextmanager
def recording_statistics():
    """Within the block, :class:`PerStepBatchNorm` layers in training mode append the mean and
    unbiased variance of their input (per channel) to the yielded list, in call order."""
    found: list[torch.Tensor] = []
    token = _STATISTICS.set(found)
    try:
        yield found
    finally:
        _STATISTICS.reset(token)


class PerStepBatchNorm(nn.Module):
    """A BatchNorm layer with one row of weight/bias and of running statistics per inner step,
    chosen by :func:`~bilevel_maml.problems.base.current_inner_step` (0 outside the inner loop;
    steps past the last row use the last row). Made from an existing layer by
    :func:`use_per_step_batch_norm`, which keeps the layer's ``weight``/``bias`` Parameter
    objects (reshaped in place to one row per step), so an optimizer built over the model before
    still holds them.

    The forward pass writes no buffer (vmap and CUDA graphs need that): running statistics are
    updated by :meth:`MAMLPlusPlusLower.commit_statistics`, from what
    :func:`recording_statistics` recorded.

    :param layer: the BatchNorm layer it replaces (its γ/β Parameters are kept).
    :param steps: rows: the inner steps.
    :param per_step_weights: one row of γ/β per step (else the layer's single γ/β for every step).
    :param statistics: one row of running statistics per step, used in evaluation (else the batch's statistics always).
    """

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm, steps: int, per_step_weights: bool = True,
                 statistics: bool = True):
        super().__init__()
        self.steps, self.eps, self.num_features = steps, layer.eps, layer.num_features
        self.per_step_weights = per_step_weights and layer.affine
        self.weight, self.bias = layer.weight, layer.bias
        if self.per_step_weights:
            with torch.no_grad():
                for p in (self.weight, self.bias):
                    p.data = p.data.unsqueeze(0).repeat(steps, *[1] * p.dim())
        self.statistics = statistics
        if statistics:
            like = dict(dtype=layer.weight.dtype if layer.affine else torch.float32,
                        device=layer.weight.device if layer.affine else None)
            self.register_buffer("running_mean", torch.zeros(steps, layer.num_features, **like))
            self.register_buffer("running_var", torch.ones(steps, layer.num_features, **like))
            #: meta-iterations whose statistics were committed (a cumulative mean until 1/momentum
            #: of them, as BatchNorm with momentum=None, so that the initial 0/1 fade at once)
            self.register_buffer("commits", torch.zeros((), **like))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, steps={self.steps}, per_step_weights={self.per_step_weights}, "
                f"statistics={self.statistics}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: activations ``(batch, channels, ...)``, normalised with the current inner step's row.
        """
        step = min(current_inner_step() or 0, self.steps - 1)
        weight, bias = self.weight, self.bias
        if self.per_step_weights:
            weight, bias = weight[step], bias[step]
        if self.statistics and not self.training:
            return F.batch_norm(x, self.running_mean[step], self.running_var[step], weight, bias, False, 0.0, self.eps)
        found = _STATISTICS.get()
        if found is not None and self.statistics:
            channels = [0, *range(2, x.dim())]
            detached = x.detach()
            found += [detached.mean(channels), detached.var(channels, unbiased=True)]
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)


def use_per_step_batch_norm(module: nn.Module, steps: int, per_step_weights: bool = True,
                            statistics: bool = True) -> list[PerStepBatchNorm]:
    """Replace every BatchNorm layer of ``module`` (in place) by a :class:`PerStepBatchNorm` with
    ``steps`` rows; returns the new layers, in module order. Layers already per-step are kept.

    :param module: the model, changed in place.
    :param steps: rows per layer: the inner steps.
    :param per_step_weights: one row of γ/β per step.
    :param statistics: one row of running statistics per step.
    """
    layers = []
    for name, child in list(module.named_modules()):
        if isinstance(child, PerStepBatchNorm):
            layers.append(child)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            parent_name, _, attribute = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            layer = PerStepBatchNorm(child, steps, per_step_weights, statistics)
            setattr(parent, attribute, layer)
            layers.append(layer)
    return layers


def multi_step_weights(steps: int, iteration: int, anneal_iterations: int) -> list[float]:
    """The multi-step loss weights of meta-iteration ``iteration`` (1-based): 1/K each at the start;
    the first K − 1 fall by 1/(K·A) per iteration (A = ``anneal_iterations``) to at least 0.03/K,
    the last rises by (K − 1)/(K·A) per iteration to at most 1 − (K − 1)·0.03/K.

    :param steps: inner steps K.
    :param iteration: the meta-iteration, 1-based.
    :param anneal_iterations: A, the meta-iterations of the annealing.
    """
    done = iteration - 1
    decay = 1.0 / steps / anneal_iterations
    floor = 0.03 / steps
    weights = [max(1.0 / steps - done * decay, floor) for _ in range(steps - 1)]
    weights.append(min(1.0 / steps + done * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return weights


class MAMLPlusPlusLower(MAMLLower):
    """MAML's inner loop with learned per-layer per-step step sizes, per-step BatchNorm and
    derivative-order annealing (see the module docstring for each option).

    :param module: θ's network (its BatchNorm layers become :class:`PerStepBatchNorm`).
    :param inner_lr: the initial inner step size of every layer and step.
    :param learned_inner_lr: meta-learn one step size per parameter tensor and inner step (LSLR).
    :param per_step_bn_weights: one row of BatchNorm γ/β per inner step.
    :param per_step_bn_statistics: per-step running statistics, used in evaluation (off by default; see the docs' Results page).
    :param bn_momentum: how far each commit moves the running statistics, in (0, 1].
    :param first_order_iterations: first-order meta-iterations at the start (None: the first third of the run; 0: second order throughout).
    :param kwargs: passed to :class:`~bilevel_maml.problems.maml.MAMLLower` (``inner_steps``, ``loss_fn``, ...).
    """

    def __init__(self, module: nn.Module, inner_lr: float, *, learned_inner_lr: bool = True,
                 per_step_bn_weights: bool = True, per_step_bn_statistics: bool = False,
                 bn_momentum: float = 0.1, first_order_iterations: int | None = None, **kwargs):
        super().__init__(module, inner_lr, **kwargs)
        if first_order_iterations is not None and (isinstance(first_order_iterations, bool)
                                                   or not isinstance(first_order_iterations, int)
                                                   or first_order_iterations < 0):
            raise ValueError(f"first_order_iterations must be an integer >= 0 (0: second order throughout; "
                             f"default: the first third of the run), got {first_order_iterations!r}")
        if not 0.0 < bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1], got {bn_momentum!r}")
        self.learned_inner_lr = learned_inner_lr
        self.first_order_iterations = first_order_iterations
        self.bn_momentum = bn_momentum
        self.bn_layers = []
        if per_step_bn_weights or per_step_bn_statistics:
            self.bn_layers = use_per_step_batch_norm(module, self.inner_steps, per_step_bn_weights,
                                                     per_step_bn_statistics)
            self.param_names = [name for name, _ in module.named_parameters()]
        self._bn_parameters = {id(p) for layer in self.bn_layers if layer.per_step_weights
                               for p in (layer.weight, layer.bias)}
        self.learning_rates = nn.ParameterList(
            nn.Parameter(torch.full((self.inner_steps,), float(inner_lr), dtype=p.dtype, device=p.device))
            for p in module.parameters()) if learned_inner_lr else None
        self._second_order = True
        self._statistics_sum: torch.Tensor | None = None
        self._statistics_tasks = 0

    # -- schedules ---------------------------------------------------------------------------------
    @property
    def second_order(self) -> bool:
        return self._second_order

    @property
    def keep_update_graph(self) -> bool:
        return True  # first order still differentiates through the updates (to θ, the step sizes)

    def on_meta_iteration_start(self, iteration, iterations):
        first_order = self.first_order_iterations if self.first_order_iterations is not None else iterations // 3
        self._second_order = iteration > first_order

    # -- hooks -------------------------------------------------------------------------------------
    def adapts(self, name):
        # per-step γ/β are meta-learned only, as in the paper
        return id(self.module.get_parameter(name)) not in self._bn_parameters

    def meta_parameters(self):
        return tuple(self.learning_rates) if self.learning_rates is not None else ()

    def inner_update(self, params, grads, step):
        if self.learning_rates is None:
            return super().inner_update(params, grads, step)
        row = min(step, self.inner_steps - 1)
        return tuple(p if g is None else p - rate[row] * g for p, rate, g in zip(params, self.learning_rates, grads))

    # -- per-step running statistics -----------------------------------------------------------------
    @property
    def records_statistics(self) -> bool:
        return self.module.training and any(layer.statistics for layer in self.bn_layers)

    def training_step(self, batch):
        if not self.records_statistics:
            return super().training_step(batch)
        loss_hook = with_step(self.inner_loss, self.inner_step)

        def loss_and_statistics(params, batch):
            with recording_statistics() as found:
                loss = loss_hook(params, batch)
            return loss, torch.cat(found)

        if self.tasks_in_batch:
            losses, statistics = vmap_over_tasks(loss_and_statistics)(self.params, batch)
            loss, statistics, tasks = losses.sum(), statistics.sum(0), self.tasks_in_batch
        else:
            (loss, statistics), tasks = loss_and_statistics(self.params, batch), 1
        self._add_statistics(statistics, tasks)
        return loss

    def _add_statistics(self, statistics: torch.Tensor, tasks: int) -> None:
        if self._statistics_sum is None:
            self._statistics_sum = torch.zeros(self.inner_steps, statistics.numel(), dtype=statistics.dtype,
                                               device=statistics.device)
        self._statistics_sum[self.inner_step] += statistics
        if self.inner_step == self.inner_steps - 1:
            self._statistics_tasks += tasks

    def commit_statistics(self) -> None:
        """Move each step's running statistics toward the mean of that step's support statistics
        over this meta-iteration's tasks (over every rank's, under torch.distributed)."""
        if self._statistics_sum is None:
            return
        total = self._statistics_sum
        tasks = torch.full((1,), float(self._statistics_tasks), dtype=total.dtype, device=total.device)
        distributed.sum_tensors([total, tasks], "summing MAML++'s BatchNorm statistics over the ranks")
        mean = total / tasks
        with torch.no_grad():
            offset = 0
            for layer in (layer for layer in self.bn_layers if layer.statistics):
                channels = layer.num_features
                layer.commits += 1
                weight = torch.clamp(1.0 / layer.commits, min=self.bn_momentum)
                for buffer in (layer.running_mean, layer.running_var):
                    buffer.lerp_(mean[:, offset:offset + channels].to(buffer.dtype), weight)
                    offset += channels
        self._statistics_sum.zero_()
        self._statistics_tasks = 0


class MAMLPlusPlusUpper(MAMLUpper):
    """MAML's meta-gradient of the multi-step query loss, with the outer learning rate cosine-annealed.

    :param args: passed to :class:`~bilevel_maml.problems.maml.MAMLUpper` (``module``, ``optimizer``).
    :param multi_step_loss: weight the query losses of every inner step (else the last step's only).
    :param multi_step_loss_iterations: meta-iterations over which the weights anneal toward the last step (None: the first tenth of the run).
    :param cosine_lr: cosine-anneal the outer learning rate over the run (``meta_lr_schedule="cosine"``).
    :param min_meta_lr: where the cosine ends (None: 1e-5, or the outer rate where that is lower).
    :param meta_lr_schedule: ``"constant"`` or ``"cosine"`` (None: as ``cosine_lr`` says), as for
        every :class:`~bilevel_maml.problems.base.MetaLearner`.
    :param kwargs: passed to :class:`~bilevel_maml.problems.maml.MAMLUpper` (``meta_batch_size``, ``loss_fn``, ...).
    """

    default_min_meta_lr = 1e-5  # the paper's

    def __init__(self, *args, multi_step_loss: bool = True, multi_step_loss_iterations: int | None = None,
                 cosine_lr: bool = True, min_meta_lr: float | None = None, meta_lr_schedule: str | None = None,
                 **kwargs):
        if meta_lr_schedule is None:
            meta_lr_schedule = "cosine" if cosine_lr else "constant"
        meta_lr_schedule = check_choice("meta_lr_schedule", meta_lr_schedule, META_LR_SCHEDULES)
        if meta_lr_schedule == "cosine" and not cosine_lr:
            raise ValueError("MAML++'s cosine_lr=False and meta_lr_schedule='cosine' disagree; pass one of them")
        if meta_lr_schedule == "cosine" and kwargs.get("scheduler") is not None:
            raise ValueError("MAML++'s cosine_lr and a scheduler both set the outer learning rate; pass "
                             "cosine_lr=False to use the scheduler")
        super().__init__(*args, meta_lr_schedule=meta_lr_schedule, min_meta_lr=min_meta_lr, **kwargs)
        if multi_step_loss_iterations is not None and (isinstance(multi_step_loss_iterations, bool) or not
                                                       isinstance(multi_step_loss_iterations, int)
                                                       or multi_step_loss_iterations < 1):
            raise ValueError(f"multi_step_loss_iterations must be an integer >= 1 (default: the first tenth of "
                             f"the run), got {multi_step_loss_iterations!r}")
        self.multi_step_loss, self.multi_step_loss_iterations = multi_step_loss, multi_step_loss_iterations
        #: the multi-step loss weights of the current meta-iteration, a device tensor (a captured
        #: graph reads them where they are), or None while only the last step's loss counts
        self.step_weights: torch.Tensor | None = None

    @property
    def cosine_lr(self) -> bool:
        """Whether the outer learning rate is cosine-annealed (``meta_lr_schedule == "cosine"``)."""
        return self.meta_lr_schedule == "cosine"

    def on_meta_iteration_start(self, iteration, iterations):
        steps = self.task_learner.inner_steps
        anneal = self.multi_step_loss_iterations or max(1, iterations // 10)
        if self.multi_step_loss and steps > 1 and iteration <= anneal:
            weights = torch.tensor(multi_step_weights(steps, iteration, anneal), dtype=torch.float64)
            if self.step_weights is None:
                self.step_weights = torch.empty(steps, device=next(self.module.parameters()).device,
                                                dtype=next(self.module.parameters()).dtype)
            self.step_weights.copy_(weights)
        else:
            self.step_weights = None

    def structure(self):
        return (self.step_weights is not None,)

    def training_step(self, batch):
        final = super().training_step(batch)  # the last step's loss and accuracy
        learner = self.task_learner
        if self.step_weights is None or len(learner.trajectory) < 2:
            return final
        losses = [self.score_query(batch, params, step)[2] for step, params in enumerate(learner.trajectory[:-1])]
        losses.append(final["loss"])
        weighted = (self.step_weights * torch.stack(losses)).sum()
        return {**final, "loss": weighted, "final_step_loss": final["loss"].detach()}

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.task_learner.commit_statistics()
