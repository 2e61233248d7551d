"""A VGG-style network (Simonyan & Zisserman, 2015) with no normalization layer at all.

The model for generators that cannot read BatchNorm statistics (weight statistics, adversarial).
"""

from __future__ import annotations

import torch
from torch import nn

from zsq_plugins.zoo._layers import Normalize
from zsq_plugins.zoo.resnet import FASHION_MNIST_MEAN, FASHION_MNIST_STD


def _conv_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU())


class VGGNoBN(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (32, 64, 128),
        hidden: int = 256,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        self.input_shape = (in_channels, 28, 28)
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [_conv_relu(channels, width), _conv_relu(width, width), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        spatial = 28 // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Linear(channels * spatial * spatial, hidden),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(hidden, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                # Without normalization layers the signal scale rests on the initialization.
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(self.normalize(x))))
