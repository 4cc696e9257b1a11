"""Backbones used in the MAML literature.

Normalisation is transductive by default (``track_running_stats=False``): batch statistics are used
in training and evaluation alike, as in the MAML reference code, and the forward pass mutates no
buffers, so it is a pure function of the parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_block(in_channels: int, out_channels: int, transductive: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=not transductive),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    """Four 3×3 conv–BN–ReLU–max-pool blocks and a linear classifier (Vinyals et al.; Finn et al.).

    ``Conv4(ways, in_channels=1, hidden=64, image_size=28)`` is the Omniglot network;
    ``Conv4(ways, in_channels=3, hidden=32, image_size=84)`` the mini-ImageNet one.
    """

    def __init__(self, ways: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28,
                 transductive: bool = True):
        super().__init__()
        channels = [in_channels, hidden, hidden, hidden, hidden]
        self.features = nn.Sequential(
            *(_conv_block(a, b, transductive) for a, b in zip(channels, channels[1:]))
        )
        side = image_size
        for _ in range(4):
            side //= 2
        self.classifier = nn.Linear(hidden * side * side, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    """Fully connected ReLU network; ``MLP(1, 1, (40, 40))`` is the MAML sinusoid regressor."""

    def __init__(self, in_features: int = 1, out_features: int = 1, hidden: Sequence[int] = (40, 40)):
        super().__init__()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
