"""iMAML (Rajeswaran et al., 2019): proximal inner problem, implicit meta-gradient by CG.

The inner problem is ``min_φ L_support(φ) + λ/2 ‖φ − θ‖²``. At its optimum φ*, the implicit function
theorem gives ``dφ*/dθ = (I + H/λ)^-1`` with ``H = ∇²L_support(φ*)``, so the meta-gradient is
``(I + H/λ)^-1 ∇L_query(φ*)``, solved with ``cg_iterations`` steps of conjugate gradient using
Hessian-vector products only. It is exact when the inner loop converges and CG runs long enough;
otherwise it is the approximation the paper uses.
"""

from __future__ import annotations

import torch

from bilevel_maml.hypergradient import conjugate_gradient, placed, zeros_for_unused
from bilevel_maml.problems.base import MetaLearner, TaskLearner
from bilevel_maml.validation import check_positive, check_positive_int


class IMAMLLower(TaskLearner):
    """Inner SGD on the support loss plus the proximal term λ/2‖φ − θ‖².

    :param args: passed to :class:`~bilevel_maml.problems.base.TaskLearner` (``module``, ``inner_lr``).
    :param lam: the proximal strength λ (> 0).
    :param kwargs: passed to :class:`~bilevel_maml.problems.base.TaskLearner` (``inner_steps``, ``loss_fn``, ...).
    """

    def __init__(self, *args, lam: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.lam = check_positive("lam (the iMAML proximal strength λ)", lam)

    def inner_loss(self, params, batch):
        """:param params: φ.
        :param batch: the support set.
        """
        theta = self.meta_learner.initialization()
        proximal = sum(((p - t) ** 2).sum() for p, t in zip(params, theta))
        return self.task_loss(params, batch) + 0.5 * self.lam * proximal


class IMAMLUpper(MetaLearner):
    """θ.grad = (I + H/λ)^-1 ∇_φ L_query(φ), with H the support-loss Hessian at the adapted φ.

    :param args: passed to :class:`~bilevel_maml.problems.base.MetaLearner` (``module``, ``optimizer``).
    :param cg_iterations: conjugate-gradient iterations.
    :param cg_tolerance: stop CG early once every residual norm is at most this (0: never).
    :param kwargs: passed to :class:`~bilevel_maml.problems.base.MetaLearner` (``meta_batch_size``, ``loss_fn``, ...).
    """

    def __init__(self, *args, cg_iterations: int = 5, cg_tolerance: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.cg_iterations = check_positive_int("cg_iterations", cg_iterations)
        self.cg_tolerance = cg_tolerance

    def meta_gradient(self, query_loss):
        """(I + H/λ)⁻¹ ∇_φ L_query(φ_K) by :attr:`cg_iterations` steps of conjugate gradient with
        Hessian-vector products of the support loss at φ_K.

        :param query_loss: the query loss of the adapted learner.
        """
        learner = self.task_learner
        # the inner problem's variables: the adapted parameters (a frozen one is a constant of it, its entry zero)
        adapted = learner.adapted_indices()
        kept = [name for i, (name, p) in enumerate(zip(learner.param_names, self.initialization()))
                if p.requires_grad and i not in adapted]
        if kept:
            # (I + H/λ)⁻¹ is dφ*/dθ for the variables of the proximal inner problem only; a trainable
            # parameter the inner loop keeps at θ would need the cross terms of the Hessian instead
            raise ValueError(f"iMAML's implicit gradient needs the inner loop to adapt every trainable parameter, "
                             f"but {type(learner).__name__}.adapts() keeps {', '.join(kept)} at θ: freeze them "
                             f"(requires_grad=False) or use a second-order variant (MAML, ANIL)")
        phi = tuple(learner.params[i] for i in adapted)
        query_grad = zeros_for_unused(torch.autograd.grad(query_loss, phi, allow_unused=True), phi)
        support_loss = learner.over_tasks(learner.task_loss, learner.params, learner.get_batch())
        support_grad = torch.autograd.grad(support_loss, phi, create_graph=True)

        def damped_hessian_vector(v):
            # Vectorized, H is block-diagonal over tasks, so this is every task's own H_i v_i.
            hv = torch.autograd.grad(support_grad, phi, grad_outputs=v, retain_graph=True, allow_unused=True)
            return tuple(vi + hvi / learner.lam for vi, hvi in zip(v, zeros_for_unused(hv, phi)))

        solution = conjugate_gradient(damped_hessian_vector, query_grad, self.cg_iterations, self.cg_tolerance,
                                      batch_dims=1 if self.tasks_in_batch else 0)
        return self.reduce_over_tasks(zeros_for_unused(placed(solution, adapted, len(learner.params)), learner.params))
