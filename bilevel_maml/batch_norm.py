"""Batch normalisation with batch statistics whose derivatives of every order are a few whole-tensor ops.

Second-order MAML and iMAML differentiate BatchNorm's backward once more. PyTorch's formula for that
double backward is generic: about 90 element-wise and reduction ops per layer and inner step (360 of
the 1,127 kernel-launching ops of a vectorized MAML meta-iteration of conv4 at 1 inner step, with
grouped convolution derivatives), each a kernel and a pass over the activation on a GPU.

Here the derivatives are written in closed form. With per-channel statistics ``μ``, ``r = 1/√(σ²+ε)``,
``x̂ = (x − μ)·r`` and ``y = γ·x̂ + β`` over ``M`` values per channel, the first derivatives of
``<gy, y>`` are ``gx = γ·r·P(gy)``, ``gγ = Σ gy·x̂`` and ``gβ = Σ gy``, where
``P(u) = u − mean(u) − x̂·mean(u·x̂)`` is symmetric; :class:`BatchNormBackward` computes them with one
native ``native_batch_norm_backward`` call, and so does every ``r·P(u)`` its own derivatives need.
Those derivatives (and the forward-mode tangents) are then two such calls and a handful of
element-wise ops with per-channel coefficients, each over all channels (all tasks, under vmap) at
once, to any order.

Only batch statistics are covered (training, or transductive BatchNorm without running statistics):
the statistics are part of the function, as in the MAML literature's networks.
"""

from __future__ import annotations

import torch

from bilevel_maml._function import sum_terms, with_cached_signature

aten = torch.ops.aten


def _per_channel(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A per-channel vector shaped to broadcast against ``like`` (``(batch, channels, ...)``)."""
    return None if t is None else t.view(1, -1, *([1] * (like.dim() - 2)))


def _dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _ones(rstd: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(rstd)


def _statistics(x, mean, rstd, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """``(μ, r)``; recomputed from ``x`` when autograd records (the statistics are functions of
    ``x``, and the cached ones are detached), else from the cache."""
    if torch.is_grad_enabled() and x.requires_grad:
        var, mean = torch.var_mean(x, dim=_dims(x), unbiased=False)
        rstd = torch.rsqrt(var + eps)
    return mean, rstd


def _normalised(x, mean, rstd, eps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x̂, μ, r)``, the statistics as :func:`_statistics` gives them."""
    mean, rstd = _statistics(x, mean, rstd, eps)
    return (x - _per_channel(mean, x)) * _per_channel(rstd, x), mean, rstd


def _combination(terms, constant=None) -> torch.Tensor:
    """``Σ sign·t·c`` over (at least one) ``(t, c, sign)`` terms, ``c`` per channel (None for 1) and
    ``sign`` ±1, plus a per-channel ``constant``: one whole-tensor kernel per term (``addcmul``),
    where writing the products and their sum out takes two."""
    total = None
    for t, c, sign in terms:
        if total is None:
            total = t if c is None else t * _per_channel(c, t)
            total = total if sign == 1 else -total
        elif c is None:
            total = total.add(t, alpha=sign)
        else:
            total = torch.addcmul(total, t, _per_channel(c, t), value=sign)
    return total if constant is None else total + _per_channel(constant, total)


@with_cached_signature
class BatchNormBackward(torch.autograd.Function):
    """``(gx, gγ, gβ)``: the gradients of ``<gy, batch_norm(x, γ, β)>`` (batch statistics) for the outputs
    ``mask`` asks for (None for the others), by one native call; differentiable again in closed form.
    ``mean`` and ``rstd`` are ``x``'s statistics, detached: a cache, not inputs."""

    generate_vmap_rule = True  # used only when the derivative itself runs under vmap

    @staticmethod
    def forward(x, weight, gy, mean, rstd, eps: float, mask: tuple[bool, bool, bool]):
        if weight is None:
            weight = _ones(rstd)
        return aten.native_batch_norm_backward(gy, x, weight, None, None, mean, rstd, True, eps, list(mask))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, gy, mean, rstd, ctx.eps, ctx.mask = inputs
        ctx.save_for_backward(x, weight, gy, mean, rstd)
        ctx.save_for_forward(x, weight, gy, mean, rstd)
        ctx.set_materialize_grads(False)  # an output nobody used costs no zeros

    @staticmethod
    def jvp(ctx, dx, dweight, dgy, _mean, _rstd, _eps, _mask):
        x, weight, gy, mean, rstd = ctx.saved_tensors
        eps, (need_x, need_w, need_b) = ctx.eps, ctx.mask
        gx, gw, gb = [], [], []
        if dgy is not None:  # linear in gy
            tx, tw, tb = BatchNormBackward.apply(x, weight, dgy, mean, rstd, eps, ctx.mask)
            gx.append(tx), gw.append(tw), gb.append(tb)
        if (dweight is not None and need_x) or dx is not None:
            q, sum_gy_xhat, _ = BatchNormBackward.apply(x, None, gy, mean, rstd, eps, (True, True, False))
            if dweight is not None and need_x:  # gx is linear in γ: γ·Q with Q = r·P(gy)
                gx.append(q * _per_channel(dweight, x))
            if dx is not None:
                count = x.numel() // x.shape[1]
                p_dx, sum_dx_xhat, _ = BatchNormBackward.apply(x, None, dx, mean, rstd, eps, (True, True, False))
                xhat, _, r = _normalised(x, mean, rstd, eps)
                gamma = _ones(rstd) if weight is None else weight
                if need_x:
                    gx.append(_per_channel(-gamma * r * sum_dx_xhat / count, x) * q
                              - _per_channel(gamma * r * sum_gy_xhat / count, x) * p_dx
                              - _per_channel(gamma * r * (q * dx).sum(_dims(x)) / count, x) * xhat)
                if need_w:
                    gw.append((q * dx).sum(_dims(x)))
        return tuple(sum_terms(terms) if needed else None for terms, needed in ((gx, need_x), (gw, need_w), (gb, need_b)))

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        # S = <ggx, gx> + <ggw, gγ> + <ggb, gβ>; P is symmetric, so ∂S/∂gy = γ·r·P(ggx) + ggw·x̂ + ggb.
        # x̂ enters as x − μ with r moved into the per-channel coefficients, so that every term
        # below is one pass over the activation.
        x, weight, gy, mean, rstd = ctx.saved_tensors
        eps = ctx.eps
        need_x, need_w, need_gy = ctx.needs_input_grad[:3]
        gamma = _ones(rstd) if weight is None else weight
        dx = dweight = dgy = None
        if ggx is not None and (need_gy or need_x):
            # γ·r·P(ggx) (the weight multiplies γ in) and Σ ggx·x̂
            gp_ggx, sum_ggx_xhat, _ = BatchNormBackward.apply(x, gamma, ggx, mean, rstd, eps, (True, True, False))
        if (need_gy and ggw is not None) or (need_x and ggx is not None):
            mu, r = _statistics(x, mean, rstd, eps)
            centred = x - _per_channel(mu, x)
        if need_gy:
            terms = []
            if ggx is not None:
                terms.append((gp_ggx, None, 1))
            if ggw is not None:
                terms.append((centred, r * ggw, 1))
            if terms:
                dgy = _combination(terms, ggb)
            elif ggb is not None:
                dgy = _per_channel(ggb, gy).expand_as(gy)
        if (need_x and (ggx is not None or ggw is not None)) or (need_w and ggx is not None):
            # Q = r·P(gy), so gx = γ·Q
            q, sum_gy_xhat, _ = BatchNormBackward.apply(x, None, gy, mean, rstd, eps, (True, True, False))
            ggx_q = None if ggx is None else (ggx * q).sum(_dims(x))
            if need_w and ggx is not None:
                dweight = ggx_q
            if need_x:
                if ggx is None:
                    dx = q * _per_channel(ggw, x)
                else:
                    r_count = r / (x.numel() // x.shape[1])
                    k = gamma * r_count
                    # ∂<ggx, gx>/∂x through mean(gy·x̂) (with ∂<ggw, gγ>/∂x), through r and through x̂
                    through_mean = k * sum_ggx_xhat
                    dx = _combination([(q, -through_mean if ggw is None else ggw - through_mean, 1),
                                       (centred, k * r * ggx_q, -1),
                                       (gp_ggx, r_count * sum_gy_xhat, -1)])
        return dx, dweight, dgy, None, None, None, None


@with_cached_signature
class BatchNorm(torch.autograd.Function):
    """``batch_norm(x, γ, β)`` with batch statistics, :class:`BatchNormBackward` as its derivative,
    and a vmap rule that makes per-task statistics and affine parameters those of one BatchNorm over
    ``tasks × channels`` channels."""

    @staticmethod
    def forward(x, weight, bias, eps: float):
        return aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, ctx.eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.save_for_forward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _eps):
        x, weight, mean, rstd = ctx.saved_tensors
        terms = []
        if dx is not None:  # the forward map's derivative in x is BatchNormBackward's gx map (symmetric)
            terms.append(BatchNormBackward.apply(x, weight, dx, mean, rstd, ctx.eps, (True, False, False))[0])
        if dweight is not None:
            terms.append(_normalised(x, mean, rstd, ctx.eps)[0] * _per_channel(dweight, x))
        if dbias is not None:
            terms.append(_per_channel(dbias, x).expand_as(x))
        return sum_terms(terms), None, None

    @staticmethod
    def backward(ctx, gy, _gmean, _grstd):
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if gy is None or not (need_x or need_w or need_b):
            return None, None, None, None
        gx, gw, gb = BatchNormBackward.apply(x, weight, gy, mean, rstd, ctx.eps,
                                             (need_x, need_w and weight is not None, need_b and ctx.has_bias))
        return gx, gw, gb, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, eps: float):
        x_dim, w_dim, b_dim = in_dims[:3]
        tasks = info.batch_size
        if x_dim is None:
            x = x.unsqueeze(0).expand(tasks, *x.shape)
        xs = x.movedim(0 if x_dim is None else x_dim, 1)  # (examples, tasks, channels, ...)

        def per_task(p, dim):
            if p is None:
                return None
            return (p.movedim(dim, 0) if dim is not None else p.expand(tasks, *p.shape)).flatten()

        out, mean, rstd = BatchNorm.apply(xs.flatten(1, 2), per_task(weight, w_dim), per_task(bias, b_dim), eps)
        return (out.unflatten(1, (tasks, -1)), mean.unflatten(0, (tasks, -1)), rstd.unflatten(0, (tasks, -1))), (1, 0, 0)


def batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)`` computed by :class:`BatchNorm`:
    the same values and derivatives.

    :param x: ``(batch, channels, ...)``.
    :param weight: per-channel scale γ, or None.
    :param bias: per-channel shift β, or None.
    :param eps: added to the variance.
    """
    return BatchNorm.apply(x, weight, bias, eps)[0]
