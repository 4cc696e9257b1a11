"""Sinusoid regression tasks from the MAML paper (Finn et al., 2017, section 5.1)."""

from __future__ import annotations

import math

import torch


class SinusoidTasks:
    """Each task is ``y = A sin(x - φ)`` with ``A ~ U[0.1, 5]``, ``φ ~ U[0, π]``, ``x ~ U[-5, 5]``.

    ``sample()`` returns ``points`` inputs of shape ``(points, 1)`` and their targets, drawn from
    the global torch random state, which :class:`~bilevel_maml.env.EpisodicEnv` seeds per stream.

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
        def uniform(low_high, *shape):
            low, high = low_high
            return low + (high - low) * torch.rand(*shape, dtype=self.dtype)

        amplitude, phase = uniform(self.amplitude, 1), uniform(self.phase, 1)
        x = uniform(self.x_range, self.points, 1)
        return x, amplitude * torch.sin(x - phase)
