"""EfficientNet-Lite0 (Tan & Le, 2019; the "lite" variant for integer accelerators).

Lite changes against EfficientNet-B0: ReLU6 instead of swish, no squeeze-and-excitation, and
stem and head widths not scaled. BatchNorm eps is 1e-3 as in the TensorFlow original, and
the network expects inputs normalized as ``(pixel - 127) / 128`` on the 0..255 scale.

TensorFlow's "SAME" padding is asymmetric for strided convolutions (the extra row/column goes
to the bottom/right). It is fixed here for a 224x224 input with explicit ``ZeroPad2d`` modules,
so that the network traces with torch.fx and torch.export without shape-dependent code.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

from zsq_plugins.zoo._layers import Normalize

BN_EPS = 1e-3
INPUT_SIZE = 224

# (repeats, kernel, first stride, expansion, input channels, output channels), the B0 table.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _same_padding(kernel: int, stride: int, size: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) along one axis for a known input size."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv_unit(
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int,
    size: int,
    groups: int = 1,
    activation: bool = True,
) -> nn.Sequential:
    """Conv + BN (+ ReLU6) with TF "SAME" padding for an input of ``size`` pixels."""
    before, after = _same_padding(kernel, stride, size)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if before == after:
        padding = before
    else:
        layers["pad"] = nn.ZeroPad2d((before, after, before, after))
        padding = 0
    layers["conv"] = nn.Conv2d(
        in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False
    )
    layers["bn"] = nn.BatchNorm2d(out_channels, eps=BN_EPS)
    if activation:
        layers["act"] = nn.ReLU6()
    return nn.Sequential(layers)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (the lite block)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expansion: int,
        size: int,
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.expand = _conv_unit(in_channels, hidden, 1, 1, size) if expansion != 1 else None
        self.depthwise = _conv_unit(hidden, hidden, kernel, stride, size, groups=hidden)
        self.project = _conv_unit(hidden, out_channels, 1, 1, -(-size // stride), activation=False)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(out))
        return x + out if self.use_residual else out


class EfficientNetLite(nn.Module):
    def __init__(
        self,
        stages: tuple[tuple[int, int, int, int, int, int], ...] = LITE0_STAGES,
        stem_channels: int = 32,
        head_channels: int = 1280,
        num_classes: int = 1000,
        input_size: int = INPUT_SIZE,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.normalize = Normalize((127 / 255,) * 3, (128 / 255,) * 3)
        self.input_shape = (3, input_size, input_size)
        self.stem = _conv_unit(3, stem_channels, 3, 2, input_size)
        size = -(-input_size // 2)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expansion, in_channels, out_channels in stages:
            for index in range(repeats):
                block_stride = stride if index == 0 else 1
                block_in = in_channels if index == 0 else out_channels
                blocks.append(MBConv(block_in, out_channels, kernel, block_stride, expansion, size))
                size = -(-size // block_stride)
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_unit(stages[-1][5], head_channels, 1, 1, size)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(self.normalize(x))))
        return self.fc(self.dropout(self.flatten(self.pool(x))))


_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^_conv_stem\.", "stem.conv."),
    (r"^_bn0\.", "stem.bn."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
    (r"^_conv_head\.", "head.conv."),
    (r"^_bn1\.", "head.bn."),
    (r"^_fc\.", "fc."),
)


def convert_lukemelas_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a lukemelas-style EfficientNet state dict (``_conv_stem``, ``_blocks.N``...)."""
    converted = {}
    for key, value in state.items():
        for pattern, replacement in _KEY_MAP:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                converted[new_key] = value
                break
        else:
            raise KeyError(f"unexpected key {key!r} in an EfficientNet-Lite state dict")
    return converted
