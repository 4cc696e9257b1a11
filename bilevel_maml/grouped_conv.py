"""A 2-d convolution whose derivatives of every order are whole grouped convolutions.

Under ``torch.func.vmap`` with per-task filters, PyTorch runs a convolution as one grouped convolution
(a group per task). Its first derivatives are single calls too, but its double backward, which
second-order MAML and iMAML differentiate through, loops over the groups for one of its terms: one small
convolution per task and layer (96 of the 115 convolutions of a vectorized MAML meta-iteration of conv4
at meta-batch 32 and 1 inner step, each with its own layout copies on a GPU).

Here the derivatives are written in closed form instead. For ``y = conv(x, w) + b``, the first
derivatives ``(gx, gw, gb)`` of ``<gy, y>`` are one native ``convolution_backward`` call
(:class:`ConvBackward`), and that map is bilinear in ``(x, w)`` and linear in ``gy``, so its own
derivatives are again a convolution and ``convolution_backward`` calls with the roles of the tensors
exchanged, each over all groups at once, to any order. Forward mode (``torch.func.jvp``, e.g.
forward-over-reverse Hessian-vector products) has rules of the same kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bilevel_maml._function import pair, sum_terms, with_cached_signature

# (stride, padding, dilation, groups) of one convolution
Config = tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]


def _conv_tangent(x, w, dx, dw, db, config: Config, shape) -> torch.Tensor | None:
    """d/dε of ``conv(x + ε·dx, w + ε·dw) + ε·db`` (the convolution is bilinear): the convolution's
    forward tangent and, with the cotangents of :class:`ConvBackward`'s outputs as ``(dx, dw, db)``,
    that class's gradient with respect to ``gy``. Absent (None) directions contribute nothing;
    ``shape`` is the convolution's output shape."""
    terms = []
    if dx is not None:
        terms.append(Conv.apply(dx, w, db, config))
        db = None
    if dw is not None:
        terms.append(Conv.apply(x, dw, db, config))
        db = None
    if db is not None:
        terms.append(db.view(-1, 1, 1).expand(shape))
    return sum_terms(terms)


@with_cached_signature
class ConvBackward(torch.autograd.Function):
    """``(gx, gw, gb)``: the gradients of ``<gy, conv(x, w) + b>`` for the outputs ``mask`` asks for
    (None for the others), by one native call; differentiable again in closed form."""

    generate_vmap_rule = True  # used only when the derivative itself runs under vmap

    @staticmethod
    def forward(x, w, gy, config: Config, mask: tuple[bool, bool, bool]):
        stride, padding, dilation, groups = config
        return torch.ops.aten.convolution_backward(gy, x, w, [w.shape[0]] if mask[2] else None, stride, padding,
                                                   dilation, False, (0, 0), groups, list(mask))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, gy, ctx.config, ctx.mask = inputs
        ctx.save_for_backward(x, w, gy)
        ctx.save_for_forward(x, w, gy)
        ctx.set_materialize_grads(False)  # an output nobody used costs no zeros

    @staticmethod
    def jvp(ctx, dx, dw, dgy, _config, _mask):
        # gx is bilinear in (w, gy), gw in (x, gy), gb linear in gy
        x, w, gy = ctx.saved_tensors
        config, (need_x, need_w, need_b) = ctx.config, ctx.mask
        terms = []
        if dgy is not None:
            terms.append(ConvBackward.apply(x, w, dgy, config, ctx.mask))
        if dw is not None and need_x:
            terms.append(ConvBackward.apply(x, dw, gy, config, (True, False, False)))
        if dx is not None and need_w:
            terms.append(ConvBackward.apply(dx, w, gy, config, (False, True, False)))
        return tuple(sum_terms([t[i] for t in terms if t[i] is not None]) if needed else None
                     for i, needed in enumerate((need_x, need_w, need_b)))

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        # S = <ggx, gx> + <ggw, gw> + <ggb, gb> = <gy, conv(ggx, w) + conv(x, ggw) + ggb>
        x, w, gy = ctx.saved_tensors
        config = ctx.config
        need_x, need_w, need_gy = ctx.needs_input_grad[:3]
        dx = dw = dgy = None
        if need_x and ggw is not None:
            dx = ConvBackward.apply(x, ggw, gy, config, (True, False, False))[0]
        if need_w and ggx is not None:
            dw = ConvBackward.apply(ggx, w, gy, config, (False, True, False))[1]
        if need_gy:
            dgy = _conv_tangent(x, w, ggx, ggw, ggb, config, gy.shape)
        return dx, dw, dgy, None, None


@with_cached_signature
class Conv(torch.autograd.Function):
    """``conv2d(x, w, b)`` with :class:`ConvBackward` as its derivative, and a vmap rule that turns
    per-task filters into one grouped convolution (as PyTorch's own rule does)."""

    @staticmethod
    def forward(x, w, b, config: Config):
        stride, padding, dilation, groups = config
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, ctx.config = inputs
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        ctx.has_bias, ctx.output_shape = b is not None, output.shape

    @staticmethod
    def jvp(ctx, dx, dw, db, _config):
        x, w = ctx.saved_tensors
        return _conv_tangent(x, w, dx, dw, db, ctx.config, ctx.output_shape)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_x or need_w or need_b):
            return None, None, None, None
        gx, gw, gb = ConvBackward.apply(x, w, gy, ctx.config, (need_x, need_w, need_b and ctx.has_bias))
        return gx, gw, gb, None

    @staticmethod
    def vmap(info, in_dims, x, w, b, config: Config):
        x_dim, w_dim, b_dim = in_dims[:3]
        stride, padding, dilation, groups = config
        if w_dim is None and b_dim is None:  # shared filters: the tasks' examples are one batch
            xs = x.movedim(x_dim, 0)
            out = Conv.apply(xs.flatten(0, 1), w, b, config)
            return out.unflatten(0, xs.shape[:2]), 0
        tasks = info.batch_size
        ws = w.movedim(w_dim, 0) if w_dim is not None else w.expand(tasks, *w.shape)
        if b is not None:
            b = (b.movedim(b_dim, 0) if b_dim is not None else b.expand(tasks, *b.shape)).flatten()
        if x_dim is None:
            grouped = x.repeat(1, tasks, 1, 1)
        else:
            xs = x.movedim(x_dim, 1)  # (examples, tasks, channels, height, width)
            grouped = xs.reshape(xs.shape[0], -1, *xs.shape[3:])
        out = Conv.apply(grouped, ws.flatten(0, 1), b, (stride, padding, dilation, groups * tasks))
        return out.unflatten(1, (tasks, -1)), 1


def grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                   groups: int) -> torch.Tensor:
    """``F.conv2d`` (numeric padding) computed by :class:`Conv`: the same values and derivatives.

    :param x: ``(batch, channels, height, width)``.
    :param weight: the filters.
    :param bias: per-filter bias, or None.
    :param stride: as ``F.conv2d``'s, an int or a pair.
    :param padding: as ``F.conv2d``'s, numeric (an int or a pair).
    :param dilation: as ``F.conv2d``'s.
    :param groups: as ``F.conv2d``'s.
    """
    if isinstance(padding, str):
        raise ValueError(f"grouped_conv2d needs numeric padding, got padding={padding!r}")
    return Conv.apply(x, weight, bias, (pair(stride), pair(padding), pair(dilation), groups))
