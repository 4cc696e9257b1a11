"""ReLU and max-pooling (bilevel_maml.relu_and_max_pool): PyTorch's values and derivatives of every
order, under vmap with the tasks in either place and in forward mode; and what they are for, a
vectorized second-order meta-iteration of conv4 that copies and zeroes no activation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from bilevel_maml.models import Conv4, MaxPool2d, ReLU
from bilevel_maml.relu_and_max_pool import max_pool2d, relu

from conftest import functional, vmapped_meta_gradient

POOLS = [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, stride=1, dilation=2),
         dict(kernel_size=3, stride=2, ceil_mode=True)]
LAYERS = [pytest.param((relu, F.relu), id="relu")] + [
    pytest.param((lambda x, c=c: max_pool2d(x, **c), lambda x, c=c: F.max_pool2d(x, **c)), id=f"max_pool2d{c}")
    for c in POOLS]


def derivatives_to_third_order(layer, x, v):
    """Gradients of ``<layer(x)³, v>`` with respect to ``(x, v)``, then of a function of those, and
    again: the first three orders, each differentiating the previous one's backward."""
    found = []
    value = (layer(x).pow(3) * v).sum()
    for _ in range(3):
        gx, gv = torch.autograd.grad(value, (x, v), create_graph=True, materialize_grads=True)
        found += [gx, gv]
        value = gx.sin().sum() + (gv * gv).sum()
    return found


@pytest.mark.parametrize("layers", LAYERS)
def test_values_and_derivatives_to_third_order_are_pytorchs(layers):
    ours, pytorchs = layers
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    v = torch.randn(pytorchs(x).shape, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.equal(ours(x), pytorchs(x))
    for a, c in zip(derivatives_to_third_order(ours, x, v), derivatives_to_third_order(pytorchs, x, v)):
        assert torch.allclose(a, c, atol=1e-12, rtol=0), (a - c).abs().max()


@pytest.mark.parametrize("task_dim", [0, 1])
@pytest.mark.parametrize("layers", LAYERS)
def test_under_vmap_second_order_gradients_are_pytorchs_wherever_the_tasks_lie(layers, task_dim):
    """Per-task parameters with autograd outside vmap (the vectorized inner loop), the tasks of the
    input first or second (where a grouped convolution leaves them), and torch.func.grad inside vmap."""
    ours, pytorchs = layers
    torch.manual_seed(0)
    tasks = 3
    x = torch.randn(tasks, 4, 2, 6, 6, dtype=torch.float64).movedim(0, task_dim).requires_grad_()
    scale = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def meta_gradient(layer):
        def loss(p, xi):
            return layer(xi * p.view(1, -1, 1, 1) + 0.3).pow(3).sum()

        params = scale.expand(tasks, 2)
        outer = vmapped_meta_gradient(lambda p, xi: loss(p[0], xi), (params,), x, (scale, x), inputs_dim=task_dim)

        def adapted_loss(p, xi):
            return loss(p - 0.1 * grad(loss)(p, xi), xi)

        inner = torch.autograd.grad(vmap(adapted_loss, in_dims=(0, task_dim))(params, x).sum(), (scale, x))
        return *outer, *inner

    for a, c in zip(meta_gradient(ours), meta_gradient(pytorchs)):
        assert torch.allclose(a, c, atol=1e-11 * (1 + c.abs().max().item()), rtol=0), (a - c).abs().max()


@pytest.mark.parametrize("layers", LAYERS)
def test_forward_mode_is_pytorchs(layers):
    """torch.func.jvp of the layer, of a gradient through it (forward-over-reverse) and under vmap."""
    ours, pytorchs = layers
    torch.manual_seed(0)
    x, dx = torch.randn(3, 4, 2, 6, 6, dtype=torch.float64), torch.randn(3, 4, 2, 6, 6, dtype=torch.float64)

    def tangents(layer):
        def scalar(xi):
            return layer(xi).pow(3).sum()

        return (jvp(layer, (x[0],), (dx[0],))[1], jvp(grad(scalar), (x[0],), (dx[0],))[1],
                jvp(vmap(grad(scalar), in_dims=1), (x.movedim(0, 1),), (dx.movedim(0, 1),))[1])

    for a, c in zip(tangents(ours), tangents(pytorchs)):
        assert torch.allclose(a, c, atol=1e-12, rtol=0), (a - c).abs().max()


class ActivationCopies(TorchDispatchMode):
    """Counts copies (``clone``) and ``zeros_like`` of conv4 activations: tensors holding the
    ``tasks × examples × channels`` values of one spatial size."""

    def __init__(self, tasks, examples, channels):
        super().__init__()
        self.sizes, self.count = {tasks * examples * c for c in channels}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.zeros_like):
            t = args[0]
            self.count += t.dim() >= 4 and t.numel() // (t.shape[-1] * t.shape[-2]) in self.sizes and t.shape[-1] > 1
        return func(*args, **(kwargs or {}))


def activation_copies(model, tasks=3, examples=5) -> int:
    torch.manual_seed(0)
    theta = tuple(model.parameters())
    params = tuple(t.expand(tasks, *t.shape) for t in theta)
    images, labels = torch.randn(tasks, examples, 1, 28, 28), torch.randint(0, 5, (tasks, examples))
    forward = functional(model)

    def loss(p, batch):
        return F.cross_entropy(forward(p, batch[0]), batch[1])

    with ActivationCopies(tasks, examples, channels=(1, 8)) as counter:
        vmapped_meta_gradient(loss, params, (images, labels), theta)
    return counter.count


@pytest.mark.parametrize("grouped_conv_grads", [False, True])
def test_a_vectorized_second_order_meta_iteration_copies_and_zeroes_no_activation(grouped_conv_grads):
    """The reason for these layers: with PyTorch's, the tasks move between the batch and the channel
    dimension at every pool and convolution (a copy each way, forward and backward), and the double
    backward zeroes each ReLU's output; with ours, the activations are never copied or zeroed
    (PyTorch's layers: 30 copies and 4 zeros here)."""
    def conv4(layers):
        torch.manual_seed(0)
        model = Conv4(5, hidden=8, grouped_conv_grads=grouped_conv_grads)
        for block in model.features:
            block[2], block[3] = layers
        return model

    assert activation_copies(conv4((ReLU(), MaxPool2d(2)))) == 0
    assert activation_copies(conv4((nn.ReLU(), nn.MaxPool2d(2)))) >= 10  # what the count would see


def test_the_layers_are_pytorchs_outside_torch_func_and_in_place():
    """Outside torch.func transforms (task by task), and for what the Functions do not cover, the
    layers compute as nn.ReLU / nn.MaxPool2d (no autograd.Function in the graph)."""
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    assert ReLU()(x).grad_fn.name() == F.relu(x).grad_fn.name()
    assert MaxPool2d(2)(x).grad_fn.name() == F.max_pool2d(x, 2).grad_fn.name()
    out, indices = vmap(MaxPool2d(2, return_indices=True))(x.unsqueeze(0))
    assert torch.equal(indices[0], F.max_pool2d(x, 2, return_indices=True)[1])
    assert torch.equal(vmap(ReLU(inplace=True))(x.detach().clone().unsqueeze(0))[0], F.relu(x.detach()))
    with pytest.raises(ValueError, match=r"needs a \(batch, channels, height, width\) input, got shape \(3, 6, 6\)"):
        max_pool2d(x[0], 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("task_dim", [0, 1])
def test_on_a_gpu_a_conv4_meta_gradient_with_these_layers_is_pytorchs(task_dim):
    """CUDA's pooling and threshold kernels, in float64: the second-order meta-gradient of a small conv4
    with these layers equals the one with nn.ReLU / nn.MaxPool2d, the tasks first or second in the images."""
    def meta_gradient(layers):
        torch.manual_seed(0)
        model = Conv4(5, hidden=8).double().cuda()
        for block in model.features:
            block[2], block[3] = layers
        theta = tuple(model.parameters())
        params = tuple(t.expand(3, *t.shape) for t in theta)
        images = torch.randn(3, 5, 1, 28, 28, dtype=torch.float64, device="cuda").movedim(0, task_dim)
        labels = torch.randint(0, 5, (3, 5), device="cuda")
        forward = functional(model)

        def loss(p, batch):
            return F.cross_entropy(forward(p, batch[0]), batch[1])

        return vmapped_meta_gradient(loss, params, (images, labels), theta, inputs_dim=(task_dim, 0))

    for a, c in zip(meta_gradient((ReLU(), MaxPool2d(2))), meta_gradient((nn.ReLU(), nn.MaxPool2d(2)))):
        assert torch.allclose(a, c, atol=1e-10 * (1 + c.abs().max().item()), rtol=0), (a - c).abs().max()
