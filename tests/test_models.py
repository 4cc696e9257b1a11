"""The backbones are the networks of the papers they name."""

import pytest
import torch

from bilevel_maml.data._learn2learn import import_learn2learn
from bilevel_maml.models import Conv4, build_model


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

    from bilevel_maml.models import Conv2d

    x = torch.randn(3, 2, 1, 8, 8)
    for layer, expected in ((Conv2d(1, 4, 3), torch.bfloat16), (torch.nn.Conv2d(1, 4, 3), torch.float32)):
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
