"""Meta-SGD (Li et al., 2017): MAML whose inner step sizes are meta-learned, one per weight."""

from __future__ import annotations

import torch
from torch import nn

from bilevel_maml.problems.maml import MAMLLower, MAMLUpper


class MetaSGDLower(MAMLLower):
    """φ ← φ − α ⊙ ∇L_support(φ), where α (shaped like θ, starting at ``inner_lr`` everywhere) is
    learned by the outer optimizer together with θ.

    :param module: θ's network.
    :param inner_lr: the initial value of every step size α.
    :param kwargs: passed to :class:`~bilevel_maml.problems.maml.MAMLLower` (``inner_steps``, ``loss_fn``, ...).
    """

    def __init__(self, module: nn.Module, inner_lr: float, **kwargs):
        super().__init__(module, inner_lr, **kwargs)
        self.learning_rates = nn.ParameterList(
            nn.Parameter(torch.full_like(p, inner_lr)) for p in module.parameters())

    def meta_parameters(self):
        return tuple(self.learning_rates)

    def inner_update(self, params, grads):
        return tuple(p if g is None else p - a * g for p, a, g in zip(params, self.learning_rates, grads))


class MetaSGDUpper(MAMLUpper):
    """(θ.grad, α.grad) = d L_query(φ_K(θ, α)) / d(θ, α), through all K inner steps."""
