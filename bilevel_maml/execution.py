"""How a meta-iteration is executed: task by task, in vmapped chunks of tasks, or replayed as a CUDA graph.

:class:`~bilevel_maml.engine.MetaEngine` says *what* a meta-iteration is (an env step per task or
chunk, the inner steps, the Upper's step, in Betty's order); the strategies here say *how* it runs:

* :class:`EagerExecution`: Betty steps the problems, ``tasks_per_step`` tasks at a time (task by
  task, or ``torch.func.vmap`` over stacked tasks: see :func:`plan_tasks_per_call`). The host
  reads the iteration's statistics and non-finite checks once, just before the outer step.
* :class:`CapturedExecution` (CUDA): the same steps, captured once as a CUDA graph after a few
  eager warm-up iterations and replayed, so a meta-iteration is one launch instead of ~1,700. The
  non-finite check is read after the replay, which undoes the outer step if it failed.

Also here: how many tasks each vmapped call adapts (:func:`plan_vectorization`), the precision
policy (``fp32``/``tf32``/``bf16``) and :class:`HostReadWatch`, which finds the operations that
would read a tensor on the host inside a captured region.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import warnings
from itertools import chain, compress
from pathlib import Path

import torch
from torch.func import vmap
from torch.overrides import TorchFunctionMode

from bilevel_maml.env import global_rng_state, set_global_rng_state
from bilevel_maml.problems.base import NotVectorizableError
from bilevel_maml.validation import TORCH_FOLDER, check_positive_int, code_site, frame_in, innermost_site_outside

# -- tasks per vmapped call -------------------------------------------------------------------------
#: On CPU, the largest activation of one vmapped call should stay within about this many bytes.
#: Measured on a 2-core CPU with conv4 on 28×28 images (largest activation 64×28×28 floats an
#: example): 32 tasks of 80 examples in one call ran 2.9× slower than task by task, while calls
#: of 80-160 examples were the fastest; with Finn et al.'s strided conv4 (a quarter of that per
#: example) 8 tasks of 80 examples were fastest, and a 40-unit MLP ran fastest whole.
CPU_ACTIVATION_BYTES_PER_CALL = 160 * 64 * 28 * 28 * 4
#: ... and vectorizing pays only when at least this many tasks fit in such a call: with 80
#: examples per task, chunks of 2 and 4 tasks of conv4 were 1.15× slower than task by task.
CPU_MIN_TASKS_PER_CALL = 4
#: On an accelerator, evaluation adapts as many tasks per call as keep the largest activation
#: within this (training takes the whole meta-batch).
ACCELERATOR_ACTIVATION_BYTES_PER_CALL = 2 * 2**30


def largest_cpu_chunk(meta_batch_size: int, examples_per_task: int, activation_bytes_per_example: int) -> int:
    """The most tasks (a divisor of the meta-batch, at least 1) whose largest activation fits one CPU call."""
    task_bytes = examples_per_task * activation_bytes_per_example
    return max((c for c in range(1, meta_batch_size + 1)
                if meta_batch_size % c == 0 and c * task_bytes <= CPU_ACTIVATION_BYTES_PER_CALL), default=1)


def plan_tasks_per_call(device: torch.device, meta_batch_size: int, examples_per_task: int,
                        activation_bytes_per_example: int) -> int:
    """Tasks per vmapped call when ``vectorize=True`` (1: task by task): the whole meta-batch on
    accelerators, cache-sized chunks on CPU."""
    if device.type != "cpu":
        return meta_batch_size
    chunk = largest_cpu_chunk(meta_batch_size, examples_per_task, activation_bytes_per_example)
    return chunk if chunk >= min(CPU_MIN_TASKS_PER_CALL, meta_batch_size) else 1


def evaluation_tasks_per_call(device: torch.device, examples_per_task: int, activation_bytes_per_example: int) -> int:
    """Tasks adapted per vmapped call in evaluation (1: task by task), by the same activation budget."""
    budget = CPU_ACTIVATION_BYTES_PER_CALL if device.type == "cpu" else ACCELERATOR_ACTIVATION_BYTES_PER_CALL
    tasks = budget // max(1, examples_per_task * activation_bytes_per_example)
    return tasks if tasks >= CPU_MIN_TASKS_PER_CALL or device.type != "cpu" else 1


def probe_vmap(task_learner, meta_learner, inputs) -> tuple[str | None, int | None]:
    """Runs the model under ``vmap`` on two stacked probe tasks. Returns why it cannot be
    vectorized (or None) and the bytes of its largest activation per example: the largest output
    of any submodule (under ``vmap``, one task's), per example."""
    params = tuple(p.detach().expand(2, *p.shape) for p in meta_learner.initialization())
    largest = [inputs[0, 0].numel() * inputs.element_size()]

    def record(module, args, output):
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size() // inputs.shape[1])

    hooks = [m.register_forward_hook(record) for m in meta_learner.module.modules()]
    try:
        with torch.no_grad():
            vmap(task_learner.forward, randomness="different")(inputs, params)  # torch's own error, for the warning
    except Exception as error:  # any failure means: not vectorizable, use the per-task path
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}", None
    finally:
        for hook in hooks:
            hook.remove()
    return None, largest[0]


def check_model_takes_tasks(engine, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Run the model with θ on one task's support set, as the per-task path would, and score it with
    both learners' ``loss_fn``: a model that cannot take the tasks (another channel count, input
    size or number of features; fewer class scores than ``ways`` under the default losses) or a loss
    that is not one number per task is named in one line before training, not mistaken for a model
    that cannot be vectorized or left to fail deep inside torch at the first meta-iteration (or,
    summed over stacked tasks, to pass unnoticed). The model's buffers and the global random
    streams are put back.

    :param engine: the :class:`~bilevel_maml.engine.MetaEngine` being built.
    :param inputs: one task's support inputs.
    :param targets: their labels (or regression targets).
    """
    from bilevel_maml.problems.base import classification_loss, predictions

    env, module = engine.env, engine.meta_learner.module
    ran = engine.task_learner.module  # the network the task learner runs (θ's, as a rule)
    buffers, outside = [b.clone() for b in ran.buffers()], global_rng_state()  # BatchNorm's statistics, dropout's draws
    try:
        with torch.no_grad():
            outputs = engine.task_learner.forward(inputs, tuple(p.detach() for p in engine.meta_learner.initialization()))
    except RuntimeError as error:
        site = innermost_site_outside(error, (TORCH_FOLDER,))
        site = f" at {site}" if site else ""
        raise ValueError(f"{type(module).__name__} cannot take the tasks' inputs: a support set of shape "
                         f"{tuple(inputs.shape)} ({str(inputs.dtype).removeprefix('torch.')}) failed{site}: "
                         f"{type(error).__name__}: {str(error).strip().splitlines()[0]}") from None
    finally:
        set_global_rng_state(outside)
        with torch.no_grad():
            for buffer, value in zip(ran.buffers(), buffers):
                buffer.copy_(value)
    default_losses = engine.meta_learner.loss_fn is classification_loss and engine.task_learner.loss_fn is classification_loss
    scores = predictions(outputs)
    if not env.regression and default_losses and scores.dim() == 2 and scores.shape[1] < env.ways:
        raise ValueError(f"{type(module).__name__} gives {scores.shape[1]} class score{'s' if scores.shape[1] != 1 else ''} "
                         f"per example, and the tasks are {env.ways}-way: build it with (at least) {env.ways} outputs")
    for whose, loss_fn in (("task learner", engine.task_learner.loss_fn), ("meta-learner", engine.meta_learner.loss_fn)):
        with torch.no_grad():
            loss = loss_fn(outputs, targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = f"loss of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"the {whose}'s loss_fn ({getattr(loss_fn, '__name__', type(loss_fn).__name__)}) gives a "
                             f"{shape} for one task's examples; a loss is one number per task (a 0-d tensor: the "
                             f"mean over the task's examples, say)")


def plan_vectorization(engine, vectorize: bool | int) -> None:
    """Set how many tasks each vmapped call of ``engine`` adapts, in training and in evaluation
    (``engine.tasks_per_step``, ``engine.evaluation_tasks_per_call``), from its model run under vmap
    on two tasks of its training stream (drawn without advancing it); a model that cannot run under
    vmap leaves it task by task, with a warning saying why. First the model is run on one of those
    tasks as the per-task path would (:func:`check_model_takes_tasks`); ``vectorize=False`` draws that
    one task and stops there.

    :param engine: the :class:`~bilevel_maml.engine.MetaEngine` being built.
    :param vectorize: ``True`` (choose, :func:`plan_tasks_per_call`), a divisor of the meta-batch
        size, or ``False`` (task by task).
    """
    if vectorize and vectorize is not True:
        try:
            check_positive_int("vectorize", vectorize)
        except (TypeError, ValueError) as error:  # True and False are allowed too
            raise type(error)(f"vectorize must be True, False or the tasks adapted per call (an integer >= 1), "
                              f"got {vectorize!r}") from None
        if engine.meta_batch_size % vectorize:
            raise ValueError(f"vectorize={vectorize} must divide meta_batch_size={engine.meta_batch_size}")
    saved = engine.env.state_dict()
    try:
        (support_inputs, support_targets), (query_inputs, _) = engine.env.sample_tasks(2 if vectorize else 1)
    finally:
        engine.env.load_state_dict(saved)
    check_model_takes_tasks(engine, support_inputs[0], support_targets[0])
    if not vectorize:
        return
    blocker, engine.activation_bytes_per_example = probe_vmap(engine.task_learner, engine.meta_learner, support_inputs)
    if blocker is not None:
        warnings.warn(f"{type(engine.meta_learner.module).__name__} cannot be vectorized ({blocker}); "
                      f"adapting tasks one at a time instead", stacklevel=3)
        return
    examples = support_inputs.shape[1] + query_inputs.shape[1]
    tasks = vectorize if vectorize is not True else plan_tasks_per_call(
        engine.device, engine.meta_batch_size, examples, engine.activation_bytes_per_example)
    if tasks > 1 or vectorize is not True:
        _stack_tasks(engine, tasks)
    engine.evaluation_tasks_per_call = evaluation_tasks_per_call(
        engine.device, examples, engine.activation_bytes_per_example)


def _stack_tasks(engine, tasks: int | None) -> None:
    """One Betty step of each problem covers ``tasks`` stacked tasks, the Upper accumulating the
    rest of the meta-batch; None: one task, not stacked."""
    engine.vectorized = tasks is not None
    engine.tasks_per_step = engine.env.tasks_per_step = tasks or 1
    engine.env.stacked = tasks is not None
    engine.task_learner.tasks_in_batch = engine.meta_learner.tasks_in_batch = tasks
    engine.meta_learner.gas = engine.meta_batch_size // (tasks or 1)
    count_steps_of_whole_iterations(engine)


def count_steps_of_whole_iterations(engine) -> None:
    """Set Betty's step counters to what ``engine.meta_iteration`` whole meta-iterations leave at
    the engine's present tasks per step. They count Betty steps (one task, or one set of stacked
    tasks), and the Upper takes its outer step when its count reaches a multiple of the steps per
    meta-batch: counts left by another number of tasks per step (a run falling back to one task
    at a time, a checkpoint of a run that stacked another number) would make it step in the
    middle of a meta-batch."""
    env_steps, steps = betty_steps_per_iteration(engine)
    engine.global_step = engine.task_learner._count = engine.meta_iteration * steps
    engine.task_learner._global_step = engine.global_step
    engine.meta_learner._count = engine.meta_iteration * env_steps


def betty_steps_per_iteration(engine) -> tuple[int, int]:
    """The env (and Upper) steps and the Lower steps of one meta-iteration: one env step per task,
    or per set of stacked tasks, and ``inner_steps`` Lower steps after each."""
    env_steps = engine.meta_batch_size // engine.tasks_per_step
    return env_steps, env_steps * engine.inner_steps


def one_task_at_a_time(engine) -> None:
    """Undo :func:`plan_vectorization`: every task adapted on its own, in training and evaluation."""
    _stack_tasks(engine, None)
    engine.evaluation_tasks_per_call = 1


# -- precision --------------------------------------------------------------------------------------
#: ``fp32``: IEEE float32 everywhere (no TF32); ``tf32``: TF32 convolutions (PyTorch's default on
#: CUDA) and TF32 matrix multiplications; ``bf16``: autocast to bfloat16, TF32 for what stays float32.
#: ``tf32`` and ``bf16`` are CUDA modes.
PRECISIONS = ("fp32", "tf32", "bf16")


def default_precision(device: torch.device) -> str:
    return "tf32" if torch.device(device).type == "cuda" else "fp32"


def check_precision(precision: str | None, device, dtype: torch.dtype | None = None) -> str:
    """``precision`` resolved for ``device`` (None: ``tf32`` on CUDA, ``fp32`` elsewhere), or a
    ValueError naming what is allowed.

    :param precision: ``"fp32"``, ``"tf32"``, ``"bf16"`` or None (the device's default).
    :param device: the engine's device.
    :param dtype: θ's dtype (``tf32``/``bf16`` apply to float32 only).
    """
    device = torch.device(device)
    if precision is None:
        return default_precision(device)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError(f"precision='tf32' is a CUDA tensor-core mode; on {device.type} use fp32")
    if precision == "bf16" and device.type != "cuda":
        raise ValueError(f"precision='bf16' is a CUDA mode; on {device.type} use fp32")
    if precision != "fp32" and dtype is not None and dtype != torch.float32:
        raise ValueError(f"precision={precision!r} lowers float32 arithmetic; with dtype={dtype} use precision='fp32'")
    return precision


def _tf32(enabled: bool) -> None:
    mode = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cudnn.conv.fp32_precision = mode
        torch.backends.cuda.matmul.fp32_precision = mode
    else:  # PyTorch before the fp32_precision settings
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled


def _tf32_state():
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def _set_tf32_state(state) -> None:
    if isinstance(state[0], str):
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = state
    else:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = state


@contextlib.contextmanager
def precision_scope(precision: str, device, capturing: bool = False):
    """Run the block at ``precision`` on ``device``; the global TF32 settings are restored after.

    :param precision: a value :func:`check_precision` returned.
    :param device: the engine's device.
    :param capturing: inside a CUDA-graph capture (autocast's cache is then off).
    """
    device = torch.device(device)
    saved = _tf32_state() if device.type == "cuda" else None
    try:
        if device.type == "cuda":
            _tf32(precision != "fp32")
        if precision == "bf16":
            # autocast's cast cache would hold tensors of the capture's memory pool across replays
            with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not capturing):
                yield
        else:
            yield
    finally:
        if saved is not None:
            _set_tf32_state(saved)


# -- reading tensors on the host --------------------------------------------------------------------
#: Tensor methods that copy a value to the host (a synchronisation on an accelerator, and an error
#: inside CUDA-graph capture), and operations whose output shape depends on tensor values.
HOST_READS = frozenset({"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__",
                        "__complex__", "__format__", "nonzero", "unique", "unique_consecutive",
                        "masked_select", "argwhere"})
_NOT_THE_CALLER = (Path(__file__).resolve(), TORCH_FOLDER, Path(warnings.__file__).resolve())


class HostReadWatch(TorchFunctionMode):
    """Records the first operation in the block that reads a tensor on the host, and where: the
    innermost frame outside PyTorch (``HostReadWatch.first``, one line, or None)."""

    def __init__(self):
        super().__init__()
        self.first: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.first is None and name in HOST_READS:
            self.first = f"{self._caller()} reads a tensor on the host ({name})"
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _caller() -> str:
        frame = inspect.currentframe()
        while frame is not None:
            if not frame_in(frame, _NOT_THE_CALLER):
                return code_site(frame, frame.f_lineno)
            frame = frame.f_back
        return "an operation"


class SyncWatch:
    """CUDA: records the first operation in the block that makes the host wait for the device (a
    read of a value, a copy from pageable host memory such as ``torch.tensor(..., device="cuda")``),
    and where, with PyTorch's sync debug mode. Such an operation is an error inside CUDA-graph
    capture; :class:`HostReadWatch` names the reads, this catches the copies too."""

    MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self):
        self.first: str | None = None

    def __enter__(self):
        self._mode = torch.cuda.get_sync_debug_mode()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("always", message=self.MESSAGE)
        shown = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if self.MESSAGE not in str(message):
                return shown(message, category, filename, lineno, file, line)
            if self.first is None:
                self.first = f"{HostReadWatch._caller()} makes the host wait for the device (a synchronizing operation)"

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self._mode)
        self._warnings.__exit__(*exc)
        return False


# -- strategies -------------------------------------------------------------------------------------
class EagerExecution:
    """Betty steps the problems in Python, one meta-iteration at a time.

    :param engine: the :class:`~bilevel_maml.engine.MetaEngine` it runs.
    """

    name = "eager"

    def __init__(self, engine):
        self.engine = engine

    def run_tasks(self) -> None:
        """The steps of one meta-iteration: each task (or chunk) gets an env step and its inner
        steps, and the Upper steps after each; the last Upper step takes the outer step."""
        engine = self.engine
        for _ in range(betty_steps_per_iteration(engine)[1]):
            engine.global_step += 1
            engine.train_step()

    def meta_step(self) -> dict:
        with precision_scope(self.engine.precision, self.engine.device):
            self.run_tasks_trying_stacked()
        return self.engine.meta_learner.end_iteration()

    def run_tasks_trying_stacked(self) -> None:
        """:meth:`run_tasks`; a meta-iteration on stacked tasks that a variant's hook stops (it reads
        a tensor on the host, say: :class:`NotVectorizableError`), the first or a later one, is put
        back as it was before it began and run again one task at a time, as the rest of the run
        is, with a one-line warning naming the hook's line."""
        engine = self.engine
        if not engine.vectorized:
            self.run_tasks()
            return
        # a hook may stop stacked tasks only at some iteration (`if iteration % 100 == 0: print(loss.item())`),
        # so each is ready to be redone: ~0.15 ms of host time on a 2-core CPU, against a meta-iteration's tens
        before = _BeforeAnIteration(engine)
        try:
            self.run_tasks()
        except NotVectorizableError as error:
            before.restore()
            one_task_at_a_time(engine)
            warnings.warn(f"{error.what}; adapting tasks one at a time instead", stacklevel=2)
            self.run_tasks()


_PLAIN = (int, float, bool, str, type(None))


#: how deep lists, tuples and dicts of plain values may nest and still count as plain
_PLAIN_DEPTH = 4


_CONTAINERS = frozenset((list, dict, tuple))


def _copied(attributes: dict) -> dict:
    return {name: _containers_copied(value) for name, value in attributes.items()}


def _containers_copied(value, depth: int = _PLAIN_DEPTH):
    """``value`` with lists and dicts of its own down to ``depth`` (tuples rebuilt around them), so
    that what changes them in place leaves this copy as it was; what they hold is shared."""
    kind = type(value)
    if depth == 0 or kind not in _CONTAINERS:
        return value
    if kind is dict:
        return {k: _containers_copied(v, depth - 1) for k, v in value.items()}
    if _CONTAINERS.isdisjoint(map(type, value)):  # nothing inside to copy: C loops, not Python's
        return value if kind is tuple else list(value)  # a tuple: a random generator's state, say
    return kind(_containers_copied(v, depth - 1) for v in value)


class _BeforeAnIteration:
    """What a meta-iteration changes before its outer step, as it was before it began: the Python
    attributes of its problems and its training env (their lists and dicts copied, 4 deep) and of
    the engine (rebound), the task stream, the global random states (dropout), the model's
    buffers; and no gradients on θ."""

    def __init__(self, engine):
        self.engine = engine
        # The engine's own containers (its history, which grows with the run) change between
        # meta-iterations, not in one: copying them would cost each iteration more than the last.
        self.engine_attributes = dict(vars(engine))
        self.objects = [engine.meta_learner, engine.task_learner, engine.env]
        self.attributes = [_copied(vars(obj)) for obj in self.objects]
        self.env_state = engine.env.state_dict()
        self.rng = global_rng_state()
        self.buffers = [b.clone() for b in engine.meta_learner.module.buffers()]

    def restore(self) -> None:
        engine = self.engine
        for obj, attributes in [(engine, self.engine_attributes), *zip(self.objects, map(_copied, self.attributes))]:
            vars(obj).clear()
            vars(obj).update(attributes)
        engine.env.load_state_dict(self.env_state)
        set_global_rng_state(self.rng)
        with torch.no_grad():
            for buffer, saved in zip(engine.meta_learner.module.buffers(), self.buffers):
                buffer.copy_(saved)
        for p in engine.meta_learner.trainable_parameters():
            p.grad = None


def capture_blocker(engine) -> str | None:
    """Why this engine's meta-iteration cannot be captured as a CUDA graph, known before running
    it (None: try). What only running shows (a hook reading a tensor on the host, say) is found
    by :class:`CapturedExecution` during its first warm-up iteration."""
    if engine.world_size > 1:
        return "with several processes the meta-gradient's all-reduce runs between the graph's kernels"
    if not engine.env.on_device:
        return "the training tasks are drawn on the host (use the device-resident sampler, --sampler device)"
    optimizer = engine.meta_learner.optimizer
    if "capturable" not in optimizer.defaults and type(optimizer) is not torch.optim.SGD:
        return f"{type(optimizer).__name__} has no capturable mode (Adam, AdamW, RMSprop and SGD do)"
    if engine.meta_learner.schedules_learning_rate and type(optimizer) is torch.optim.SGD:
        return "SGD's learning rate is a number fixed into the graph, so a learning-rate schedule would not reach it"
    return None


def _is_plain(value, depth: int = _PLAIN_DEPTH) -> bool:
    """A number, flag, string or None, or lists, tuples and dicts of them, nested at most
    :data:`_PLAIN_DEPTH` deep (a schedule of per-step values, a dict of hyperparameters)."""
    if isinstance(value, _PLAIN):
        return True
    if depth == 0:
        return False
    if isinstance(value, dict):
        return all(isinstance(k, _PLAIN) and _is_plain(v, depth - 1) for k, v in value.items())
    return isinstance(value, (list, tuple)) and all(_is_plain(v, depth - 1) for v in value)


def _plain_copy(value):
    """A plain value (:func:`_is_plain`) with lists and dicts of its own at every depth (tuples
    rebuilt as tuples), so that a recorded state stays as it is and is put back as it was."""
    if isinstance(value, (list, tuple)):
        copied = [_plain_copy(v) for v in value]
        return tuple(copied) if isinstance(value, tuple) else copied
    if isinstance(value, dict):
        return {k: _plain_copy(v) for k, v in value.items()}
    return value


def python_state(objects: dict) -> dict:
    """The plain-valued attributes (numbers, strings, flags, lists and dicts of them) of ``objects``."""
    return {(name, attr): _plain_copy(value)
            for name, obj in objects.items() for attr, value in vars(obj).items() if _is_plain(value)}


def restore_python_state(objects: dict, state: dict) -> None:
    for (name, attr), value in state.items():
        setattr(objects[name], attr, _plain_copy(value))


def advance_counters(engine) -> None:
    """What one meta-iteration does to the Python-side counters of the engine, its problems and
    its training env, for a replay that ran its kernels without its Python."""
    env_steps, steps = betty_steps_per_iteration(engine)
    engine.global_step += steps
    engine.task_learner._count += steps
    engine.task_learner._global_step = engine.global_step
    engine.meta_learner._count += env_steps
    engine.env.tasks_sampled += engine.meta_batch_size


class CapturedExecution(EagerExecution):
    """CUDA: a few eager warm-up meta-iterations (on a side stream, as CUDA graphs need), then the
    meta-iteration captured once and replayed. Falls back to :class:`EagerExecution`, with a
    one-line warning, when the first warm-up iteration reads a tensor on the host or the capture
    fails. Each replay draws its tasks inside the graph (the env's generator is registered with
    it), so the host only launches the graph and reads the iteration's statistics.

    :param engine: the :class:`~bilevel_maml.engine.MetaEngine` it runs (on CUDA).
    """

    name = "cuda-graph"
    #: eager meta-iterations before capture (lazy initialisation of cuDNN, cuBLAS, autograd and
    #: the optimizer state must happen outside the graph)
    WARMUP_ITERATIONS = 3

    def __init__(self, engine):
        super().__init__(engine)
        self.graph = None
        self.warmups_done = 0
        self._stream = None
        #: what the recorded graph took as given, checked before each replay
        self.recorded = None

    def _objects(self) -> dict:
        engine = self.engine
        return {"engine": engine, "upper": engine.meta_learner, "lower": engine.task_learner, "env": engine.env}

    def meta_step(self) -> dict:
        engine = self.engine
        upper = engine.meta_learner
        if self.graph is not None and self.recorded.structure_changed(engine):
            # a schedule changed what a meta-iteration computes (MAML++ turning second order, say):
            # warm the new computation up and record it again
            self.graph, self.warmups_done = None, 0
        if self.graph is not None and self.recorded.settings_changed(engine):
            self._fall_back(changed_setting(engine, self.recorded.settings))
            return self.engine.execution.meta_step()
        if self.graph is None:
            make_capturable(upper)
            upper.check_on_device = True
            if self.warmups_done < self.WARMUP_ITERATIONS:
                return self._warm_up()
            if not self._capture():
                return self.engine.execution.meta_step()
        self.graph.replay()
        advance_counters(engine)
        return upper.end_iteration()

    # -- the two CUDA-only operations ------------------------------------------------------------
    @contextlib.contextmanager
    def _on_side_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.engine.device)
        current = torch.cuda.current_stream(self.engine.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            yield
        current.wait_stream(self._stream)

    def _record(self, run):
        """``run``'s kernels as a CUDA graph (its Python runs once, now, and never again)."""
        engine = self.engine
        graph = torch.cuda.CUDAGraph()
        if engine.env.on_device:
            graph.register_generator_state(engine.env.generator)
        if self._stream is None:
            self._stream = torch.cuda.Stream(engine.device)
        with torch.cuda.graph(graph, stream=self._stream), \
                precision_scope(engine.precision, engine.device, capturing=True):
            run()
        return graph

    # ------------------------------------------------------------------------------------------
    def _watches(self) -> list:
        return [HostReadWatch(), SyncWatch()] if self.engine.device.type == "cuda" else [HostReadWatch()]

    def _warm_up(self) -> dict:
        engine = self.engine
        watches = self._watches() if self.warmups_done == 0 else []
        with self._on_side_stream(), precision_scope(engine.precision, engine.device), \
                contextlib.ExitStack() as stack:
            for watch in watches:
                stack.enter_context(watch)
            self.run_tasks_trying_stacked()
        self.warmups_done += 1
        stats = engine.meta_learner.end_iteration()
        found = next((watch.first for watch in watches if watch.first is not None), None)
        if found is not None:
            self._fall_back(found)
        return stats

    def _capture(self) -> bool:
        engine = self.engine
        objects = self._objects()
        saved = python_state(objects)
        stream_state = engine.env.generator.get_state() if engine.env.on_device else None
        try:
            graph = self._record(self.run_tasks)
        except Exception as error:  # whatever fails in capture, the eager path still works
            restore_python_state(objects, saved)
            for p in engine.meta_learner.trainable_parameters():
                p.grad = None
            if stream_state is not None:
                # a generator registered with a failed capture stays in capture mode: start a new
                # one where the old one stood
                engine.env.generator = engine.env.tasks.generator(0)
                engine.env.generator.set_state(stream_state)
            self._fall_back(f"capturing failed ({type(error).__name__}: {str(error).strip().splitlines()[0]})")
            return False
        restore_python_state(objects, saved)
        self.graph, self.recorded = graph, RecordedState(engine)
        return True

    def _fall_back(self, reason: str) -> None:
        engine = self.engine
        engine.meta_learner.check_on_device = False
        make_capturable(engine.meta_learner, False)
        engine.use_execution(EagerExecution(engine), reason)


#: Betty's step counters, which each replay advances (:func:`advance_counters`)
_COUNTERS = ("_count", "_global_step")


def _holders(engine) -> dict:
    """The problems and every module of their models, by (problem, dotted name): ("upper", "") for
    the meta-learner itself, ("upper", "module.features.0.") for a layer of its model; a module both
    problems hold is named once, under the first."""
    found, seen = {}, set()
    for side, problem in (("upper", engine.meta_learner), ("lower", engine.task_learner)):
        found[(side, "")] = problem
        model = getattr(problem, "module", None)
        if isinstance(model, torch.nn.Module):
            for name, module in model.named_modules(prefix="module"):
                if id(module) not in seen:
                    seen.add(id(module))
                    found[(side, f"{name}.")] = module
    return found


#: what every nn.Module holds for PyTorch (hooks, parameters, buffers and submodules, the last two
#: compared entry by entry), not a setting of the layer
_PYTORCH_BOOKKEEPING = frozenset(vars(torch.nn.Module())) - {"training"}


def settings(engine) -> dict:
    """The plain attributes (numbers, flags, strings, lists and dicts of them) of the problems and
    of every module of their models, but Betty's step counters; which tensor each tensor attribute
    and registered buffer is; and each module's class. A variant's hook that reads a number (a strength its
    ``on_meta_iteration_start`` anneals, a layer's dropout rate) has the value it had at capture
    baked into the graph, and one that reads a tensor reads that tensor's memory: a new number, a
    new tensor bound in place of the old, or a layer swapped for another means the graph no longer
    computes what eager would."""
    found = {}
    for (side, prefix), holder in _holders(engine).items():
        if prefix:
            found[(side, prefix + "__class__")] = _Same(type(holder))
            found.update({(side, prefix + name): _Same(buffer)
                          for name, buffer in holder._buffers.items() if buffer is not None})
        for name, value in vars(holder).items():
            if prefix and name in _PYTORCH_BOOKKEEPING:
                continue
            if isinstance(value, torch.Tensor):
                found[(side, prefix + name)] = _Same(value)
            elif _is_plain(value) and not (name in _COUNTERS and not prefix):
                found[(side, prefix + name)] = _plain_copy(value)
    return found


class _Same:
    """Equal to another only for the same object: the same tensor (its values may change: in place
    is what a replay reads), the same class."""

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj

    def __repr__(self):
        if isinstance(self.obj, torch.Tensor):
            return f"a tensor of shape {tuple(self.obj.shape)} at {self.obj.data_ptr():#x}"
        return self.obj.__name__


def changed_setting(engine, recorded: dict) -> str:
    """The one-line reason :class:`CapturedExecution` gives for falling back when :func:`settings` changed."""
    now, unset = settings(engine), "unset"
    side, name = next(key for key in [*recorded, *now] if recorded.get(key, unset) != now.get(key, unset))
    problem = engine.meta_learner if side == "upper" else engine.task_learner
    return (f"{type(problem).__name__}.{name} changed after the capture ({recorded.get((side, name), unset)!r} → "
            f"{now.get((side, name), unset)!r}), and a replay computes with the value it was recorded with; hold a "
            f"value that changes during training in a tensor updated in place (.fill_), or return it from "
            f"structure() to record the graph again when it changes")


class RecordedState:
    """What a recorded graph took as given: the problems' :meth:`structure` with which of θ's
    tensors were frozen, and their :func:`settings`. Checked before every replay, so it is kept
    cheap: the frozen flags are read from the tensors θ had when recorded (the ones the graph
    updates), and :func:`settings` is compared only when an attribute of a problem or of a module
    of its model, a buffer or a submodule was bound to another object, or a list or dict changed in place,
    since the last check that passed; a replay whose hooks changed nothing costs a walk of those
    dicts.

    :param engine: the :class:`~bilevel_maml.engine.MetaEngine` whose graph was just recorded.
    """

    def __init__(self, engine):
        self.parameters = list(engine.meta_learner.trainable_parameters())
        self.structure = structure(engine, self.parameters)
        self.settings = settings(engine)
        self._note_bindings(engine)

    def structure_changed(self, engine) -> bool:
        return structure(engine, self.parameters) != self.structure

    def settings_changed(self, engine) -> bool:
        if not self._rebound():
            return False
        if settings(engine) != self.settings:
            return True
        self._note_bindings(engine)  # bound anew to equal values: nothing to check until the next change
        return False

    def _note_bindings(self, engine) -> None:
        # one flat sequence of names and one of the values that count (Betty's counters and
        # PyTorch's bookkeeping masked out), walked by C iterators: conv4 and its two problems hold
        # ~600 entries, and a replay should cost the host microseconds
        holders = _holders(engine)
        problems = [vars(holder) for (_, prefix), holder in holders.items() if not prefix]
        layers = [vars(holder) for (_, prefix), holder in holders.items() if prefix]
        contents = [d for (_, prefix), holder in holders.items() if prefix for d in (holder._buffers, holder._modules)]
        self.dicts = [*problems, *layers, *contents]
        self.names = list(chain.from_iterable(self.dicts))
        self.compared = ([name not in _COUNTERS for d in problems for name in d]
                         + [name not in _PYTORCH_BOOKKEEPING for d in layers for name in d]
                         + [True] * sum(map(len, contents)))
        self.values = list(compress(chain.from_iterable(map(dict.values, self.dicts)), self.compared))
        self.containers = [(c, _contents(c)) for value in self.values for c in _containers_in(value)]

    def _rebound(self) -> bool:
        dicts = self.dicts
        # names are strings, whose == is safe; values are compared by identity only (== on a tensor
        # is no truth value, or a host read)
        if (list(chain.from_iterable(dicts)) != self.names
                or not all(map(operator.is_, compress(chain.from_iterable(map(dict.values, dicts)), self.compared),
                               self.values))):
            return True
        for container, contents in self.containers:  # bound to the same lists and dicts: changed in place?
            now = _contents(container)
            if len(now) != len(contents) or not all(map(operator.is_, now, contents)):
                return True
        return False


def _containers_in(value, depth: int = _PLAIN_DEPTH + 1) -> list:
    """The lists and dicts ``value`` is or holds (through tuples too), as deep as a plain value nests
    and one level more (a change that makes a value too deep to be plain is a change)."""
    if depth == 0 or not isinstance(value, (list, tuple, dict)):
        return []
    nested = [c for v in (value.values() if isinstance(value, dict) else value) for c in _containers_in(v, depth - 1)]
    return nested if isinstance(value, tuple) else [value, *nested]


def _contents(container) -> list:
    return [*container, *container.values()] if isinstance(container, dict) else list(container)


def structure(engine, parameters=None) -> tuple:
    """The problems' :meth:`structure` and which of θ's tensors are frozen (``parameters``: θ's
    tensors if already known, which spares walking the modules)."""
    parameters = engine.meta_learner.trainable_parameters() if parameters is None else parameters
    frozen = tuple(not p.requires_grad for p in parameters)
    return engine.meta_learner.structure(), engine.task_learner.structure(), frozen


def make_capturable(upper, capturable: bool = True) -> None:
    """Switch the outer optimizer in or out of its capturable mode (state steps on the device) and,
    with an LR scheduler, hold the learning rate as a device tensor the scheduler updates in place."""
    optimizer = upper.optimizer
    if "capturable" not in optimizer.defaults:
        return
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        if capturable and upper.schedules_learning_rate and not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(group["lr"], device=group["params"][0].device)
        elif not capturable and isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                optimizer.state[p]["step"] = step.to(p.device if capturable else "cpu")


def choose_execution(engine, cuda_graph: bool | None):
    """The strategy for ``engine``: captured on CUDA unless ``cuda_graph`` is False or
    :func:`capture_blocker` names a reason (then eager, with a one-line warning if the graph was
    asked for or is the CUDA default).

    :param engine: the :class:`~bilevel_maml.engine.MetaEngine`.
    :param cuda_graph: True insists on capture, False refuses it, None captures wherever it works.
    """
    if cuda_graph is False:
        return EagerExecution(engine), None
    if cuda_graph is True and engine.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, the engine is on {engine.device}")
    if engine.device.type != "cuda":
        return EagerExecution(engine), None
    reason = capture_blocker(engine)
    if reason is not None:
        return EagerExecution(engine), reason
    return CapturedExecution(engine), None


def warn_eager(reason: str) -> None:
    warnings.warn(f"CUDA graph off, the meta-iteration runs eagerly: {reason}", stacklevel=3)


__all__ = [
    "PRECISIONS",
    "EagerExecution",
    "CapturedExecution",
    "choose_execution",
    "check_precision",
    "precision_scope",
]
