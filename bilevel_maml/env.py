"""Coupled episodic data: one task sampled once, its support set for the Lower problem and its query
set for the Upper problem.

Betty's ``Env`` has no device and no notion of a task split; :class:`EpisodicEnv` adds both, and
keeps its own random stream so that the sequence of tasks depends only on its seed, not on whatever
else the program draws from ``random``, NumPy or torch.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Callable, Protocol

import numpy as np
import torch
from betty.envs import Env

from bilevel_maml.data.device_sampler import DeviceTaskSource
from bilevel_maml.validation import check_positive_int


class TaskSource(Protocol):
    def sample(self) -> tuple[torch.Tensor, torch.Tensor]: ...


def split_classification_task(inputs, labels, ways: int, shots: int, query_shots: int):
    """Split one task into disjoint support and query sets with labels remapped to ``0..ways-1``.

    Each class contributes ``shots`` support and ``query_shots`` query examples, chosen by a
    permutation from the current torch random state.

    :param inputs: the task's examples, grouped or not by class.
    :param labels: their class labels (any ``ways`` distinct values).
    :param ways: classes in the task.
    :param shots: support examples per class.
    :param query_shots: query examples per class.
    """
    classes = torch.unique(labels, sorted=True)
    if len(classes) != ways:
        raise ValueError(
            f"a sampled task has {len(classes)} classes but ways={ways}; the task source must "
            f"yield exactly `ways` classes per task"
        )
    support, query = [], []
    for c in classes:
        members = torch.nonzero(labels == c).flatten()
        if len(members) < shots + query_shots:
            raise ValueError(
                f"a sampled task has {len(members)} examples of class {c.item()} but "
                f"shots + query_shots = {shots} + {query_shots} = {shots + query_shots} are needed"
            )
        members = members[torch.randperm(len(members))]
        support.append(members[:shots])
        query.append(members[shots : shots + query_shots])
    remapped = torch.searchsorted(classes, labels)
    support, query = torch.cat(support), torch.cat(query)
    return (inputs[support], remapped[support]), (inputs[query], remapped[query])


def split_regression_task(inputs, targets, shots: int, query_shots: int):
    """Split one regression task into ``shots`` support and ``query_shots`` query points.

    :param inputs: the task's points.
    :param targets: their targets.
    :param shots: support points.
    :param query_shots: query points.
    """
    if len(inputs) < shots + query_shots:
        raise ValueError(
            f"a sampled task has {len(inputs)} points but shots + query_shots = "
            f"{shots + query_shots} are needed"
        )
    order = torch.randperm(len(inputs))
    support, query = order[:shots], order[shots : shots + query_shots]
    return (inputs[support], targets[support]), (inputs[query], targets[query])


def global_rng_state(cuda: bool = True) -> dict:
    """The Python, NumPy and torch (and, if asked and present, CUDA) global random states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if cuda and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(state):
    """NumPy's legacy state as a tuple, from itself or from its :func:`saveable_rng_state` form."""
    if isinstance(state, dict):
        return (state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                state["cached_gaussian"])
    return state


def saveable_rng_state(state: dict) -> dict:
    """``state`` with NumPy's entry as tensors and plain numbers, so that a checkpoint holding it
    loads with ``torch.load(weights_only=True)`` (which refuses NumPy arrays)."""
    kind, keys, pos, has_gauss, cached = _numpy_state(state["numpy"])
    numpy_state = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return {**state, "numpy": numpy_state}


def set_global_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seeded_states(seed: int) -> dict:
    return {
        "python": random.Random(seed).getstate(),
        "numpy": np.random.RandomState(seed % 2**32).get_state(),
        "torch": torch.Generator().manual_seed(seed).get_state(),
    }


class EpisodicEnv(Env):
    """Samples one task per :meth:`step` and exposes ``batch["support"]`` and ``batch["query"]``.

    :param tasks: a :class:`~bilevel_maml.data.device_sampler.DeviceTaskSource` (whole draws of
        tasks on the device, from a ``torch.Generator`` there: the
        :class:`~bilevel_maml.data.device_sampler.DeviceTaskSampler` of an image split, the
        :class:`~bilevel_maml.data.sinusoid.DeviceSinusoidTasks`), a learn2learn ``TaskDataset``
        (anything with ``sample()``), or a callable that returns ``(inputs, labels)`` for one task,
        or ``{"support": (x, y), "query": (x, y)}`` for a task it has already split (used as given).
    :param ways: classes per task (classification); ignored for regression.
    :param shots: support examples per class (per task, for regression).
    :param query_shots: query examples per class (per task, for regression); defaults to ``shots``.
    :param regression: split without classes or label remapping.
    :param seed: seed of this env's own task stream.
    :param device: where the split tensors are placed.
    :param dtype: floating dtype the inputs (and regression targets) are cast to, if given.
    """

    def __init__(
        self,
        tasks: TaskSource | Callable[[], tuple[torch.Tensor, torch.Tensor]],
        ways: int | None = None,
        shots: int = 1,
        query_shots: int | None = None,
        *,
        regression: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.on_device = isinstance(tasks, DeviceTaskSource)
        if self.on_device:
            self._draw = None
        elif callable(getattr(tasks, "sample", None)):
            self._draw = tasks.sample
        elif callable(tasks):
            self._draw = tasks
        else:
            raise TypeError(
                f"tasks must be a learn2learn TaskDataset (with .sample()) or a callable returning "
                f"(inputs, labels), got {type(tasks).__name__}"
            )
        self.tasks = tasks
        self.regression = regression
        self.ways = None if regression else check_positive_int("ways", ways)
        self.shots = check_positive_int("shots", shots)
        self.query_shots = self.shots if query_shots is None else check_positive_int("query_shots", query_shots)
        if self.on_device:
            unset = [name for name in ("shots", "query_shots", *(() if tasks.regression else ("ways",)))
                     if getattr(tasks, name) is None]
            if unset:
                raise TypeError(f"{type(tasks).__name__} is a DeviceTaskSource but does not set {', '.join(unset)}: "
                                f"the episodes it draws (ways is None for regression)")
        asked = (regression, self.ways, self.shots, self.query_shots)
        if self.on_device and asked != (tasks.regression, tasks.ways, tasks.shots, tasks.query_shots):
            def episodes(regression, ways, shots, query_shots):
                return (f"regression tasks of {shots} + {query_shots} points" if regression else
                        f"{ways}-way tasks of {shots} + {query_shots} examples per class")
            drawn = episodes(tasks.regression, tasks.ways, tasks.shots, tasks.query_shots)
            raise ValueError(f"the {type(tasks).__name__} draws {drawn}; this env asks for {episodes(*asked)}")
        self.dtype = dtype
        self.seed = seed
        self._rng = _seeded_states(seed)
        self.tasks_sampled = 0
        self._device = None
        self.device = device
        #: tasks per :meth:`step`, and whether ``batch`` holds them stacked along a leading task axis
        #: (the engine's vectorized path sets both: the tasks it adapts at once, which may be one).
        self.tasks_per_step = 1
        self.stacked = False
        #: tasks a device-resident source draws at once (the engine sets its meta-batch size); steps
        #: hand them out in turn, so the tasks do not depend on how many a step takes (a draw of
        #: several is not the stream of drawing them one by one)
        self.tasks_per_draw = 1
        self._drawn, self._handed_out = None, 0
        self.batch = {"support": None, "query": None}

    @property
    def device(self) -> torch.device:
        return self._device

    @device.setter
    def device(self, device) -> None:
        device = torch.device(device)
        if self.on_device and device != self._device:
            if self._device is not None and self.tasks_sampled:
                raise RuntimeError(f"cannot move a device-resident task stream from {self._device} to {device} "
                                   f"after it has drawn tasks")
            # The stream is the generator's on that device (CPU and CUDA generators differ).
            self.tasks.to(device)
            self.generator = self.tasks.generator(self.seed)
        self._device = device

    @contextmanager
    def own_random_state(self):
        """Run the block on this env's random stream, leaving the global streams untouched."""
        # Task sampling draws on the CPU streams only, so CUDA's are left out of this hot path.
        outside = global_rng_state(cuda=False)
        set_global_rng_state(self._rng)
        try:
            yield
        finally:
            self._rng = global_rng_state(cuda=False)
            set_global_rng_state(outside)

    def sample_task(self):
        """Draw and split one task on this env's stream; returns ``(support, query)`` on device."""
        if self.on_device:
            (xs, ys), (xq, yq) = self.tasks.sample(1, self.generator, self.dtype)
            return (xs[0], ys[0]), (xq[0], yq[0])
        with self.own_random_state():
            return self._draw_and_split()

    def _draw_and_split(self):
        """One task of the source, split; the caller has switched to this env's random stream."""
        drawn = self._draw()
        if isinstance(drawn, dict):  # the source split the task itself
            return self._place(drawn["support"]), self._place(drawn["query"])
        inputs, labels = torch.as_tensor(drawn[0]), torch.as_tensor(drawn[1])
        if self.regression:
            support, query = split_regression_task(inputs, labels, self.shots, self.query_shots)
        else:
            support, query = split_classification_task(inputs, labels, self.ways, self.shots, self.query_shots)
        return self._place(support), self._place(query)

    def _place(self, pair):
        inputs, labels = pair
        if self.dtype is not None:
            inputs = inputs.to(self.dtype)
            if self.regression:
                labels = labels.to(self.dtype)
        return inputs.to(self.device), labels.to(self.device)

    def sample_tasks(self, count: int):
        """``count`` consecutive tasks of this env's stream, stacked: the same tasks, in the same
        order, as ``count`` calls of :meth:`sample_task` (for a device-resident source: one draw of
        ``count`` tasks, which is not the same stream as ``count`` draws of one).

        :param count: tasks to draw.
        """
        if self.on_device:
            return self.tasks.sample(count, self.generator, self.dtype)
        # one switch of the global random streams for the whole meta-batch (the same draws as one per
        # task: nothing else draws in between), which costs as much as drawing a small task
        with self.own_random_state():
            tasks = [self._draw_and_split() for _ in range(count)]
        return tuple(
            tuple(torch.stack([task[part][i] for task in tasks]) for i in range(2)) for part in range(2)
        )

    def step(self):
        if self.on_device and self.tasks_per_draw > self.tasks_per_step:
            self.batch["support"], self.batch["query"] = self._next_of_draw()
        elif self.stacked:
            self.batch["support"], self.batch["query"] = self.sample_tasks(self.tasks_per_step)
        else:
            self.batch["support"], self.batch["query"] = self.sample_task()
        self.tasks_sampled += self.tasks_per_step

    def _next_of_draw(self):
        """The next :attr:`tasks_per_step` tasks of a draw of :attr:`tasks_per_draw`, drawn when
        the last one is handed out: stacked, or one task unstacked."""
        if self._drawn is None:
            self._drawn = self.tasks.sample(self.tasks_per_draw, self.generator, self.dtype)
        start, self._handed_out = self._handed_out, self._handed_out + self.tasks_per_step
        part = slice(start, self._handed_out) if self.stacked else start
        (xs, ys), (xq, yq) = self._drawn
        if self._handed_out >= self.tasks_per_draw:
            self._drawn, self._handed_out = None, 0
        return (xs[part], ys[part]), (xq[part], yq[part])

    def check(self) -> None:
        """Fail now, not mid-training, if the source cannot supply the requested episodes.

        Checks class and example counts against a learn2learn ``MetaDataset`` when there is one,
        then samples and splits one task without advancing this env's stream.
        """
        if self.on_device:
            return  # a DeviceTaskSampler checked ways and shots against its classes when it was built
        dataset = getattr(self.tasks, "dataset", None)
        per_class = getattr(dataset, "labels_to_indices", None)
        if not self.regression and per_class:
            if self.ways > len(per_class):
                raise ValueError(f"ways={self.ways} is more than its {len(per_class)} classes; "
                                 f"choose ways <= {len(per_class)}")
            fewest = min(len(indices) for indices in per_class.values())
            if self.shots + self.query_shots > fewest:
                raise ValueError(
                    f"shots + query_shots = {self.shots} + {self.query_shots} = "
                    f"{self.shots + self.query_shots} is more than the {fewest} examples of the "
                    f"smallest class; choose shots + query_shots <= {fewest}"
                )
        saved = self._rng
        try:
            self.sample_task()
        finally:
            self._rng = saved

    def state_dict(self) -> dict:
        if self._drawn is not None:
            left = self.tasks_per_draw - self._handed_out
            raise RuntimeError(f"the task stream's state is read between meta-iterations, not with {left} of the "
                               f"{self.tasks_per_draw} tasks drawn together still to hand out")
        if self.on_device:
            return {"generator": self.generator.get_state(), "device": self.device.type,
                    "tasks_sampled": self.tasks_sampled}
        return {"rng": saveable_rng_state(self._rng), "tasks_sampled": self.tasks_sampled}

    def load_state_dict(self, state: dict) -> None:
        """Continue the task stream from a :meth:`state_dict`.

        :param state: a :meth:`state_dict` of an env over the same source.
        """
        if self.on_device != ("generator" in state):
            saved, here = ("a device-resident sampler", "learn2learn's") if "generator" in state else \
                ("learn2learn's sampler", "a device-resident one")
            raise ValueError(f"the saved task stream came from {saved} and this env uses {here}: "
                             f"resume with the same --sampler")
        if self.on_device:
            if state["device"] != self.device.type:
                raise ValueError(f"the saved task stream was drawn on a {state['device']} device, this env is on "
                                 f"{self.device.type}: resume on a {state['device']} device (its random stream differs)")
            self.generator.set_state(state["generator"])
        else:
            self._rng = {**state["rng"], "numpy": _numpy_state(state["rng"]["numpy"])}
        self.tasks_sampled = state["tasks_sampled"]
        self._drawn, self._handed_out = None, 0


__all__ = ["EpisodicEnv", "TaskSource", "split_classification_task", "split_regression_task"]
