"""ResNet-20 (He et al., 2016, the CIFAR variant) for 28x28 grey images."""

from __future__ import annotations

import torch
from torch import nn

from zsq_plugins.zoo._layers import Normalize, conv_bn

FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut; a projection shortcut where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_channels, out_channels, 3, stride)
        self.conv2 = conv_bn(out_channels, out_channels, 3, activation=None)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            # Projection (option B) rather than zero padding: every tensor stays a conv output,
            # which quantizers and BN folding handle uniformly.
            self.shortcut = conv_bn(in_channels, out_channels, 1, stride, activation=None)
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (16, 32, 64),
        blocks_per_stage: int = 3,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        self.input_shape = (in_channels, 28, 28)
        self.stem = conv_bn(in_channels, widths[0], 3)
        stages: list[nn.Module] = []
        channels = widths[0]
        for stage_index, width in enumerate(widths):
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(self.normalize(x)))
        return self.fc(self.flatten(self.pool(x)))
