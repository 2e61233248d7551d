"""A small reference fake-quantization simulator (no toolkit), for measuring data sources.

BatchNorm folded; weights per-output-channel (or per-tensor) round-to-nearest; the input of
every conv and linear layer quantized per-tensor with a range calibrated on the given images
(min-max, or MSE-optimal clipping); first conv and last linear at 8 bits. Residual additions
and pooling stay in float. The toolkit adapters are the real thing; this simulator exists so
that calibration data can be compared on equal terms without any toolkit installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum

import torch
from torch import nn

from zsq_plugins.quant.fakequant import (
    affine_params,
    fake_quantize,
    integer_range,
    mse_clip_range,
)
from zsq_plugins.quant.fold import float_graph, fold_batchnorm, trace
from zsq_plugins.spec import Granularity, QuantSpec, Symmetry

VALUES_KEPT_PER_BATCH = 16384
"""Activation values sampled per quantizer and batch for the MSE range search."""


class RangeMethod(str, Enum):
    MINMAX = "minmax"
    MSE = "mse"


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv and linear layers in the order the traced graph calls them."""
    graph_module = model if isinstance(model, torch.fx.GraphModule) else trace(model)
    modules = dict(graph_module.named_modules())
    layers = []
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d | nn.Linear):
            layers.append((node.target, modules[node.target]))
    return layers


def eight_bit_layers(layers: list[tuple[str, nn.Module]], spec: QuantSpec) -> set[str]:
    """Names of layers kept at 8 bits: first conv and last linear (if asked), and keep_8bit."""
    names = set(spec.keep_8bit)
    if spec.keep_first_last_8bit and layers:
        names.add(layers[0][0])
        linears = [name for name, module in layers if isinstance(module, nn.Linear)]
        names.add(linears[-1] if linears else layers[-1][0])
    return names


def layer_bits(layers: list[tuple[str, nn.Module]], spec: QuantSpec) -> dict[str, tuple[int, int]]:
    """(weight bits, input bits) of every conv/linear layer: (8, 8) for the 8-bit layers,
    (weight_bits, act_bits) for the others, with ``spec.int8_weight_bits``' overflow fix."""
    eight_bit = eight_bit_layers(layers, spec)
    bits = {}
    for name, _ in layers:
        weight, inputs = (8, 8) if name in eight_bit else (spec.weight_bits, spec.act_bits)
        bits[name] = (spec.int8_weight_bits(weight, inputs), inputs)
    return bits


class InputQuantizer(nn.Module):
    """Per-tensor fake quantizer of a layer's input; records statistics while observing."""

    def __init__(self, bits: int, symmetric: bool) -> None:
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.observing = False
        self.low = self.high = None
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(0)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.qmin, self.qmax = integer_range(bits, signed=symmetric)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        low, high = x.min(), x.max()
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        flat = x.flatten()
        index = torch.randint(0, flat.numel(), (VALUES_KEPT_PER_BATCH,), generator=self.generator)
        self.samples.append(flat[index.to(flat.device)].cpu())

    def set_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        scale, zero_point, self.qmin, self.qmax = affine_params(
            low, high, self.bits, self.symmetric
        )
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def calibrate(self, method: RangeMethod) -> None:
        if self.low is None:
            raise RuntimeError("quantizer saw no data during calibration")
        if method is RangeMethod.MSE:
            self.set_range(*mse_clip_range(torch.cat(self.samples), self.bits, self.symmetric))
        else:
            self.set_range(self.low, self.high)
        self.samples.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax)


def _quantize_weight(module: nn.Module, bits: int, spec: QuantSpec) -> None:
    weight = module.weight.data
    symmetric = spec.weight_symmetry is Symmetry.SYMMETRIC
    narrow = spec.weight_narrow_range
    if spec.weight_granularity is Granularity.PER_CHANNEL:
        flat = weight.flatten(1)
        low, high = flat.min(1).values, flat.max(1).values
        scale, zero_point, qmin, qmax = affine_params(low, high, bits, symmetric, narrow)
        module.weight.data = fake_quantize(weight, scale, zero_point, qmin, qmax, axis=0)
    else:
        low, high = weight.min(), weight.max()
        scale, zero_point, qmin, qmax = affine_params(low, high, bits, symmetric, narrow)
        module.weight.data = fake_quantize(weight, scale, zero_point, qmin, qmax)


def _input_quantizers(model: nn.Module) -> Iterator[InputQuantizer]:
    for module in model.modules():
        if isinstance(module, InputQuantizer):
            yield module


def reference_quantize(
    model: nn.Module,
    spec: QuantSpec,
    calibration: torch.Tensor,
    range_method: RangeMethod | str = RangeMethod.MINMAX,
    batch_size: int = 256,
) -> nn.Module:
    """A fake-quantized copy of ``model`` whose activation ranges come from ``calibration``."""
    range_method = RangeMethod(range_method)
    quantized = float_graph(model, spec.fold_batchnorm)
    layers = quantizable_layers(quantized)
    bits = layer_bits(layers, spec)
    symmetric_acts = spec.act_symmetry is Symmetry.SYMMETRIC
    for name, module in layers:
        quantizer = InputQuantizer(bits[name][1], symmetric_acts)
        module.add_module("input_quantizer", quantizer)
        module.register_forward_pre_hook(lambda mod, args: (mod.input_quantizer(args[0]),))
    for quantizer in _input_quantizers(quantized):
        quantizer.observing = True
    with torch.no_grad():
        for start in range(0, len(calibration), batch_size):
            quantized(calibration[start : start + batch_size])
    for quantizer in _input_quantizers(quantized):
        quantizer.observing = False
        quantizer.calibrate(range_method)
    for name, module in layers:
        _quantize_weight(module, bits[name][0], spec)
    return quantized.eval()


def activation_ranges(
    model: nn.Module, images: torch.Tensor, batch_size: int = 256
) -> dict[str, tuple[float, float]]:
    """Min and max of every conv/linear input of the BN-folded FP model over ``images``."""
    folded = fold_batchnorm(model)
    ranges: dict[str, tuple[float, float]] = {}

    def hook(name: str):
        def record(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            low, high = float(args[0].min()), float(args[0].max())
            old = ranges.get(name, (low, high))
            ranges[name] = (min(old[0], low), max(old[1], high))

        return record

    for name, module in quantizable_layers(folded):
        module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            folded(images[start : start + batch_size])
    return ranges
