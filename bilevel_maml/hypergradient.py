"""Hypergradient routines: a conjugate-gradient solver and corrected versions of Betty 0.1.1's.

Betty 0.1.1 ships three defects on the hypergradient path, each pinned by a test in
``tests/test_betty_defects.py``:

* ``betty.hypergradient.get_grads`` calls ``torch.autograd.grad`` without ``allow_unused``, so a
  lower-level parameter that the upper loss never touches raises instead of contributing zero;
* ``betty.hypergradient.darts`` restores the perturbed parameters with ``p.data.add`` (out of
  place), so after every call they stay shifted by ``-eps * v``;
* ``betty.hypergradient.cg`` builds the next search direction from the old residual ``r`` where
  conjugate gradient needs the new one, so it does not converge.

:func:`get_grads` below has Betty's signature and dispatches on ``problem.config.type`` to the
corrected :func:`darts` and :func:`cg` (and Betty's own ``neumann``, which is sound).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from betty.hypergradient.neumann import neumann

Tensors = Sequence[torch.Tensor]


def zeros_for_unused(grads: Sequence[torch.Tensor | None], like: Tensors) -> tuple[torch.Tensor, ...]:
    """Replace the ``None`` that ``allow_unused=True`` yields with zeros of the input's shape."""
    return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, like))


def placed(values: Sequence, indices: Sequence[int], length: int) -> list:
    """A list of ``length`` entries holding ``values`` at ``indices`` (in order) and None elsewhere:
    the gradients of a subset of the parameters, in the positions of all of them.

    :param values: one per index.
    :param indices: positions in the full list.
    :param length: the full list's length.
    """
    full = [None] * length
    for i, value in zip(indices, values):
        full[i] = value
    return full


def gradients_or_zeros(output: torch.Tensor, inputs: Tensors, **kwargs) -> tuple[torch.Tensor, ...]:
    """``torch.autograd.grad(output, inputs, allow_unused=True, **kwargs)`` with zeros for the inputs it
    does not reach and for those that do not require a gradient (frozen parameters), which
    ``torch.autograd.grad`` refuses."""
    wanted = [i for i, p in enumerate(inputs) if p.requires_grad]
    found = torch.autograd.grad(output, [inputs[i] for i in wanted], allow_unused=True, **kwargs) if wanted else ()
    return zeros_for_unused(placed(found, wanted, len(inputs)), inputs)


def _dot(xs: Tensors, ys: Tensors, batch_dims: int) -> torch.Tensor:
    """Inner product over everything but the leading ``batch_dims`` axes."""
    return sum((x * y).flatten(batch_dims).sum(-1) for x, y in zip(xs, ys))


def conjugate_gradient(
    matvec: Callable[[Tensors], Tensors],
    rhs: Tensors,
    iterations: int,
    tolerance: float = 0.0,
    batch_dims: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Approximately solve ``A x = rhs`` for a symmetric positive-definite ``A`` given as ``matvec``.

    Works on tuples of tensors (one per parameter) so no flattening copy is needed. Starts from
    ``x = 0``, so ``iterations=0`` returns zeros and, in exact arithmetic, ``n`` iterations solve an
    ``n``-dimensional system exactly. With ``batch_dims=1`` the leading axis indexes independent
    systems (``A`` block-diagonal), each with its own step sizes: the iterates equal those of
    solving each system separately. Stops early once every residual norm is at most ``tolerance``.

    :param matvec: ``x ↦ A x`` on tuples of tensors.
    :param rhs: the right-hand side, one tensor per parameter.
    :param iterations: CG iterations.
    :param tolerance: stop early once every residual norm is at most this (0: never; checking reads the residual on the host).
    :param batch_dims: leading axes that index independent systems (stacked tasks), solved together.
    """

    def scale(c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return c.reshape(c.shape + (1,) * (t.dim() - batch_dims)) * t

    x = tuple(torch.zeros_like(b) for b in rhs)
    r = tuple(b.clone() for b in rhs)
    p = r
    r_dot_r = _dot(r, r, batch_dims)
    for _ in range(iterations):
        if tolerance > 0 and bool((r_dot_r.sqrt() <= tolerance).all()):
            break
        Ap = matvec(p)
        p_dot_Ap = _dot(p, Ap, batch_dims)
        # A system that is already solved (r = 0, hence p = 0) takes zero steps from here on.
        alpha = torch.where(p_dot_Ap > 0, r_dot_r / p_dot_Ap, torch.zeros_like(r_dot_r))
        x = tuple(xi + scale(alpha, pi) for xi, pi in zip(x, p))
        r = tuple(ri - scale(alpha, api) for ri, api in zip(r, Ap))
        r_dot_r_new = _dot(r, r, batch_dims)
        beta = torch.where(r_dot_r > 0, r_dot_r_new / r_dot_r, torch.zeros_like(r_dot_r))
        p = tuple(ri + scale(beta, pi) for ri, pi in zip(r, p))
        r_dot_r = r_dot_r_new
    return x


def _inner_loss(problem) -> torch.Tensor:
    loss = problem.training_step_exec(problem.cur_batch)
    return loss["loss"] if isinstance(loss, dict) else loss


def darts(vector: Tensors, curr, prev) -> tuple[torch.Tensor, ...]:
    """Finite-difference best-response Jacobian product, as Betty's, restoring parameters exactly."""
    radius = curr.config.darts_alpha
    eps = radius / torch.cat([v.reshape(-1) for v in vector]).norm()
    params = list(curr.trainable_parameters())
    saved = [p.detach().clone() for p in params]
    prev_params = list(prev.trainable_parameters())
    try:
        for p, v in zip(params, vector):
            p.data.add_(v, alpha=eps)
        grad_plus = torch.autograd.grad(_inner_loss(curr), prev_params, allow_unused=True)
        for p, v in zip(params, vector):
            p.data.add_(v, alpha=-2 * eps)
        grad_minus = torch.autograd.grad(_inner_loss(curr), prev_params, allow_unused=True)
    finally:
        for p, s in zip(params, saved):
            p.data.copy_(s)
    grad_plus = zeros_for_unused(grad_plus, prev_params)
    grad_minus = zeros_for_unused(grad_minus, prev_params)
    return tuple((gm - gp) / (2 * eps) for gm, gp in zip(grad_minus, grad_plus))


def cg(vector: Tensors, curr, prev) -> tuple[torch.Tensor, ...]:
    """Implicit best-response Jacobian product ``-d2L/dprev dcurr  H^-1 v`` by conjugate gradient."""
    params = list(curr.trainable_parameters())
    in_grad = torch.autograd.grad(_inner_loss(curr), params, create_graph=True, allow_unused=True)
    # Parameters the inner loss does not use have no gradient graph to differentiate again.
    used = [i for i, g in enumerate(in_grad) if g is not None and g.requires_grad]

    def through_inner_grad(v: Tensors, wrt, retain_graph=True) -> tuple[torch.Tensor, ...]:
        outputs = [in_grad[i] for i in used]
        grads = torch.autograd.grad(
            outputs, wrt, grad_outputs=[v[i] for i in used], retain_graph=retain_graph, allow_unused=True
        )
        return zeros_for_unused(grads, wrt)

    batch_dims = 1 if getattr(curr, "tasks_in_batch", None) else 0  # one system per task
    x = conjugate_gradient(lambda v: through_inner_grad(v, params), [v.detach() for v in vector],
                           curr.config.cg_iterations, batch_dims=batch_dims)
    prev_params = list(prev.trainable_parameters())
    return tuple(-g for g in through_inner_grad(x, prev_params, retain_graph=False))


JVP_FUNCTIONS = {"darts": darts, "cg": cg, "neumann": neumann}


def get_grads(loss: torch.Tensor, path, retain_graph: bool) -> tuple[torch.Tensor, ...]:
    """Betty's path hypergradient: ``d loss / d path[-1]`` through the problems on ``path``."""
    lower_params = list(path[1].trainable_parameters())
    vector = torch.autograd.grad(loss, lower_params, retain_graph=retain_graph, allow_unused=True)
    vector = zeros_for_unused(vector, lower_params)
    for curr, prev in zip(path[1:-1], path[2:]):
        kind = curr.config.type
        if kind not in JVP_FUNCTIONS:
            raise ValueError(
                f"problem {curr.name!r} has config.type={kind!r}; supported hypergradients: "
                f"{sorted(JVP_FUNCTIONS)}"
            )
        vector = JVP_FUNCTIONS[kind](vector, curr, prev)
    return tuple(vector)


__all__ = ["conjugate_gradient"]
