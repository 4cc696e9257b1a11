"""Closed-form BatchNorm derivatives (bilevel_maml.batch_norm) are PyTorch's, in fewer ops.

The reference for third-order derivatives and for vmap with per-task derivatives is BatchNorm written
with mean, variance and arithmetic (autograd differentiates primitives, exact to any order): PyTorch's
own BatchNorm is wrong there (pinned below, and in tests/test_benchmark_script.py for vmap).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from bilevel_maml.batch_norm import batch_norm
from bilevel_maml.models import BatchNorm2d, Conv4, ResNet12, use_closed_form_norm_grads

from conftest import vmapped_meta_gradient

EPS = 1e-5


def pytorchs(x, w, b):
    return F.batch_norm(x, None, None, w, b, training=True, eps=EPS)


def primitive(x, w, b):
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    shape = (1, -1, *([1] * (x.dim() - 2)))
    out = (x - mean) * torch.rsqrt(var + EPS)
    if w is not None:
        out = out * w.view(shape)
    return out if b is None else out + b.view(shape)


def ours(x, w, b):
    return batch_norm(x, w, b, EPS)


def of_gradients(norm):
    """A function of the first derivatives (its gradient is a second derivative)."""
    def f(x, w, b, gy):
        inputs = [t for t in (x, w, b) if t is not None]
        grads = torch.autograd.grad((norm(x, w, b) * gy).sum() + norm(x, w, b).tanh().sum(), inputs,
                                    create_graph=True)
        return sum(g.sin().sum() for g in grads)
    return f


def derivatives(f, inputs, create_graph=False):
    found = torch.autograd.grad(f(*inputs), inputs, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(found, inputs)]


def inputs(shape, affine: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def leaf(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64).requires_grad_()

    channels = shape[1]
    return leaf(*shape), leaf(channels) if affine else None, leaf(channels) if affine else None, leaf(*shape)


@pytest.mark.parametrize("shape, affine", [((3, 2, 3, 3), True), ((3, 2, 3, 3), False), ((6, 3), True)])
def test_batch_norm_has_pytorchs_values_and_derivatives_and_exact_third_order_ones(shape, affine):
    """Values, gradients and second derivatives (of a function of the gradients) equal F.batch_norm's;
    third derivatives equal the primitive-op reference's; all pass finite-difference checks."""
    x, w, b, gy = inputs(shape, affine)
    params = [x, w, b] if affine else [x]

    def of_params(norm):  # (x[, w, b]) -> the normalised x
        return lambda x, *wb: norm(x, *(wb or (None, None)))

    def second(norm):  # (x[, w, b], gy) -> a function of the gradients
        return lambda *t: of_gradients(norm)(t[0], *(t[1:-1] or (None, None)), t[-1])

    def third(norm):
        return derivatives(lambda *t: sum(d.pow(2).sum() for d in derivatives(second(norm), t, create_graph=True)),
                           [*params, gy])

    assert torch.allclose(ours(x, w, b), pytorchs(x, w, b), atol=1e-13, rtol=0)
    assert torch.autograd.gradcheck(of_params(ours), params) and torch.autograd.gradgradcheck(of_params(ours), params)
    assert torch.autograd.gradgradcheck(second(ours), [*params, gy])  # third order, by finite differences
    for a, c in zip(derivatives(second(ours), [*params, gy]), derivatives(second(pytorchs), [*params, gy])):
        assert torch.allclose(a, c, atol=1e-11 * (1 + c.abs().max().item()), rtol=0), (a - c).abs().max()
    for a, c in zip(third(ours), third(primitive)):
        assert torch.allclose(a, c, atol=1e-10 * (1 + c.abs().max().item()), rtol=0), (a - c).abs().max()


def test_pytorchs_batch_norm_third_derivatives_are_wrong():
    """Pins the reason the third-order reference above is not F.batch_norm: differentiating its double
    backward treats the batch statistics as constants (PyTorch 2.x), so finite differences disagree."""
    x, w, b, gy = inputs((3, 2, 3, 3), True)
    second = of_gradients(pytorchs)
    assert not torch.autograd.gradgradcheck(second, (x, w, b, gy), raise_exception=False)


def test_batch_norm_under_vmap_has_the_exact_second_order_gradients():
    """Per-task γ/β with autograd outside (the vectorized inner loop), shared γ/β, shared inputs, and
    torch.func.grad inside vmap (where PyTorch's batching rule is wrong): the primitive-op results."""
    torch.manual_seed(0)
    tasks, double = 3, torch.float64
    x = torch.randn(tasks, 5, 3, 4, 4, dtype=double, requires_grad=True)
    w, b = torch.randn(3, dtype=double, requires_grad=True), torch.randn(3, dtype=double, requires_grad=True)
    w_tasks = torch.randn(tasks, 3, dtype=double, requires_grad=True)

    def second_order(norm):
        def loss(p, xi):
            return norm(norm(xi, p[0], p[1]).tanh() * 1.5, p[0], None).pow(2).sum()

        return vmapped_meta_gradient(loss, (w.expand(tasks, 3), b.expand(tasks, 3)), x, (w, b, x))

    def shared_parameters(norm):
        return torch.autograd.grad(vmap(lambda xi: norm(xi, w, b).pow(3).sum())(x).sum(), (x, w, b))

    def shared_inputs(norm):
        return torch.autograd.grad(vmap(lambda wi: norm(x[0], wi, b).pow(3).sum())(w_tasks).sum(), (x, w_tasks, b))

    def inner_grad(norm):
        def adapted_loss(wi, xi):
            gw = grad(lambda v: norm(xi, v, None).tanh().pow(2).sum())(wi)
            return norm(xi, wi - 0.1 * gw, None).sin().sum()
        return torch.autograd.grad(vmap(adapted_loss)(w_tasks, x).sum(), (w_tasks, x))

    for case in (second_order, shared_parameters, shared_inputs, inner_grad):
        for a, c in zip(case(ours), case(primitive)):
            assert torch.allclose(a, c, atol=1e-10 * c.abs().max().item(), rtol=0), (case.__name__, (a - c).abs().max())


def test_batch_norm_forward_mode_is_exact():
    """torch.func.jvp of BatchNorm, of a gradient through it (forward-over-reverse, as Hessian-vector
    products take it) and of per-task gradients under vmap: the primitive-op tangents."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 4, 4, dtype=torch.float64)
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    dx, dw, db = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    w_tasks, dw_tasks = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)

    def tangents(norm):
        def two_layers(xi, w, b):
            return norm(norm(xi, w, b).tanh(), w, None).tanh().pow(2).sum()

        def gradient(xi, w, b):
            return grad(two_layers, argnums=(0, 1, 2))(xi, w, b)

        def per_task_gradient(ws):
            return grad(lambda ws: vmap(lambda wi, xi: two_layers(xi, wi, None))(ws, x).sum())(ws)

        return (jvp(lambda *t: norm(*t).tanh().sum(), (x[0], w, b), (dx[0], dw, db))[1],
                *jvp(gradient, (x[0], w, b), (dx[0], dw, db))[1], jvp(per_task_gradient, (w_tasks,), (dw_tasks,))[1])

    for a, c in zip(tangents(ours), tangents(primitive)):
        assert torch.allclose(a, c, atol=1e-11 * c.abs().max().item(), rtol=0), (a - c).abs().max()


def ops_of_a_second_derivative(norm) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    x, w, b, gy = inputs((4, 3, 5, 5), True)
    second = of_gradients(norm)(x, w, b, gy)
    with Count():
        torch.autograd.grad(second, (x, w, b, gy), allow_unused=True)
    return Count.calls


def test_closed_form_derivatives_take_fewer_than_half_of_pytorchs_ops():
    """The point of it: each op is a kernel and a pass over the activation on a GPU."""
    assert 2 * ops_of_a_second_derivative(ours) < ops_of_a_second_derivative(pytorchs)


def closed_form_calls(model, x) -> int:
    from unittest import mock

    from bilevel_maml import models

    with mock.patch.object(models, "batch_norm", wraps=models.batch_norm) as spy:
        model(x)
    return spy.call_count


def test_closed_form_norm_grads_are_the_default_and_switch_every_layer():
    x = torch.randn(2, 6, 1, 28, 28)
    assert closed_form_calls(vmap(BatchNorm2d(1, track_running_stats=False)), x) == 1
    assert closed_form_calls(vmap(Conv4(5)), x) == 4
    assert closed_form_calls(vmap(Conv4(5, closed_form_norm_grads=False)), x) == 0
    layers = [m for m in Conv4(5).modules() if isinstance(m, BatchNorm2d)]
    assert len(layers) == 4 and all(m.closed_form_grads for m in layers)
    assert not any(m.closed_form_grads for m in Conv4(5, closed_form_norm_grads=False).modules()
                   if isinstance(m, BatchNorm2d))
    resnet = use_closed_form_norm_grads(ResNet12(5, channels=(4, 4, 4, 4)), False)
    layers = [m for m in resnet.modules() if isinstance(m, BatchNorm2d)]
    assert len(layers) == 16 and not any(m.closed_form_grads for m in layers)


def test_outside_torch_func_a_small_input_takes_pytorchs_derivatives():
    """Task by task, one task's small activation costs less through PyTorch's derivatives than through
    the closed form's Python; under vmap the layer sees one task's shape but computes all tasks at once."""
    layer = BatchNorm2d(3, track_running_stats=False)
    small = torch.randn(5, 3, 8, 8)
    assert small.numel() < layer.closed_form_min_size
    assert closed_form_calls(layer, small) == 0
    assert closed_form_calls(vmap(layer), small.expand(4, *small.shape)) == 1
    assert closed_form_calls(layer, torch.randn(5, 3, 100, 100)) == 1


def test_the_layer_keeps_nn_batchnorms_behaviour_where_the_closed_form_does_not_apply():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4)
    # running statistics: PyTorch's layer, which updates them
    tracked, reference = BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    tracked.closed_form_min_size = 0
    assert torch.equal(tracked(x), reference(x)) and torch.equal(tracked.running_mean, reference.running_mean)
    tracked.eval(), reference.eval()
    assert torch.equal(tracked(x), reference(x))
    # transductive: the closed form, the same values in training and evaluation, PyTorch's refusals
    transductive = BatchNorm2d(3, track_running_stats=False)
    transductive.closed_form_min_size = 0
    assert closed_form_calls(transductive, x) == 1
    assert torch.allclose(transductive(x), torch.nn.BatchNorm2d(3, track_running_stats=False)(x), atol=1e-6)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        transductive(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="expected 4D input"):
        transductive(torch.randn(6, 3))


def test_under_autocast_the_layer_computes_in_pytorchs_dtypes():
    """bf16 autocast (CPU here; CUDA's is the same rule): BatchNorm runs on the bf16 activation as
    PyTorch's layer does, with float32 statistics, and its gradients come back in the inputs' dtypes."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    ours_layer = BatchNorm2d(3, track_running_stats=False)
    ours_layer.closed_form_min_size = 0
    theirs_layer = torch.nn.BatchNorm2d(3, track_running_stats=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = ours_layer(x.to(torch.bfloat16))
        c = theirs_layer(x.to(torch.bfloat16))
    assert a.dtype == c.dtype
    assert torch.allclose(a.float(), c.float(), atol=0.05)
    gx, gw = torch.autograd.grad(a.float().pow(2).sum(), (x, ours_layer.weight))
    assert gx.dtype == x.dtype and gw.dtype == ours_layer.weight.dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_closed_form_norm_grads_give_the_same_second_order_gradients():
    from bilevel_maml.execution import precision_scope

    x, w, b, gy = (t.detach().cuda().requires_grad_() for t in inputs((8, 4, 6, 6), True))
    with precision_scope("fp32", "cuda"):
        for a, c in zip(derivatives(of_gradients(ours), (x, w, b, gy)),
                        derivatives(of_gradients(pytorchs), (x, w, b, gy))):
            assert torch.allclose(a, c, atol=1e-10 * (1 + c.abs().max().item()), rtol=0), (a - c).abs().max()
