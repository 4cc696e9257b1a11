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
