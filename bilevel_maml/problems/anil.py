"""ANIL (Raghu et al., 2020): almost no inner loop, only the classifier head adapts to a task."""

from __future__ import annotations

from torch import nn

from bilevel_maml.problems.maml import MAMLLower, MAMLUpper


class ANILLower(MAMLLower):
    """Adapts only the parameters of ``head`` (a submodule name; by default the module that owns
    the model's last parameter, i.e. its output layer); the body keeps θ during the inner loop.

    :param module: θ's network.
    :param inner_lr: the inner step size.
    :param head: the submodule to adapt, by name in ``module.named_modules()`` (default: the output layer).
    :param kwargs: passed to :class:`~bilevel_maml.problems.maml.MAMLLower` (``inner_steps``, ``loss_fn``, ...).
    """

    def __init__(self, module: nn.Module, inner_lr: float, head: str | None = None, **kwargs):
        super().__init__(module, inner_lr, **kwargs)
        names = [name for name, _ in module.named_parameters()]
        self.head = head if head is not None else names[-1].rpartition(".")[0]
        if not any(self.in_head(name) for name in names):
            owners = sorted({name.rpartition(".")[0] for name in names})
            raise ValueError(f"head={self.head!r} names no parameters of {type(module).__name__}; "
                             f"submodules with parameters: {', '.join(owners)}")

    def in_head(self, name: str) -> bool:
        """Whether the parameter ``name`` belongs to the head.

        :param name: a parameter's name in ``module.named_parameters()``.
        """
        return self.head == "" or name == self.head or name.startswith(self.head + ".")

    def adapts(self, name):
        return self.in_head(name)


class ANILUpper(MAMLUpper):
    """θ.grad = d L_query(body_θ, head_K(θ)) / dθ: second order through the head's inner steps,
    direct for the body."""
