"""``build_engine``: a complete meta-training engine from plain arguments.

Every argument is checked before anything is built, so a typo fails in milliseconds with a message
naming the value and what is allowed, not an hour into a run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import warnings

import torch

from bilevel_maml import distributed
from bilevel_maml.data.device_sampler import (AUTO_MAX_EXAMPLES, DeviceTaskSource, UnsupportedTaskSource,
                                              device_memory_budget, sampler_from_taskset)
from bilevel_maml.data.sinusoid import SinusoidTasks
from bilevel_maml.engine import MetaEngine, meta_parameters_outside
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.plugins import load_entry_points, unknown_algorithm
from bilevel_maml.problems import ALGORITHMS, IMAMLLower, IMAMLUpper, split_options
from bilevel_maml.problems.base import META_LR_SCHEDULES, classification_loss, regression_loss
from bilevel_maml.validation import check_choice, check_device, check_non_negative, check_positive, check_positive_int

#: outer optimizers by name (``optimizer="adafactor"``, say)
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adafactor": torch.optim.Adafactor,
}

SPLITS = ("train", "validation", "test")

#: how tasks are drawn: ``device`` holds each split on the engine's device and draws whole batches
#: there, ``learn2learn`` draws task by task on the CPU through the source, ``auto`` is ``device``
#: where the source allows it and the splits fit the memory budget, else ``learn2learn``.
SAMPLERS = ("auto", "device", "learn2learn")


def split_sources(tasksets) -> dict:
    """Accept learn2learn's ``BenchmarkTasksets`` (or any object with train/validation/test),
    a mapping with those keys, or one task source/callable used for every split. A mapping's
    order is kept: its splits are converted and checked in that order (so the first refused is
    the one an error names)."""
    if isinstance(tasksets, Mapping):
        missing = [s for s in SPLITS if s not in tasksets]
        if missing:
            raise ValueError(f"tasksets mapping lacks {missing}; it needs keys {list(SPLITS)}")
        return {s: tasksets[s] for s in tasksets if s in SPLITS}
    if all(hasattr(tasksets, s) for s in SPLITS):
        return {s: getattr(tasksets, s) for s in SPLITS}
    if callable(tasksets) or callable(getattr(tasksets, "sample", None)):
        return {s: tasksets for s in SPLITS}
    raise TypeError(
        "tasksets must have train/validation/test task datasets (as learn2learn's get_tasksets "
        f"returns), be a mapping with those keys, or be one task source; got {type(tasksets).__name__}"
    )


def device_sources(sources: dict, sampler: str, ways: int, shots: int, query_shots: int, device,
                   memory_budget: int | None = None) -> dict:
    """Replace each learn2learn ``Taskset`` of ``sources`` by a :class:`DeviceTaskSampler` of the
    same task distribution, and each :class:`SinusoidTasks` by its :class:`DeviceSinusoidTasks`, as
    ``sampler`` asks. Splits share ``memory_budget`` bytes (default: a quarter of the device's
    memory). Under ``auto`` a split that cannot move stays on the learn2learn path with a one-line
    warning; under ``device`` it is an error."""
    if sampler == "learn2learn":
        return dict(sources)
    left = device_memory_budget(device) if memory_budget is None else memory_budget
    converted: dict = {}
    for split, source in sources.items():
        already = next((converted[s] for s in converted if sources[s] is source), None)
        if already is not None:  # one source for several splits: convert it once
            converted[split] = already
            continue
        if isinstance(source, DeviceTaskSource):
            converted[split] = source.to(device)
            continue
        if isinstance(source, SinusoidTasks):
            converted[split] = source.on_device(shots, query_shots, device)
            continue
        if not hasattr(source, "task_transforms"):  # a callable or a custom source: only the host path fits it
            if sampler == "device":
                raise ValueError(f"sampler='device' needs learn2learn Tasksets, SinusoidTasks or DeviceTaskSources; "
                                 f"the {split} source is a {type(source).__name__}")
            converted[split] = source
            continue
        try:
            converted[split] = sampler_from_taskset(source, ways, shots, query_shots, device, max_bytes=left,
                                                    max_examples=AUTO_MAX_EXAMPLES if sampler == "auto" else None)
            left -= converted[split].nbytes()
        except UnsupportedTaskSource as reason:
            if sampler == "device":
                raise ValueError(f"sampler='device': the {split} split cannot be drawn on the device: {reason}") from None
            warnings.warn(f"the {split} split is sampled task by task on the CPU through learn2learn: {reason}",
                          stacklevel=3)
            converted[split] = source
        except ValueError as error:  # too few classes or examples for the tasks asked for
            raise ValueError(f"the {split} split: {error}") from None
    return converted


def make_optimizer(optimizer, params, lr: float) -> torch.optim.Optimizer:
    """The outer optimizer.

    :param optimizer: a name of :data:`OPTIMIZERS` (``"adam"``, ``"adamw"``, ``"sgd"``,
        ``"adafactor"``; built with their torch defaults and ``lr``), a ``torch.optim.Optimizer``
        class (built as ``optimizer(params, lr=lr)``), or a callable ``factory(params, lr)``
        returning an optimizer.
    :param params: the parameters (or parameter groups) to optimize, as torch optimizers take them.
    :param lr: the learning rate.
    :raises TypeError: for anything else.
    """
    if isinstance(optimizer, str):
        return OPTIMIZERS[check_choice("optimizer", optimizer, OPTIMIZERS)](params, lr=lr)
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer(params, lr=lr)
    if callable(optimizer):
        return optimizer(params, lr)
    raise TypeError(
        f"optimizer must be one of {sorted(OPTIMIZERS)}, a torch.optim.Optimizer class or a "
        f"callable(params, lr); got {optimizer!r}"
    )


def build_engine(
    algorithm: str,
    model: torch.nn.Module,
    tasksets,
    *,
    ways: int | None = None,
    shots: int = 1,
    query_shots: int | None = None,
    inner_steps: int = 1,
    inner_lr: float = 0.4,
    meta_lr: float = 1e-3,
    meta_batch_size: int = 32,
    meta_iterations: int = 1000,
    optimizer="adam",
    scheduler: Callable[[torch.optim.Optimizer], object] | None = None,
    loss_fn: Callable | None = None,
    regression: bool = False,
    lam: float = 1.0,
    cg_iterations: int = 5,
    gradient_clipping: float = 0.0,
    meta_lr_schedule: str | None = None,
    min_meta_lr: float | None = None,
    valid_step: int = 100,
    valid_tasks: int = 100,
    eval_inner_steps: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    logger=None,
    vectorize: bool | int = True,
    sampler: str = "auto",
    cuda_graph: bool | None = None,
    precision: str | None = None,
    algorithm_options: Mapping | None = None,
    verbose: bool = False,
) -> MetaEngine:
    """Build a :class:`MetaEngine` for ``algorithm`` on ``model`` and ``tasksets``: the Upper and
    Lower problems, one seeded task stream per split, the outer optimizer.

    Under ``torch.distributed`` (launched with ``torchrun``) ``meta_batch_size`` is the global
    meta-batch: each of the ``world_size`` ranks adapts ``meta_batch_size / world_size`` tasks
    from its own training task stream (rank 0's is the single-process stream) and the
    meta-gradients are averaged across ranks before every outer step.

    :param algorithm: a name of :data:`~bilevel_maml.ALGORITHMS` (``maml``, ``fomaml``, ``imaml``,
        ``metasgd``, ``anil``, ``maml++``, ``reptile``, ``boil``) or of a registered variant;
        case-insensitive.
    :param model: θ's network; the Upper holds it, every inner loop starts from it. Converted to
        ``dtype`` when one is given.
    :param tasksets: learn2learn's ``get_tasksets(...)`` result (any object with ``train``,
        ``validation``, ``test`` task datasets), a mapping with those keys, or one task source
        (a ``TaskDataset`` or a callable returning ``(inputs, labels)`` for one task) used for
        every split.
    :param ways: classes per task (classification; ignored for regression).
    :param shots: support examples per class (per task for regression).
    :param query_shots: query examples per class (default: ``shots``).
    :param inner_steps: SGD steps of each inner loop.
    :param inner_lr: the inner loop's SGD step size (Meta-SGD's and MAML++'s initial one).
    :param meta_lr: the outer optimizer's learning rate.
    :param meta_batch_size: tasks per meta-update (global under ``torchrun``).
    :param meta_iterations: meta-iterations (outer updates) :meth:`MetaEngine.run` performs.
    :param optimizer: the outer optimizer: ``"adam"``, ``"adamw"``, ``"sgd"``, ``"adafactor"``, a
        ``torch.optim.Optimizer`` class or a ``factory(params, lr)`` (see :func:`make_optimizer`).
    :param scheduler: a callable taking the outer optimizer and returning an LR scheduler,
        stepped once per meta-update; ``None`` keeps ``meta_lr``. It is called once the
        optimizer holds the inner loop's meta-learned tensors too (Meta-SGD's step sizes, in a
        param group of their own), so the schedule reaches them.
    :param loss_fn: ``loss_fn(outputs, targets)`` for support and query sets; a model's extra
        outputs after its prediction reach it too (default: cross-entropy, or MSE with
        ``regression``, of the prediction).
    :param regression: tasks are regression (no classes, MSE loss, no accuracy).
    :param lam: iMAML's proximal strength λ (iMAML only).
    :param cg_iterations: iMAML's conjugate-gradient iterations (iMAML only).
    :param gradient_clipping: clip the meta-gradient to this global norm before each outer step;
        0 disables clipping.
    :param meta_lr_schedule: ``"constant"`` or ``"cosine"`` (see
        :class:`~bilevel_maml.problems.base.MetaLearner`); None: the algorithm's own (constant,
        but cosine for MAML++).
    :param min_meta_lr: where the cosine ends (None: the algorithm's own; 0, MAML++'s 1e-5).
    :param valid_step: validate every this many meta-iterations.
    :param valid_tasks: tasks per validation.
    :param eval_inner_steps: inner steps of each validation and test task (default:
        ``inner_steps``; see :class:`~bilevel_maml.engine.MetaEngine`).
    :param seed: seeds the task streams (each split its own, and each rank its own training stream).
    :param device: where θ, the tasks and the adaptation live (``"cpu"``, ``"cuda"``, ...).
    :param dtype: dtype of θ and the tasks' inputs (and regression targets); default: the model's.
    :param logger: a Betty-style logger (``log(stats, tag, step)``), e.g.
        :class:`~bilevel_maml.logging.WandbLogger`; default: none.
    :param vectorize: ``True`` adapts the meta-batch with ``torch.func.vmap`` in chunks the
        engine sizes to the device's memory, an integer fixes the tasks per chunk (it must divide
        ``meta_batch_size``), ``False`` adapts task by task. Same meta-gradient either way.
    :param sampler: how tasks are drawn, one of :data:`SAMPLERS`: ``"auto"`` holds each
        learn2learn ``Taskset`` split whose transforms have an exact tensor equivalent on
        ``device`` and draws a whole meta-batch there when it fits (:mod:`bilevel_maml.data.device_sampler`:
        the same task distribution, another random stream), else falls back with a warning; it
        draws :class:`~bilevel_maml.data.SinusoidTasks` on ``device`` too;
        ``"device"`` insists; ``"learn2learn"`` keeps learn2learn's task-by-task CPU path, which
        any ``TaskDataset`` or callable also takes.
    :param cuda_graph: on CUDA, capture the meta-iteration as a CUDA graph and replay it:
        ``None`` wherever it works (else a one-line warning says why), ``True`` insists, ``False``
        never. Ignored off CUDA.
    :param precision: ``"fp32"``, ``"tf32"`` (CUDA) or ``"bf16"`` (CUDA autocast); default:
        ``"tf32"`` on CUDA, ``"fp32"`` elsewhere.
    :param algorithm_options: keyword arguments of the algorithm's own Upper/Lower classes
        (MAML++'s ``multi_step_loss=False``, ANIL's ``head="classifier"``, ...); each goes to the
        class whose constructor takes it; a name neither takes is an error listing those they do.
        iMAML's ``lam`` and ``cg_iterations`` are this function's own arguments, not options.
    :param verbose: let Betty log its own INFO messages.
    :returns: the :class:`MetaEngine`, at meta-iteration 0.
    :raises ValueError: for an unknown algorithm, option or sampler, or a value out of range
        (one line naming it and what is allowed).
    """
    load_entry_points()
    if not isinstance(algorithm, str) or algorithm.lower() not in ALGORITHMS:
        raise ValueError(unknown_algorithm(algorithm))
    name = algorithm.lower()
    upper_options, lower_options = split_options(name, dict(algorithm_options or {}))
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not regression and check_positive_int("ways", ways) == 1:
        # one class: every answer is right, the loss is 0 and nothing is learned
        raise ValueError("ways=1: a task of one class is solved before any learning (every answer is its "
                         "class, the loss 0); choose ways >= 2")
    check_positive_int("shots", shots)
    if query_shots is not None:
        check_positive_int("query_shots", query_shots)
    check_positive_int("inner_steps", inner_steps)
    check_positive_int("meta_batch_size", meta_batch_size)
    check_positive_int("meta_iterations", meta_iterations)
    check_positive_int("valid_step", valid_step)
    check_positive_int("valid_tasks", valid_tasks)
    if eval_inner_steps is not None:
        check_positive_int("eval_inner_steps", eval_inner_steps)
    check_positive("inner_lr", inner_lr)
    check_positive("meta_lr", meta_lr)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.float64, ...), got {dtype!r}")
    if name == "imaml":
        check_positive("lam (the iMAML proximal strength λ)", lam)
        check_positive_int("cg_iterations", cg_iterations)
    rank, world_size = distributed.world()
    if meta_batch_size % world_size:
        raise ValueError(f"meta_batch_size={meta_batch_size} must be divisible by the number of processes "
                         f"({world_size}): each rank adapts meta_batch_size / world_size tasks")
    if gradient_clipping != 0:
        check_positive("gradient_clipping (a norm; 0 turns clipping off)", gradient_clipping)
    schedule = {}
    if meta_lr_schedule is not None:
        schedule["meta_lr_schedule"] = check_choice("meta_lr_schedule", meta_lr_schedule, META_LR_SCHEDULES)
    if min_meta_lr is not None:
        schedule["min_meta_lr"] = check_non_negative("min_meta_lr", min_meta_lr)
    sampler = check_choice("sampler", sampler, SAMPLERS)
    device = check_device("device", device)
    sources = split_sources(tasksets)
    sources = device_sources(sources, sampler, ways, shots, shots if query_shots is None else query_shots, device)

    envs = {
        split: EpisodicEnv(
            sources[split], ways, shots, query_shots,
            regression=regression, seed=distributed.stream_seed(seed, i, rank if split == "train" else 0),
            device=device, dtype=dtype,
        )
        for i, split in enumerate(SPLITS)
    }
    for split in sources:
        try:
            envs[split].check()
        except ValueError as error:
            raise ValueError(f"the {split} split: {error}") from None

    if dtype is not None:
        model = model.to(dtype)
    loss_fn = loss_fn if loss_fn is not None else (regression_loss if regression else classification_loss)
    outer = make_optimizer(optimizer, model.parameters(), meta_lr)
    upper_cls, lower_cls = ALGORITHMS[name]
    upper_kwargs = dict(
        meta_batch_size=meta_batch_size // world_size,
        loss_fn=loss_fn,
        gradient_clipping=gradient_clipping,
        **schedule,
    )
    lower_kwargs = dict(inner_lr=inner_lr, inner_steps=inner_steps, loss_fn=loss_fn)
    if issubclass(upper_cls, IMAMLUpper):
        upper_kwargs["cg_iterations"] = cg_iterations
    if issubclass(lower_cls, IMAMLLower):
        lower_kwargs["lam"] = lam
    lower = lower_cls(model, **{**lower_kwargs, **lower_options})
    learned = meta_parameters_outside(outer, lower)  # Meta-SGD's step sizes: a schedule must see their group
    if learned:
        outer.add_param_group({"params": learned})
    upper_kwargs["scheduler"] = scheduler(outer) if scheduler is not None else None
    upper = upper_cls(model, outer, **{**upper_kwargs, **upper_options})
    return MetaEngine(
        upper,
        lower,
        envs["train"],
        meta_iterations=meta_iterations,
        valid_env=envs["validation"],
        test_env=envs["test"],
        valid_step=valid_step,
        valid_tasks=valid_tasks,
        eval_inner_steps=eval_inner_steps,
        device=device,
        logger=logger,
        vectorize=vectorize,
        cuda_graph=cuda_graph,
        precision=precision,
        verbose=verbose,
    )


__all__ = ["OPTIMIZERS", "SAMPLERS", "build_engine", "make_optimizer"]
