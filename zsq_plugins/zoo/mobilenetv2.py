"""MobileNetV2 (Sandler et al., 2018) scaled down for 28x28 grey images.

Inverted residuals with depthwise 3x3 convolutions, BatchNorm and ReLU6, as in the paper;
the stem keeps stride 1 and the stage table is shortened because the input is 28 pixels wide.
"""

from __future__ import annotations

import torch
from torch import nn

from zsq_plugins.zoo._layers import Normalize, conv_bn
from zsq_plugins.zoo.resnet import FASHION_MNIST_MEAN, FASHION_MNIST_STD

# (expansion t, output channels c, repeats n, first stride s), the paper's table notation.
FMNIST_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 3, 1),
)


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn(in_channels, hidden, 1, activation=nn.ReLU6))
        layers.append(conv_bn(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6))
        layers.append(conv_bn(hidden, out_channels, 1, activation=None))
        self.layers = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        stem_channels: int = 16,
        last_channels: int = 256,
        stages: tuple[tuple[int, int, int, int], ...] = FMNIST_STAGES,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        self.input_shape = (in_channels, 28, 28)
        self.stem = conv_bn(in_channels, stem_channels, 3, activation=nn.ReLU6)
        blocks: list[nn.Module] = []
        channels = stem_channels
        for expansion, out_channels, repeats, first_stride in stages:
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                blocks.append(InvertedResidual(channels, out_channels, stride, expansion))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(channels, last_channels, 1, activation=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(self.normalize(x))))
        return self.fc(self.dropout(self.flatten(self.pool(x))))
