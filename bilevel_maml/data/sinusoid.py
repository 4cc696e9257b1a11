"""Sinusoid regression tasks from the MAML paper (Finn et al., 2017, section 5.1)."""

from __future__ import annotations

import math

import torch

from bilevel_maml.data.device_sampler import DeviceTaskSource
from bilevel_maml.validation import check_positive_int


def _uniform(low_high, shape, dtype, generator=None, device=None) -> torch.Tensor:
    low, high = low_high
    return low + (high - low) * torch.rand(*shape, generator=generator, device=device, dtype=dtype)


class SinusoidTasks:
    """Each task is ``y = A sin(x - φ)`` with ``A ~ U[0.1, 5]``, ``φ ~ U[0, π]``, ``x ~ U[-5, 5]``.

    ``sample()`` returns ``points`` inputs of shape ``(points, 1)`` and their targets, drawn from
    the global torch random state, which :class:`~bilevel_maml.env.EpisodicEnv` seeds per stream.
    :meth:`on_device` gives the same distribution drawn a meta-batch at a time on a device.

    :param points: points per task (support + query).
    :param amplitude: the range ``(low, high)`` A is drawn from.
    :param phase: the range φ is drawn from.
    :param x_range: the range x is drawn from.
    :param dtype: dtype of inputs and targets.
    """

    def __init__(self, points: int = 20, amplitude=(0.1, 5.0), phase=(0.0, math.pi),
                 x_range=(-5.0, 5.0), dtype: torch.dtype = torch.float32):
        self.points = points
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.dtype = dtype

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        amplitude, phase = _uniform(self.amplitude, (1,), self.dtype), _uniform(self.phase, (1,), self.dtype)
        x = _uniform(self.x_range, (self.points, 1), self.dtype)
        return x, amplitude * torch.sin(x - phase)

    def on_device(self, shots: int, query_shots: int, device) -> "DeviceSinusoidTasks":
        """These tasks split into ``shots`` support and ``query_shots`` query points, drawn on ``device``.

        :param shots: support points per task.
        :param query_shots: query points per task.
        :param device: where tasks are drawn.
        """
        if shots + query_shots > self.points:
            raise ValueError(f"a sampled task has {self.points} points but shots + query_shots = "
                             f"{shots + query_shots} are needed")
        return DeviceSinusoidTasks(shots, query_shots, amplitude=self.amplitude, phase=self.phase,
                                   x_range=self.x_range, dtype=self.dtype, device=device)


class DeviceSinusoidTasks(DeviceTaskSource):
    """:class:`SinusoidTasks`' distribution, ``count`` tasks per draw from a generator on ``device``
    (so a captured CUDA graph draws them itself). The points of a task are independent, so its first
    ``shots`` are the support set and the rest the query set: the same distribution as splitting a
    :class:`SinusoidTasks` task at random.

    :param shots: support points per task.
    :param query_shots: query points per task.
    :param amplitude: the range ``(low, high)`` A is drawn from.
    :param phase: the range φ is drawn from.
    :param x_range: the range x is drawn from.
    :param dtype: dtype of inputs and targets, unless :meth:`sample` is given one.
    :param device: where tasks are drawn.
    """

    regression = True

    def __init__(self, shots: int, query_shots: int, amplitude=(0.1, 5.0), phase=(0.0, math.pi),
                 x_range=(-5.0, 5.0), dtype: torch.dtype = torch.float32, device="cpu"):
        self.shots = check_positive_int("shots", shots)
        self.query_shots = check_positive_int("query_shots", query_shots)
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.dtype = dtype
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device) -> "DeviceSinusoidTasks":
        """Draws on ``device`` from now on (nothing is held; returns self).

        :param device: the target device.
        """
        self._device = torch.device(device)
        return self

    def sample(self, count: int, generator: torch.Generator, dtype: torch.dtype | None = None):
        """``count`` tasks as ``((xs, ys), (xq, yq))``: support ``(count, shots, 1)``, query
        ``(count, query_shots, 1)``.

        :param count: tasks to draw.
        :param generator: the random stream (from :meth:`generator`), advanced by the draw.
        :param dtype: dtype of inputs and targets (default: this source's).
        """
        dtype, device = dtype or self.dtype, self._device
        amplitude = _uniform(self.amplitude, (count, 1, 1), dtype, generator, device)
        phase = _uniform(self.phase, (count, 1, 1), dtype, generator, device)
        x = _uniform(self.x_range, (count, self.shots + self.query_shots, 1), dtype, generator, device)
        y = amplitude * torch.sin(x - phase)
        return (x[:, :self.shots], y[:, :self.shots]), (x[:, self.shots:], y[:, self.shots:])
