"""The backbones are the networks of the papers they name."""

import pytest
import torch

from bilevel_maml.data._learn2learn import import_learn2learn
from bilevel_maml.models import Conv4, build_model

from conftest import vmapped_meta_gradient


def test_strided_conv4_is_learn2learns_omniglot_cnn():
    """``conv4-strided`` computes the same function as learn2learn's ``OmniglotCNN`` (Finn et al.'s
    Omniglot network) given the same parameters, in training mode (batch statistics)."""
    l2l = import_learn2learn()
    torch.manual_seed(0)
    theirs = l2l.vision.models.OmniglotCNN(output_size=5).double().train()
    ours = build_model("conv4-strided", ways=5).double().train()
    with torch.no_grad():
        for block, their_block in zip(ours.features, theirs.base):
            block[0].weight.copy_(their_block.conv.weight)
            block[0].bias.copy_(their_block.conv.bias)
            block[1].weight.copy_(their_block.normalize.weight)
            block[1].bias.copy_(their_block.normalize.bias)
        ours.classifier.weight.copy_(theirs.classifier.weight)
        ours.classifier.bias.copy_(theirs.classifier.bias)
    assert [p.shape for p in ours.parameters()] == [
        p.shape for block in theirs.base for p in (block.conv.weight, block.conv.bias,
                                                   block.normalize.weight, block.normalize.bias)
    ] + [theirs.classifier.weight.shape, theirs.classifier.bias.shape]
    x = torch.randn(10, 1, 28, 28, dtype=torch.float64)
    assert torch.allclose(ours(x), theirs(x), atol=1e-10)


def test_conv4_refuses_an_unknown_downsampling():
    with pytest.raises(ValueError, match=r"downsample='avg'; choose one of: max-pool, stride"):
        Conv4(5, downsample="avg")


def test_the_built_in_convolutions_follow_autocast_under_vmap_where_nn_conv2d_does_not():
    # vmap's batching rule calls aten.convolution, which autocast's lists miss; CPU autocast shows
    # the same gap as CUDA's (seen on an H100), so the property is tested here
    from torch.func import functional_call, vmap

    from bilevel_maml.models import Conv2d, use_grouped_conv_grads

    x = torch.randn(3, 2, 1, 8, 8)
    for layer, expected in ((Conv2d(1, 4, 3), torch.bfloat16), (use_grouped_conv_grads(Conv2d(1, 4, 3)), torch.bfloat16),
                            (torch.nn.Conv2d(1, 4, 3), torch.float32)):
        params = {k: v.detach().expand(3, *v.shape) for k, v in layer.named_parameters()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = vmap(lambda xi, p: functional_call(layer, p, (xi,)))(x, params)
        assert out.dtype == expected, type(layer)
    model = Conv4(5, hidden=4, image_size=16)
    x = torch.randn(3, 2, 1, 16, 16)
    seen = []
    model.features[0][0].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    params = {k: v.detach().expand(3, *v.shape) for k, v in model.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vmap(lambda xi, p: functional_call(model, p, (xi,)))(x, params)
    assert seen == [torch.bfloat16]


# -- pool before norm ------------------------------------------------------------------------------
def mixed_sign_conv4(pool_before_norm, **kwargs):
    """A float64 conv4 whose BatchNorm scales γ have both signs in every block."""
    torch.manual_seed(0)
    model = Conv4(5, hidden=6, image_size=16, pool_before_norm=pool_before_norm, **kwargs).double()
    with torch.no_grad():
        for block in model.features:
            block[1].weight.copy_(torch.tensor([1.5, -0.7, 0.3, -2.0, 0.9, -0.1], dtype=torch.float64))
            block[1].bias.copy_(torch.randn(6, dtype=torch.float64))
    return model


def values_and_second_order_gradients(model, x, training=True):
    """Outputs and ∇θ‖∇θ Σ out²‖² for stacked tasks, each with its own θ (under vmap, as the inner loop
    runs), the tasks' γ of opposite signs."""
    from torch.func import functional_call, vmap

    model.train(training)
    base = dict(model.named_parameters())
    signs = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    params = {n: p * signs if n.endswith("1.weight") else p.expand(2, *p.shape) for n, p in base.items()}
    out = vmap(lambda xi, p: functional_call(model, p, (xi,)))(x, params)
    grads = torch.autograd.grad(out.pow(2).sum(), list(base.values()), create_graph=True)
    return out, torch.autograd.grad(sum((g * g).sum() for g in grads), list(base.values()))


@pytest.mark.parametrize("training", [True, False])
def test_pool_before_norm_is_the_same_function_and_derivatives_with_negative_scales(training):
    """The reordered max-pool block (statistics from the convolution, normalisation and ReLU on the pooled
    quarter, min-pooling where γ < 0) equals conv–BN–ReLU–max-pool: values and second-order gradients."""
    x = torch.randn(2, 7, 1, 16, 16, dtype=torch.float64)
    plain, plain_grads = values_and_second_order_gradients(mixed_sign_conv4(False), x, training)
    fast, fast_grads = values_and_second_order_gradients(mixed_sign_conv4(True), x, training)
    assert torch.allclose(plain, fast, atol=1e-12, rtol=0)
    for a, b in zip(plain_grads, fast_grads):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), (a - b).abs().max()


def batch_norm_calls(model, x) -> int:
    """BatchNorm layers that ran as one (PyTorch's or the closed-form one, whichever is switched on)."""
    from unittest import mock

    from torch.nn.modules import batchnorm

    from bilevel_maml import models

    with mock.patch.object(batchnorm.F, "batch_norm", wraps=batchnorm.F.batch_norm) as plain, \
            mock.patch.object(models, "batch_norm", wraps=models.batch_norm) as closed_form:
        model(x)
    return plain.call_count + closed_form.call_count


def test_pool_before_norm_is_opt_in_and_gives_way_where_it_would_change_what_runs():
    x = torch.randn(7, 1, 16, 16, dtype=torch.float64)
    assert batch_norm_calls(mixed_sign_conv4(True), x) == 0
    assert batch_norm_calls(mixed_sign_conv4(False), x) == 4
    assert batch_norm_calls(Conv4(5, hidden=6, image_size=16).double(), x) == 4  # the default
    # running statistics are updated by BatchNorm itself
    assert batch_norm_calls(mixed_sign_conv4(True, transductive=False), x) == 4
    # a hook on a layer the reordered block skips still runs
    model, seen = mixed_sign_conv4(True), []
    model.features[2][2].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    assert batch_norm_calls(model, x) == 1 and seen == [(7, 6, 4, 4)]
    # the strided network has no pooling to move
    assert batch_norm_calls(mixed_sign_conv4(True, downsample="stride"), x) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_pool_before_norm_is_the_same_function_and_derivatives():
    from bilevel_maml.execution import precision_scope

    x = torch.randn(2, 7, 1, 16, 16, dtype=torch.float64).cuda()
    with precision_scope("fp32", "cuda"):
        plain, plain_grads = values_and_second_order_gradients(mixed_sign_conv4(False).cuda(), x)
        fast, fast_grads = values_and_second_order_gradients(mixed_sign_conv4(True).cuda(), x)
        plain32, _ = values_and_second_order_gradients(mixed_sign_conv4(False).float().cuda(), x.float())
        fast32, _ = values_and_second_order_gradients(mixed_sign_conv4(True).float().cuda(), x.float())
    assert torch.allclose(plain, fast, atol=1e-12, rtol=0)
    for a, b in zip(plain_grads, fast_grads):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), (a - b).abs().max()
    assert torch.allclose(plain32, fast32, atol=1e-5, rtol=1e-5)


# -- grouped convolution derivatives -----------------------------------------------------------------
CONV_SETTINGS = [(1, 1, 1), (2, 1, 2), (1, 2, 2)]  # stride, dilation, groups


@pytest.mark.parametrize("stride, dilation, groups", CONV_SETTINGS)
def test_grouped_conv2d_has_pytorchs_derivatives_to_third_order(stride, dilation, groups):
    """Values, gradients, and the derivatives of a function of the gradients (third order) equal
    F.conv2d's, and all pass finite-difference checks."""
    import torch.nn.functional as F

    from bilevel_maml.grouped_conv import grouped_conv2d

    torch.manual_seed(0)
    x = (0.3 * torch.randn(2, 4, 6, 6, dtype=torch.float64)).requires_grad_()
    w = (0.3 * torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64)).requires_grad_()
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def ours(x, w, b):
        return grouped_conv2d(x, w, b, stride, 1, dilation, groups)

    def theirs(x, w, b):
        return F.conv2d(x, w, b, stride, 1, dilation, groups)

    def of_gradients(conv):
        def f(x, w, b):
            gx, gw, gb = torch.autograd.grad(conv(x, w, b).tanh().sum(), (x, w, b), create_graph=True)
            return gx.pow(2).sum() + gw.pow(2).sum() + gb.pow(2).sum()
        return f

    assert torch.autograd.gradcheck(ours, (x, w, b)) and torch.autograd.gradgradcheck(ours, (x, w, b))
    assert torch.autograd.gradgradcheck(of_gradients(ours), (x, w, b))
    assert torch.allclose(ours(x, w, b), theirs(x, w, b), atol=1e-13, rtol=0)
    for a, c in zip(torch.autograd.grad(of_gradients(ours)(x, w, b), (x, w, b)),
                    torch.autograd.grad(of_gradients(theirs)(x, w, b), (x, w, b))):
        assert torch.allclose(a, c, atol=1e-11, rtol=0), (a - c).abs().max()


@pytest.mark.parametrize("stride, dilation, groups", CONV_SETTINGS[:2])
def test_grouped_conv2d_under_vmap_has_pytorchs_second_order_gradients(stride, dilation, groups):
    """Per-task filters (vmap, autograd outside as the inner loop runs), shared filters, shared inputs
    and torch.func.grad inside vmap: the same results as F.conv2d's batching rules."""
    import torch.nn.functional as F
    from torch.func import grad, vmap

    from bilevel_maml.grouped_conv import grouped_conv2d

    torch.manual_seed(0)
    tasks = 3
    x = torch.randn(tasks, 2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    w = (0.5 * torch.randn(4, 4 // groups, 3, 3, dtype=torch.float64)).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    w_tasks = w.detach().expand(tasks, *w.shape).clone().requires_grad_()

    def second_order(conv):
        def loss(p, xi):
            return conv(conv(xi, p[0], p[1]).tanh(), p[0], None).pow(2).sum()

        return vmapped_meta_gradient(loss, (w.expand(tasks, *w.shape), b.expand(tasks, 4)), x, (w, b, x))

    def shared_filters(conv):
        return torch.autograd.grad(vmap(lambda xi: conv(xi, w, b).pow(2).sum())(x).sum(), (x, w, b))

    def shared_inputs(conv):
        return torch.autograd.grad(vmap(lambda wi: conv(x[0], wi, b).pow(2).sum())(w_tasks).sum(), (x, w_tasks, b))

    def inner_grad(conv):
        return (vmap(grad(lambda wi, xi: conv(xi, wi, None).pow(2).sum()))(w_tasks, x),)

    def ours(x, w, b):
        return grouped_conv2d(x, w, b, stride, 1, dilation, groups)

    def theirs(x, w, b):
        return F.conv2d(x, w, b, stride, 1, dilation, groups)

    for case in (second_order, shared_filters, shared_inputs, inner_grad):
        for a, c in zip(case(ours), case(theirs)):
            assert torch.allclose(a, c, atol=1e-10 * c.abs().max().item(), rtol=0), (case.__name__, (a - c).abs().max())


def test_grouped_conv2d_forward_mode_matches_pytorch():
    """torch.func.jvp of the convolution, of a gradient through it (forward-over-reverse, as Hessian-vector
    products take it) and of per-task gradients under vmap: the same tangents as F.conv2d's."""
    import torch.nn.functional as F
    from torch.func import grad, jvp, vmap

    from bilevel_maml.grouped_conv import grouped_conv2d

    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 7, 7, dtype=torch.float64)
    w, b = 0.5 * torch.randn(4, 4, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    dx, dw, db = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    w_tasks, dw_tasks = w.expand(3, *w.shape).contiguous(), torch.randn(3, *w.shape, dtype=torch.float64)

    def tangents(conv):
        def value(x, w, b):
            return conv(x[0], w, b, 2, 1, 1, 1).tanh().sum()

        def two_layers(xi, w, b):  # the second layer's input gradient is needed too
            return conv(conv(xi, w, b, 1, 1, 1, 1).tanh(), w, None, 1, 1, 1, 1).tanh().pow(2).sum()

        def gradient(w, b):
            return grad(lambda w, b: vmap(lambda xi: two_layers(xi, w, b))(x).sum(), argnums=(0, 1))(w, b)

        def per_task_gradient(ws):
            return grad(lambda ws: vmap(lambda wi, xi: two_layers(xi, wi, None))(ws, x).sum())(ws)

        return (jvp(value, (x, w, b), (dx, dw, db))[1], jvp(lambda b: value(x, w, b), (b,), (db,))[1],
                *jvp(gradient, (w, b), (dw, db))[1], jvp(per_task_gradient, (w_tasks,), (dw_tasks,))[1])

    for a, c in zip(tangents(grouped_conv2d), tangents(F.conv2d)):
        assert torch.allclose(a, c, atol=1e-11 * c.abs().max().item(), rtol=0), (a - c).abs().max()


def meta_gradient_convolutions(tasks: int, grouped: bool) -> int:
    """aten.convolution calls in one second-order meta-gradient of a vectorized conv4 (1 inner step)."""
    from torch.func import functional_call, vmap
    from torch.utils._python_dispatch import TorchDispatchMode

    from bilevel_maml.models import use_grouped_conv_grads

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func.overloadpacket is torch.ops.aten.convolution
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = use_grouped_conv_grads(Conv4(5, hidden=4, image_size=16), grouped)
    base = dict(model.named_parameters())
    x, y = torch.randn(tasks, 5, 1, 16, 16), torch.arange(5).repeat(tasks, 1)

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xi,)), yi)

    with Count():
        params = {n: p.expand(tasks, *p.shape) for n, p in base.items()}
        grads = torch.autograd.grad(vmap(loss)(params, x, y).sum(), list(params.values()), create_graph=True)
        adapted = {n: p - 0.4 * g for (n, p), g in zip(params.items(), grads)}
        torch.autograd.grad(vmap(loss)(adapted, x, y).sum(), list(base.values()))
    return Count.calls


def test_grouped_conv_grads_take_the_same_convolutions_whatever_the_number_of_tasks():
    """The point of grouped_conv2d: PyTorch's double backward of a vmapped (grouped) convolution runs
    one small convolution per task and layer; ours runs the same few grouped ones for any meta-batch."""
    assert meta_gradient_convolutions(4, grouped=True) == meta_gradient_convolutions(8, grouped=True) <= 20
    assert meta_gradient_convolutions(8, grouped=False) - meta_gradient_convolutions(4, grouped=False) >= 3 * 4


def test_grouped_conv_grads_are_opt_in_and_switch_every_convolution():
    from bilevel_maml.models import Conv2d, ResNet12, use_grouped_conv_grads

    assert not any(m.grouped_grads for m in Conv4(5).modules() if isinstance(m, Conv2d))
    assert all(m.grouped_grads for m in Conv4(5, grouped_conv_grads=True).modules() if isinstance(m, Conv2d))
    resnet = use_grouped_conv_grads(ResNet12(5, channels=(4, 4, 4, 4)))
    assert sum(m.grouped_grads for m in resnet.modules() if isinstance(m, Conv2d)) == 16
    assert not any(m.grouped_grads for m in use_grouped_conv_grads(resnet, False).modules() if isinstance(m, Conv2d))


def test_grouped_conv_grads_apply_under_torch_func_only():
    """Task by task, a convolution's double backward has no per-task loop to remove, and the
    grouped Functions' Python would be all they add: PyTorch's convolution runs there."""
    from unittest import mock

    from torch.func import vmap

    from bilevel_maml import models

    layer, x = models.use_grouped_conv_grads(models.Conv2d(1, 4, 3)), torch.randn(5, 1, 8, 8)
    with mock.patch.object(models, "grouped_conv2d", wraps=models.grouped_conv2d) as grouped:
        plain = layer(x)
        assert not grouped.called
        batched = vmap(layer)(x.expand(3, *x.shape))
        assert grouped.called
    assert torch.allclose(plain, batched[0], atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_grouped_conv_grads_give_the_same_second_order_gradients():
    from bilevel_maml.execution import precision_scope
    from bilevel_maml.models import use_grouped_conv_grads

    x = torch.randn(2, 7, 1, 16, 16, dtype=torch.float64).cuda()
    with precision_scope("fp32", "cuda"):
        plain, plain_grads = values_and_second_order_gradients(mixed_sign_conv4(False).cuda(), x)
        fast, fast_grads = values_and_second_order_gradients(use_grouped_conv_grads(mixed_sign_conv4(False)).cuda(), x)
    assert torch.allclose(plain, fast, atol=1e-12, rtol=0)
    for a, b in zip(plain_grads, fast_grads):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), (a - b).abs().max()
