"""A PyTorch mirror of a QDQ ONNX model that onnxruntime quantized, and its way back to ONNX.

``onnxruntime.quantization.quantize_static`` decides which tensors are quantized (the
QuantizeLinear/DequantizeLinear pairs it inserts) and calibrates their ranges. The mirror is
that graph, op for op, run in torch: every activation Q/DQ pair becomes a ``FakeQuant``
module (pairs that ORT gives the same scale and zero point share one), every Conv/Gemm a
layer module registered under the FP model's module name, holding the float weight and bias
and its weight ``FakeQuant``. The core's algorithms learn on the mirror through the handles;
``ort_export.to_onnx`` writes what they learned back into the QDQ model.

The mirror keeps the bias float where ORT stores it as int32 (as torch.ao's simulation keeps
it float where its int8 kernels use int32): ORT's bias differs from it by at most half of
an int32 step (input step x weight step), far below one output step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zsq_plugins.adapter import HandleBase, QuantizerKind
from zsq_plugins.adapters.ort_ops import OPS, attributes
from zsq_plugins.errors import UnsupportedModelError

LAYER_OPS = ("Conv", "Gemm", "MatMul")
"""Ops mirrored as layers when their second input is a constant weight (MatMul: torch's Linear
on tokens or channel-last maps, its weight stored transposed, its bias added by an Add)."""


class FakeQuant(nn.Module):
    """Quantize-dequantize with ONNX's arithmetic (``round(x / scale) + zero_point``, ties to
    even, saturated to ``[quant_min, quant_max]``); per channel along ``axis`` when given.
    Gradients pass straight through inside the range (the routine's overrides replace it
    where it learns)."""

    def __init__(
        self,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        quant_min: int,
        quant_max: int,
        axis: int | None,
        container_min: int,
        container_max: int,
    ) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().flatten().clone())
        self.register_buffer("zero_point", torch.round(zero_point.detach().float().flatten()))
        self.register_buffer("enabled", torch.ones((), dtype=torch.bool))
        self.quant_min, self.quant_max, self.axis = int(quant_min), int(quant_max), axis
        self.container_min, self.container_max = int(container_min), int(container_max)
        """The ONNX integer type's range: levels narrower than it need a Clip in ONNX."""

    def params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.axis is None:
            return self.scale[0], self.zero_point[0]
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return self.scale.view(shape), self.zero_point.view(shape)

    def _quantized(
        self, x: torch.Tensor, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x / scale``, its integer levels on the grid, and the scale and zero point as
        broadcast (``scale``: other steps than the quantizer's own)."""
        own_scale, zero_point = self.params(x)
        scale = own_scale if scale is None else scale.reshape(own_scale.shape)
        ratio = x / scale
        levels = torch.clamp(torch.round(ratio) + zero_point, self.quant_min, self.quant_max)
        return ratio, levels, scale, zero_point

    def levels(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x``'s integer levels on this grid (with ``scale`` for its steps)."""
        return self._quantized(x, scale)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.enabled):
            return x
        ratio, levels, scale, zero_point = self._quantized(x)
        value = (levels - zero_point) * scale
        steps = ratio + zero_point
        inside = (steps >= self.quant_min - 0.5) & (steps <= self.quant_max + 0.5)
        return value.detach() + (x - x.detach()) * inside


class MirrorHandle(HandleBase):
    """A mirror FakeQuant seen through the QuantizerHandle protocol."""

    _module: FakeQuant

    @property
    def quant_min(self) -> int:
        return self._module.quant_min

    @property
    def quant_max(self) -> int:
        return self._module.quant_max

    @property
    def bits(self) -> int:
        return round(math.log2(self.quant_max - self.quant_min + 1))

    @property
    def axis(self) -> int | None:
        return self._module.axis

    def scale(self) -> torch.Tensor:
        return self._module.scale.detach().clone()

    def set_scale(self, value: torch.Tensor) -> None:
        current = self._module.scale
        current.copy_(value.detach().to(current).reshape(current.shape))

    def zero_point(self) -> torch.Tensor:
        return self._module.zero_point.detach().clone()

    def set_zero_point(self, value: torch.Tensor) -> None:
        current = self._module.zero_point
        current.copy_(torch.round(value.detach()).to(current).reshape(current.shape))

    @property
    def enabled(self) -> bool:
        return bool(self._module.enabled)

    def set_enabled(self, enabled: bool) -> None:
        self._module.enabled.fill_(bool(enabled))


class MirrorLayer(nn.Module):
    """An ONNX Conv or Gemm (``transB=1``: torch's Linear) with float weight and bias; its
    weight goes through ``weight_quant`` when ORT quantized it."""

    def __init__(
        self,
        name: str,
        op: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        attributes: dict[str, Any],
        inner_padding: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.name, self.op = name, op
        """The FP model's module name of the layer, and its ONNX op type."""
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.weight_quant: FakeQuant | None = None
        self.stride = tuple(attributes.get("strides", [1, 1]))
        self.dilation = tuple(attributes.get("dilations", [1, 1]))
        self.groups = int(attributes.get("group", 1))
        self.padding = inner_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight_quant is None else self.weight_quant(self.weight)
        if self.op in ("Gemm", "MatMul"):
            return F.linear(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _container_range(zero_point: np.ndarray) -> tuple[int, int]:
    info = np.iinfo(zero_point.dtype)
    return int(info.min), int(info.max)


class QDQMirror(nn.Module):
    """The QDQ graph of ``model`` (an ``onnx.ModelProto`` from ``quantize_static``), run in
    torch; ``layer_names`` maps each Conv/Gemm node name to the FP model's module name, and
    ``float_layers`` gives that module (its float weight and bias, and its padding).

    ``weight_quant_for(name, layer)`` and ``activation_quant_for(qdq)`` make the weight and
    activation quantizers (the adapter sets their widths from the QuantSpec).

    ``removed_activations`` maps the output tensor of each Relu/Clip that ORT took out of the
    graph (its quantizer's range clamps in its place) to the activation's (low, high): the
    mirror keeps applying it, so that a quantizer switched off, overridden, or given a wider
    range still sees the FP activation; ``to_onnx`` puts it back where the range no longer
    implies it."""

    def __init__(
        self,
        model: Any,
        layer_names: dict[str, str],
        float_layers: dict[str, nn.Module],
        weight_quant_for: Callable[[str, MirrorLayer], FakeQuant],
        activation_quant_for: Callable[[dict[str, Any]], FakeQuant],
        removed_activations: dict[str, tuple[float | None, float | None]] | None = None,
    ) -> None:
        super().__init__()
        self.qdq_model = model
        """ORT's QDQ model this mirrors: what ``ort_export.to_onnx`` writes the state into."""
        self.removed_activations = dict(removed_activations or {})
        from onnx import numpy_helper

        graph = model.graph
        self.input_name = graph.input[0].name
        self.output_names = [o.name for o in graph.output]
        initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        producers = {out: node for node in graph.node for out in node.output}
        consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        self.ort_constants = nn.Module()
        self._constant_names: dict[str, str] = {}
        self.ort_quantizers = nn.ModuleList()
        self.groups: list[dict[str, Any]] = []
        """Per activation quantizer: its ONNX scale/zero-point names, Q nodes and layer."""
        self.layers_by_node: dict[str, MirrorLayer] = {}
        self.steps: list[tuple[str, Any, list[str], list[str], dict[str, Any]]] = []
        groups: dict[tuple[str, str], int] = {}

        # Constants ORT quantized that are no layer's weight or bias (LayerNorm's parameters,
        # an Add's or Mul's constant input): kept at their dequantized values, ORT's own.
        dequantized = {
            node.output[0]: _dequantize(node, initializers)
            for node in graph.node
            if node.op_type == "DequantizeLinear" and node.input[0] in initializers
        }

        def constant(name: str) -> str:
            if name not in self._constant_names:
                key = f"c{len(self._constant_names)}"
                raw = dequantized[name] if name in dequantized else initializers[name]
                value = torch.from_numpy(np.array(raw))
                self.ort_constants.register_buffer(key, value)
                self._constant_names[name] = key
            return self._constant_names[name]

        for node in graph.node:
            if node.op_type == "DequantizeLinear":
                continue  # weights and biases: read by their layer; activations: by their Q
            if node.op_type == "QuantizeLinear":
                if node.input[0] in initializers:
                    raise UnsupportedModelError(f"a QuantizeLinear of a constant: {node.name}")
                key = (node.input[1], node.input[2])
                dequantizers = list(consumers.get(node.output[0], []))
                if not dequantizers or any(d.op_type != "DequantizeLinear" for d in dequantizers):
                    raise UnsupportedModelError(f"QuantizeLinear {node.name} without its pair")
                if key not in groups:
                    scale = initializers[node.input[1]]
                    zero_point = initializers[node.input[2]]
                    group = {
                        "scale": node.input[1],
                        "zero_point": node.input[2],
                        "nodes": [],
                        "producer": producers.get(node.input[0]),
                        "consumers": [],
                        "outputs": [],
                        "ort_scale": float(np.asarray(scale).reshape(-1)[0]),
                        "ort_zero_point": int(np.asarray(zero_point).reshape(-1)[0]),
                        "container": _container_range(np.asarray(zero_point)),
                    }
                    groups[key] = len(self.groups)
                    self.groups.append(group)
                index = groups[key]
                group = self.groups[index]
                group["nodes"].append(node.name)
                for dequantizer in dequantizers:
                    group["consumers"] += consumers.get(dequantizer.output[0], [])
                    group["outputs"].append(dequantizer.output[0])
                self.steps.append(
                    ("quant", index, [node.input[0]], [d.output[0] for d in dequantizers], {})
                )
                continue
            if node.op_type in LAYER_OPS and _reads_a_weight(node, producers, initializers):
                self.steps.append(self._layer_step(node, producers, initializers, layer_names,
                                                   float_layers, weight_quant_for))  # fmt: skip
                continue
            if node.op_type not in OPS:
                raise UnsupportedModelError(
                    f"the onnxruntime adapter cannot mirror ONNX op {node.op_type} "
                    f"({node.name}); mirrored: {', '.join(sorted([*OPS, *LAYER_OPS]))}"
                )
            inputs = [("const", constant(n)) if n in initializers or n in dequantized
                      else ("env", n) for n in node.input]  # fmt: skip
            self.steps.append(("op", node.op_type, inputs, list(node.output), attributes(node)))
        for group in self.groups:
            self.ort_quantizers.append(activation_quant_for(group))

    def _layer_step(self, node, producers, initializers, layer_names, float_layers, quant_for):
        attrs = attributes(node)
        if node.op_type == "Gemm" and (
            attrs.get("transA", 0) or not attrs.get("transB", 0)
            or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
        ):  # fmt: skip
            raise UnsupportedModelError(f"Gemm {node.name}: only torch's Linear form is mirrored")
        name = layer_names.get(node.name)
        if name is None:
            raise UnsupportedModelError(f"{node.op_type} {node.name} matches no FP layer")
        module = float_layers[name]
        weight_source = producers.get(node.input[1])
        quantized = weight_source is not None and weight_source.op_type == "DequantizeLinear"
        inner = tuple(getattr(module, "padding", (0, 0)))
        if isinstance(getattr(module, "padding", 0), str):
            raise UnsupportedModelError(f"layer {name}: string padding is not mirrored")
        # A MatMul's bias, if any, is the separate Add that follows it in the ONNX graph.
        bias = None if node.op_type == "MatMul" else module.bias
        layer = MirrorLayer(name, node.op_type, module.weight, bias, attrs, inner)
        if quantized:
            layer.weight_quant = quant_for(name, layer)
        outer: list[int] = []
        if node.op_type == "Conv":
            pads = list(attrs.get("pads", [0, 0, 0, 0]))
            top, left, bottom, right = (p - q for p, q in zip(pads, [*inner, *inner], strict=True))
            if min(top, left, bottom, right) < 0:
                raise UnsupportedModelError(f"layer {name}: ONNX pads {pads} below the layer's")
            outer = [left, right, top, bottom]
        _place(self, name, layer)
        self.layers_by_node[node.name] = layer
        return ("layer", layer, [node.input[0]], [node.output[0]], {"pad": outer})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, Any] = {self.input_name: x}
        for kind, what, inputs, outputs, extra in self.steps:
            if kind == "quant":
                y = self.ort_quantizers[what](values[inputs[0]])
                for name in outputs:
                    values[name] = y
            elif kind == "layer":
                value = values[inputs[0]]
                if extra["pad"] and any(extra["pad"]):
                    value = F.pad(value, extra["pad"])
                values[outputs[0]] = self._activation(outputs[0], what(value))
            else:
                args = [
                    None if not name else
                    getattr(self.ort_constants, name) if source == "const" else values[name]
                    for source, name in inputs
                ]  # fmt: skip
                values[outputs[0]] = self._activation(outputs[0], OPS[what](args, extra))
        return values[self.output_names[0]]

    def _activation(self, name: str, value: torch.Tensor) -> torch.Tensor:
        bounds = self.removed_activations.get(name)
        if bounds is None:
            return value
        low, high = bounds
        return torch.clamp(value, low, high)


def _dequantize(node: Any, initializers: dict[str, np.ndarray]) -> np.ndarray:
    """A DequantizeLinear of constant inputs, computed: (q - zero point) x scale."""
    values = initializers[node.input[0]].astype(np.float32)
    scale = initializers[node.input[1]].astype(np.float32)
    zero_point = (
        initializers[node.input[2]].astype(np.float32)
        if len(node.input) > 2 and node.input[2]
        else np.zeros_like(scale)
    )
    if scale.ndim == 1 and scale.size > 1:  # per axis
        axis = attributes(node).get("axis", 1) % values.ndim
        shape = [1] * values.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return ((values - zero_point) * scale).astype(np.float32)


def _reads_a_weight(node: Any, producers: dict[str, Any], initializers: dict[str, Any]) -> bool:
    """Whether a Conv/Gemm/MatMul multiplies by a constant weight (its second input an
    initializer, or ORT's dequantized one): a layer; else an activation product (attention)."""
    source = node.input[1]
    if source in initializers:
        return True
    producer = producers.get(source)
    return (
        producer is not None
        and producer.op_type == "DequantizeLinear"
        and producer.input[0] in initializers
    )


def _place(root: nn.Module, name: str, module: nn.Module) -> None:
    """Registers ``module`` at the dotted ``name`` under ``root``, making empty containers for
    its parents, so that ``root.get_submodule(name)`` finds it as in the FP model."""
    *parents, leaf = name.split(".")
    owner = root
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    owner.add_module(leaf, module)


def weight_handles(mirror: QDQMirror) -> list[MirrorHandle]:
    return [
        MirrorHandle(layer.name, QuantizerKind.WEIGHT, layer.weight_quant)
        for kind, layer, *_ in mirror.steps
        if kind == "layer" and layer.weight_quant is not None
    ]


def activation_handles(mirror: QDQMirror, names: list[str]) -> list[MirrorHandle]:
    """One handle per activation quantizer, ``names[i]`` its layer name."""
    return [
        MirrorHandle(name, QuantizerKind.ACTIVATION, quantizer)
        for name, quantizer in zip(names, mirror.ort_quantizers, strict=True)
    ]
