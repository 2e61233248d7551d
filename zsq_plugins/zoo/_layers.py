"""Building blocks shared by the zoo's architectures.

Every zoo model sets ``self.input_shape`` = (C, H, W) so that generators can infer it.
"""

from __future__ import annotations

from torch import nn

from zsq_plugins.layers import Normalize

__all__ = ["Normalize", "conv_bn"]


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    activation: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + optional activation, the unit BN folding works on."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)
