"""ONNX export of low-bit fake quantization as QuantizeLinear/DequantizeLinear + Clip.

ONNX QuantizeLinear holds 8-bit integers. A b-bit quantizer (b < 8) with scale s and zero
point z is exactly an 8-bit quantizer with the same s and z whose result is clipped to
[(qmin - z) s, (qmax - z) s]: rounding is the same, and the 8-bit grid contains the b-bit one.
``ContainerFakeQuantize`` computes it that way, so torch.onnx (TorchScript) exports it as
QuantizeLinear -> DequantizeLinear -> Clip, which onnxruntime runs.

A weight is a constant, so it needs no Clip: ``bake_weight`` writes its fake-quantized values
into the layer and re-quantizes them on the full 8-bit container, which gives the same
integers. Without a Clip between a layer and its weight's DequantizeLinear, onnxruntime fuses
the layer into an int8 kernel (QLinearConv, MatMulInteger) whatever the weight bits.
"""

from __future__ import annotations

import torch
from torch import nn

from zsq_plugins.adapter import QuantizerHandle


class ContainerFakeQuantize(nn.Module):
    """Fake quantization to [qmin, qmax] expressed through an 8-bit container."""

    def __init__(
        self,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        quant_min: int,
        quant_max: int,
        axis: int | None = None,
    ) -> None:
        super().__init__()
        signed = quant_min < 0
        self.container = (-128, 127) if signed else (0, 255)
        if not (self.container[0] <= quant_min < quant_max <= self.container[1]):
            raise ValueError(f"range [{quant_min}, {quant_max}] does not fit 8 bits")
        self.axis = axis
        self.register_buffer("scale", scale.detach().float().flatten().clone())
        self.register_buffer("zero_point", zero_point.detach().flatten().round().int().clone())
        low = (quant_min - self.zero_point.float()) * self.scale
        high = (quant_max - self.zero_point.float()) * self.scale
        self.register_buffer("low", low)
        self.register_buffer("high", high)
        self.full_range = (quant_min, quant_max) == self.container

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.container
        if self.axis is None:
            y = torch.fake_quantize_per_tensor_affine(
                x, float(self.scale[0]), int(self.zero_point[0]), qmin, qmax
            )
            return y if self.full_range else torch.clamp(y, float(self.low[0]), float(self.high[0]))
        y = torch.fake_quantize_per_channel_affine(
            x, self.scale, self.zero_point, self.axis, qmin, qmax
        )
        if self.full_range:
            return y
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return torch.minimum(torch.maximum(y, self.low.view(shape)), self.high.view(shape))


def write_on_grid(weight: torch.Tensor, handle: QuantizerHandle) -> None:
    """Replaces ``weight`` (in place) by what the handle's quantizer makes of it."""
    with torch.no_grad():
        weight.copy_(handle.module(weight))


def bake_weight(weight: torch.Tensor, handle: QuantizerHandle) -> ContainerFakeQuantize:
    """Writes the weight on the handle's grid (``write_on_grid``) and returns the
    full-container quantizer with the handle's scale and zero point, which gives back its
    integers."""
    write_on_grid(weight, handle)
    container = (-128, 127) if handle.quant_min < 0 else (0, 255)
    return ContainerFakeQuantize(handle.scale(), handle.zero_point(), *container, handle.axis)
