"""BOIL (Oh et al., ICLR 2021): ANIL's mirror image, only the body adapts and the head keeps θ."""

from __future__ import annotations

from bilevel_maml.problems.anil import ANILLower, ANILUpper


class BOILLower(ANILLower):
    """Adapts every parameter outside ``head`` (by default the output layer, as for ANIL); the head
    keeps θ in the inner loop, so adaptation has to move the features.

    :param module: θ's network.
    :param inner_lr: the inner step size.
    :param head: the submodule kept fixed, by name in ``module.named_modules()`` (default: the output layer).
    :param kwargs: passed to :class:`~bilevel_maml.problems.maml.MAMLLower` (``inner_steps``, ``loss_fn``, ...).
    """

    def adapts(self, name):
        return not self.in_head(name)


class BOILUpper(ANILUpper):
    """θ.grad = d L_query(body_K(θ), head_θ) / dθ: second order through the body's inner steps,
    direct for the head."""
