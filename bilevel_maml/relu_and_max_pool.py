"""ReLU and max-pooling for vectorized second-order meta-learning: no layout copies, no zeros.

Two costs of PyTorch's own versions that a vectorized second-order MAML meta-iteration pays at every
layer and inner step, each a pass over an activation and, on a GPU, a kernel:

* **Layout copies.** Under ``torch.func.vmap`` the tasks of a grouped convolution and of
  :func:`bilevel_maml.batch_norm.batch_norm` lie in the channel dimension, ``(examples, tasks ×
  channels, h, w)``; PyTorch's max-pool rule moves them into the batch dimension instead, a copy,
  and the next layer's convolution copies them back (with their derivatives: 109 of the 127 copies
  of conv4's meta-iteration at meta-batch 32 and 5 inner steps). Pooling is per channel, so here the
  tasks stay where they lie.
* **Zeros.** ReLU's derivative ``threshold_backward(gy, y, 0)`` has a zero derivative with respect
  to ``y``, and PyTorch materialises it: a ``zeros_like`` of the activation per layer and inner step
  in the double backward, then added to that activation's gradient. Here the backward sees ``y``
  detached, so nothing is computed for it (max-pool's backward, likewise, gets its input detached:
  it only reads the shape).

Values and derivatives of every order are PyTorch's (the same kernels compute them).
"""

from __future__ import annotations

import torch

from bilevel_maml._function import pair, with_cached_signature

aten = torch.ops.aten

# (kernel_size, stride, padding, dilation, ceil_mode) of one max-pool, as pairs
PoolConfig = tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], bool]


@with_cached_signature
class ReLU(torch.autograd.Function):
    """``relu(x)``, its derivative ``threshold_backward(gy, y, 0)`` taken with ``y`` detached."""

    @staticmethod
    def forward(x):
        return torch.relu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y = output.detach()
        ctx.save_for_backward(y)
        ctx.save_for_forward(y)

    @staticmethod
    def backward(ctx, gy):
        y, = ctx.saved_tensors
        return aten.threshold_backward(gy, y, 0)

    @staticmethod
    def jvp(ctx, dx):
        y, = ctx.saved_tensors
        return aten.threshold_backward(dx, y, 0)

    @staticmethod
    def vmap(info, in_dims, x):
        return ReLU.apply(x), in_dims[0]  # element-wise: any layout will do


@with_cached_signature
class MaxPool(torch.autograd.Function):
    """``max_pool2d_with_indices(x)``; the derivative scatters ``gy`` to the maxima with ``x`` detached
    (only its shape is used), and the vmap rule pools the tasks as channels where they lie there."""

    @staticmethod
    def forward(x, config: PoolConfig):
        return aten.max_pool2d_with_indices(x, *config)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.config = inputs
        indices = output[1]
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(x.detach(), indices)
        ctx.save_for_forward(indices)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gy, _gindices):
        if gy is None:
            return None, None
        x, indices = ctx.saved_tensors
        return aten.max_pool2d_with_indices_backward(gy, x, *ctx.config, indices), None

    @staticmethod
    def jvp(ctx, dx, _config):
        indices, = ctx.saved_tensors
        tangent = dx.flatten(-2).gather(-1, indices.flatten(-2)).view_as(indices)
        return tangent, None

    @staticmethod
    def vmap(info, in_dims, x, config: PoolConfig):
        x_dim = in_dims[0]
        if x_dim is None:
            return MaxPool.apply(x, config), (None, None)
        tasks = info.batch_size
        if x_dim == 0:  # tasks before examples: they join the batch, a view
            out, indices = MaxPool.apply(x.flatten(0, 1), config)
            return (out.unflatten(0, (tasks, -1)), indices.unflatten(0, (tasks, -1))), (0, 0)
        xs = x.movedim(x_dim, 1)  # (examples, tasks, channels, h, w): tasks join the channels
        out, indices = MaxPool.apply(xs.reshape(xs.shape[0], -1, *xs.shape[3:]), config)
        return (out.unflatten(1, (tasks, -1)), indices.unflatten(1, (tasks, -1))), (1, 1)


def relu(x: torch.Tensor) -> torch.Tensor:
    """``torch.relu(x)`` computed by :class:`ReLU`: the same values and derivatives.

    :param x: any shape.
    """
    return ReLU.apply(x)


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False) -> torch.Tensor:
    """``F.max_pool2d`` computed by :class:`MaxPool`: the same values and derivatives.

    :param x: ``(batch, channels, height, width)``.
    :param kernel_size: as ``F.max_pool2d``'s, an int or a pair.
    :param stride: as ``F.max_pool2d``'s (None: ``kernel_size``).
    :param padding: as ``F.max_pool2d``'s.
    :param dilation: as ``F.max_pool2d``'s.
    :param ceil_mode: as ``F.max_pool2d``'s.
    """
    if x.dim() != 4:
        raise ValueError(f"max_pool2d needs a (batch, channels, height, width) input, got shape {tuple(x.shape)}")
    stride = kernel_size if stride is None or stride == [] else stride
    return MaxPool.apply(x, (pair(kernel_size), pair(stride), pair(padding), pair(dilation), bool(ceil_mode)))[0]
