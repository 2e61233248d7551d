"""The Brevitas adapter (toolkit name ``brevitas``).

The model's BatchNorm is folded first (our ``fold_batchnorm``, on a copy: Brevitas' own
``preprocess_for_quantize`` folds into the caller's weights), then Brevitas'
``layerwise_quantize`` swaps every Conv2d/Linear for a QuantConv2d/QuantLinear that quantizes
its weight (as the spec says; by default per output channel and symmetric, on the full signed
grid, e.g. [-8, 7] at 4 bits, or Brevitas' own narrow one if the spec sets
``weight_narrow_range``) and its input (per tensor). Module names stay those of
the FP model. Calibration is Brevitas' own: ``calibration_mode`` over the batches (Brevitas'
default statistics: abs-max weights, 99.999th-percentile activations, averaged over batches).

Layout decisions:
- one activation quantizer per tensor: layers that read the same tensor (a residual block's
  first conv and its projection shortcut) share one input-quant proxy, so a handle is named
  after the tensor's producer, like the other adapters' handles;
- bit widths follow the consumer: 8 bits for the inputs of 8-bit layers, else ``act_bits``;
- an input known to be non-negative (a ReLU/ReLU6/Sigmoid/Hardsigmoid output, possibly
  through pooling, flattening or additions of such tensors) gets an unsigned quantizer with
  zero point 0, as Brevitas' graph quantization does; other inputs get a signed symmetric
  quantizer or, for asymmetric activations, Brevitas' shifted unsigned one (zero point);
- scales are stored parameters (``parameter_from_stats``), so a handle can write them;
- bias stays float: an int32 bias quantizer depends on the input and weight scales, has no
  handle, and would make the model with every quantizer off differ from the FP32 one;
- no bias correction: ``bias_correction_mode`` rewrites the biases, so the model with every
  quantizer switched off would no longer be the BN-folded FP32 model.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import torch
from torch import nn

from zsq_plugins.adapter import HandleBase, QuantizedModel, QuantizerKind
from zsq_plugins.errors import ToolkitOptionError, UnsupportedModelError
from zsq_plugins.quant.fold import float_graph
from zsq_plugins.quant.reference import eight_bit_layers, quantizable_layers
from zsq_plugins.spec import Granularity, QuantSpec, Symmetry

NONNEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)
"""Modules whose output Brevitas quantizes unsigned (its graph mode's UNSIGNED_ACT_TUPLE)."""
NONNEGATIVE_FUNCTIONS = (
    torch.relu, torch.sigmoid, nn.functional.relu, nn.functional.relu6,
    nn.functional.sigmoid, nn.functional.hardsigmoid,
)  # fmt: skip
SIGN_KEEPING_MODULES = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
    nn.Identity, nn.Dropout,
)  # fmt: skip
SIGN_KEEPING_FUNCTIONS = (
    torch.flatten, nn.functional.max_pool2d, nn.functional.avg_pool2d,
    nn.functional.adaptive_avg_pool2d, nn.functional.adaptive_max_pool2d, nn.functional.dropout,
)  # fmt: skip
SIGN_KEEPING_METHODS = ("flatten", "view", "reshape", "mean", "contiguous", "squeeze", "unsqueeze")
SUMS = (operator.add, torch.add, torch.cat)
"""Non-negative when every tensor operand is (a concatenation's operands come as a list)."""


def _brevitas() -> SimpleNamespace:
    """The parts of Brevitas used here, imported on demand with their import notices silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import brevitas.nn as qnn
        from brevitas.core.zero_point import ParameterFromStatsFromParameterZeroPoint
        from brevitas.export import export_onnx_qcdq
        from brevitas.graph.calibrate import calibration_mode
        from brevitas.graph.quantize import layerwise_quantize
        from brevitas.quant import scaled_int, shifted_scaled_int
    return SimpleNamespace(
        qnn=qnn, scaled_int=scaled_int, shifted=shifted_scaled_int,
        ParameterZeroPoint=ParameterFromStatsFromParameterZeroPoint,
        calibration_mode=calibration_mode, layerwise_quantize=layerwise_quantize,
        export_onnx_qcdq=export_onnx_qcdq,
    )  # fmt: skip


class BrevitasQuantizerHandle(HandleBase):
    """A Brevitas quant proxy seen through the QuantizerHandle protocol.

    Brevitas stores a threshold ``value`` (the float range) and derives the step size as
    ``value / int_threshold(bit_width)``; a zero point is stored in float units as well and
    becomes ``round(|value| / scale) + min_int``. Reading goes through Brevitas' own modules
    (so any clamping is Brevitas'); writing inverts those two formulas, which hold for the
    floating-point (unrestricted) scales this adapter configures.
    """

    def __init__(self, layer: str, kind: QuantizerKind, proxy: nn.Module, axis: int | None) -> None:
        super().__init__(layer, kind, proxy)
        self._proxy, self._axis = proxy, axis

    @property
    def _tensor_quant(self) -> nn.Module:
        # Looked up on every use: Brevitas builds a new tensor_quant when a state dict is
        # loaded (REINIT_ON_STATE_DICT_LOAD), and a handle must follow it.
        if self.kind is QuantizerKind.WEIGHT:
            return self._proxy.tensor_quant
        return self._proxy.fused_activation_quant_proxy.tensor_quant

    @property
    def axis(self) -> int | None:
        return self._axis

    def _bit_width(self) -> torch.Tensor:
        return self._tensor_quant.msb_clamp_bit_width_impl()

    @property
    def bits(self) -> int:
        return int(self._bit_width())

    @property
    def quant_min(self) -> int:
        return int(self._tensor_quant.int_quant.min_int(self._bit_width()))

    @property
    def quant_max(self) -> int:
        return int(self._tensor_quant.int_quant.max_int(self._bit_width()))

    def _scale_parameter(self) -> nn.Parameter:
        return self._tensor_quant.scaling_impl.value

    def _zero_point_parameter(self) -> nn.Parameter | None:
        return getattr(self._tensor_quant.zero_point_impl, "value", None)

    def _current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Brevitas' step size and integer zero point, computed by its own modules."""
        tensor_quant, value = self._tensor_quant, self._scale_parameter()
        with torch.no_grad():
            bit_width = self._bit_width()
            scale = tensor_quant.scaling_impl(value, tensor_quant.int_scaling_impl(bit_width))
            zero_point = tensor_quant.zero_point_impl(value, scale, bit_width)
        return scale.detach(), torch.broadcast_to(zero_point.detach(), scale.shape)

    def scale(self) -> torch.Tensor:
        return self._current()[0].flatten().clone()

    def set_scale(self, value: torch.Tensor) -> None:
        zero_point = self.zero_point()  # the integer zero point survives a new step size
        parameter = self._scale_parameter()
        threshold = self._tensor_quant.int_scaling_impl(self._bit_width())
        with torch.no_grad():
            parameter.copy_((value.detach().to(parameter) * threshold).reshape(parameter.shape))
        if self._zero_point_parameter() is not None:
            self.set_zero_point(zero_point)

    def zero_point(self) -> torch.Tensor:
        return self._current()[1].flatten().clone()

    def set_zero_point(self, value: torch.Tensor) -> None:
        parameter = self._zero_point_parameter()
        value = torch.round(value.detach().float()).clamp(self.quant_min, self.quant_max)
        if parameter is None:
            if bool((value != 0).any()):
                raise ValueError(
                    f"the {self.kind.value} quantizer of {self.layer!r} is symmetric or "
                    "unsigned with zero point 0; it has no zero point to set"
                )
            return
        scale = self._current()[0]
        with torch.no_grad():
            stored = (value.to(parameter).reshape(scale.shape) - self.quant_min) * scale
            parameter.copy_(stored.reshape(parameter.shape))

    @property
    def enabled(self) -> bool:
        return not self._proxy.disable_quant

    def set_enabled(self, enabled: bool) -> None:
        # The per-proxy switch that Brevitas' own quantization_status_manager toggles.
        self._proxy.disable_quant = not enabled

    def override(
        self, function: Callable[..., torch.Tensor], *, with_output: bool = False
    ) -> torch.utils.hooks.RemovableHandle:
        # Brevitas' tensor_quant returns (value, scale, zero_point, bit_width) and runs only
        # while the proxy is enabled; the value is replaced, the metadata kept.
        def replace(_: nn.Module, args: tuple, output: tuple) -> tuple:
            value = function(args[0], output[0]) if with_output else function(args[0])
            return (value, *output[1:])

        return self._tensor_quant.register_forward_hook(replace)


def _is_nonnegative(node: Any, modules: dict[str, nn.Module], memo: dict[Any, bool]) -> bool:
    """Whether the graph guarantees that ``node``'s value is >= 0 (conservatively)."""
    if isinstance(node, int | float):
        return node >= 0
    if isinstance(node, list | tuple):
        return all(_is_nonnegative(item, modules, memo) for item in node)
    if not isinstance(node, torch.fx.Node):
        return False
    if node not in memo:
        memo[node] = _node_is_nonnegative(node, modules, memo)
    return memo[node]


def _node_is_nonnegative(
    node: torch.fx.Node, modules: dict[str, nn.Module], memo: dict[Any, bool]
) -> bool:
    first = node.args[0] if node.args else None
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, NONNEGATIVE_MODULES):
            return True
        return isinstance(module, SIGN_KEEPING_MODULES) and _is_nonnegative(first, modules, memo)
    if node.op == "call_function":
        if node.target in NONNEGATIVE_FUNCTIONS:
            return True
        if node.target in SUMS:
            operands = first if node.target is torch.cat else node.args
            return _is_nonnegative(list(operands), modules, memo)
        return node.target in SIGN_KEEPING_FUNCTIONS and _is_nonnegative(first, modules, memo)
    if node.op == "call_method":
        if node.target == "add":
            return _is_nonnegative(list(node.args), modules, memo)
        return node.target in SIGN_KEEPING_METHODS and _is_nonnegative(first, modules, memo)
    return False


def _producer(node: torch.fx.Node) -> str:
    """The FP model's name for the tensor ``node`` (a module's name, or "input")."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "placeholder":
        return "input"
    return node.name


def _layer_inputs(graph_module: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Each conv/linear layer's input node."""
    modules = dict(graph_module.named_modules())
    inputs: dict[str, torch.fx.Node] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d | nn.Linear):
            source = node.args[0] if node.args else None
            if not isinstance(source, torch.fx.Node):
                raise UnsupportedModelError(f"layer {node.target!r} has no tensor input")
            if inputs.setdefault(str(node.target), source) is not source:
                raise UnsupportedModelError(
                    f"layer {node.target!r} is called on several inputs; Brevitas gives a "
                    "layer one input quantizer"
                )
    return inputs


def _check_spec(spec: QuantSpec) -> None:
    if spec.act_granularity is not Granularity.PER_TENSOR:
        raise ValueError("the brevitas adapter quantizes activations per tensor only")


def _weight_quant(spec: QuantSpec, ns: SimpleNamespace) -> tuple[type, dict[str, Any]]:
    """Brevitas' weight quantizer for the spec, with a stored (writable) scale."""
    per_channel = spec.weight_granularity is Granularity.PER_CHANNEL
    extra: dict[str, Any] = {"weight_scaling_impl_type": "parameter_from_stats"}
    if spec.weight_symmetry is Symmetry.SYMMETRIC:
        quant = ns.scaled_int.Int8WeightPerChannelFloat if per_channel else (
            ns.scaled_int.Int8WeightPerTensorFloat)  # fmt: skip
        # Brevitas' Int8Weight* quantizers are narrow unless told otherwise.
        extra["weight_narrow_range"] = spec.weight_narrow_range
        return quant, extra
    quant = ns.shifted.ShiftedUint8WeightPerChannelFloat if per_channel else (
        ns.shifted.ShiftedUint8WeightPerTensorFloat)  # fmt: skip
    # The default zero point is recomputed from the weight on each call; this one is stored.
    extra["weight_zero_point_impl"] = ns.ParameterZeroPoint
    return quant, extra


def _input_quant(nonnegative: bool, spec: QuantSpec, ns: SimpleNamespace) -> type:
    if nonnegative:
        return ns.scaled_int.Uint8ActPerTensorFloat
    if spec.act_symmetry is Symmetry.SYMMETRIC:
        return ns.scaled_int.Int8ActPerTensorFloat
    return ns.shifted.ShiftedUint8ActPerTensorFloat


OPTIONS = MappingProxyType({
    "name_blacklist": "module names that layerwise_quantize leaves float (default none)",
    "bias_quant": "a Brevitas bias quantizer for every layer, e.g. brevitas.quant.Int32Bias "
    "(default None: float biases, which adaptive BN writes)",
})  # fmt: skip
"""What ``quantize(..., options=...)`` takes: ``layerwise_quantize``'s own arguments."""


def build(
    folded: torch.fx.GraphModule, spec: QuantSpec, options: dict[str, Any] | None = None
) -> tuple[torch.fx.GraphModule, list[BrevitasQuantizerHandle], set[str]]:
    """Brevitas' layerwise quantization of ``folded`` (in place) and the handles it yields."""
    _check_spec(spec)
    ns = _brevitas()
    options = options or {}
    modules = dict(folded.named_modules())
    float_layers = _blacklist(options.get("name_blacklist", ()), modules)
    layers = quantizable_layers(folded)
    # Layers inside a module torch.fx keeps whole (nn.TransformerEncoder, nn.MultiheadAttention,
    # whose functional forward reads out_proj's weight without calling it) are not in the
    # graph: they stay float, as in fx and PT2E, rather than quantized where nothing reads it.
    called = {name for name, _ in layers}
    float_layers |= {
        name
        for name, module in modules.items()
        if isinstance(module, nn.Conv2d | nn.Linear) and name not in called
    }
    eight_bit = eight_bit_layers(layers, spec)
    inputs = _layer_inputs(folded)
    consumers: dict[torch.fx.Node, list[str]] = {}
    for name, source in inputs.items():
        if name not in float_layers:
            consumers.setdefault(source, []).append(name)
    input_bits, input_quant, memo = {}, {}, {}
    for source, names in consumers.items():
        bits = 8 if any(name in eight_bit for name in names) else spec.act_bits
        quant = _input_quant(_is_nonnegative(source, modules, memo), spec, ns)
        for name in names:
            input_bits[name], input_quant[name] = bits, quant
    weight_quant, weight_extra = _weight_quant(spec, ns)
    kwargs = {
        "weight_quant": weight_quant,
        "weight_bit_width": lambda module, name: spec.int8_weight_bits(
            8 if name in eight_bit else spec.weight_bits, input_bits[name]
        ),
        "input_quant": lambda module, name: input_quant[name],
        "input_bit_width": lambda module, name: input_bits[name],
        "bias_quant": options.get("bias_quant"),
        "return_quant_tensor": False,
        **weight_extra,
    }
    layer_map = {
        nn.Conv2d: (ns.qnn.QuantConv2d, kwargs),
        nn.Linear: (ns.qnn.QuantLinear, kwargs),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        quantized = ns.layerwise_quantize(
            folded, compute_layer_map=layer_map, name_blacklist=sorted(float_layers) or None
        )
    handles: list[BrevitasQuantizerHandle] = []
    weight_axis = 0 if spec.weight_granularity is Granularity.PER_CHANNEL else None
    for name, _ in layers:
        layer = quantized.get_submodule(name)
        if name in float_layers:
            continue
        if not isinstance(layer, ns.qnn.QuantConv2d | ns.qnn.QuantLinear):
            raise UnsupportedModelError(
                f"{name!r} ({type(layer).__name__}) was not converted by Brevitas; only "
                "nn.Conv2d and nn.Linear themselves are supported, not subclasses"
            )
        handles.append(
            BrevitasQuantizerHandle(name, QuantizerKind.WEIGHT, layer.weight_quant, weight_axis)
        )
    for source, names in consumers.items():
        # One quantizer per tensor: the later readers share the first reader's proxy.
        shared = quantized.get_submodule(names[0]).input_quant
        for name in names[1:]:
            reader = quantized.get_submodule(name)
            reader.input_quant = shared
            shared.add_tracked_module(reader)
        handles.append(
            BrevitasQuantizerHandle(_producer(source), QuantizerKind.ACTIVATION, shared, None)
        )
    return quantized, handles, eight_bit


def _blacklist(names: Any, modules: dict[str, nn.Module]) -> set[str]:
    """The ``name_blacklist`` option as a set of the model's module names."""
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise ToolkitOptionError(f"name_blacklist must be a list of module names, got {names!r}")
    unknown = sorted(set(names) - set(modules))
    if unknown:
        raise ToolkitOptionError(f"name_blacklist names no module {unknown} of the model")
    return set(names)


def calibrate(model: nn.Module, calibration: Iterable[Any]) -> int:
    """Brevitas' calibration: ``calibration_mode`` over the batches; returns images seen."""
    ns = _brevitas()
    seen = 0
    with torch.no_grad(), ns.calibration_mode(model):
        for batch in calibration:
            images = batch[0] if isinstance(batch, tuple | list) else batch
            model(images)
            seen += len(images)
    if seen == 0:
        raise ValueError("the calibration data yielded no batch")
    return seen


class BrevitasAdapter:
    """Brevitas (``layerwise_quantize`` + ``calibration_mode``, QCDQ ONNX export)."""

    name = "brevitas"
    requires = ("brevitas",)
    pip_extra = "brevitas"
    options = OPTIONS

    def quantize(
        self,
        model: nn.Module,
        spec: QuantSpec,
        calibration: Iterable[torch.Tensor],
        example_input: torch.Tensor,
        options: dict[str, Any] | None = None,
    ) -> QuantizedModel:
        # Both paths copy: the user's model is never modified.
        folded = float_graph(model, spec.fold_batchnorm)
        device = next((p.device for p in folded.parameters()), torch.device("cpu"))
        quantized, handles, eight_bit = build(folded.eval(), spec, options)
        # Brevitas creates the input quantizers' parameters on the default device (CPU); keep
        # them with the model's weights.
        quantized.to(device).eval()
        seen = calibrate(quantized, calibration)
        # Brevitas initializes each weight scale from the weight on the first quantized call;
        # one pass stores them all before any handle reads or writes one.
        with torch.no_grad():
            quantized(example_input)
        return QuantizedModel(
            toolkit=self.name,
            model=quantized,
            spec=spec,
            handles=list(handles),
            report={
                "eight_bit_layers": sorted(eight_bit),
                "calibration_images": seen,
                "bias_correction": False,
            },
        )

    def export_onnx(
        self, quantized: QuantizedModel, path: str | Path, example_input: torch.Tensor
    ) -> Path:
        """Brevitas' QCDQ ONNX (TorchScript exporter); quantizers below 8 bits are clipped."""
        ns = _brevitas()
        path = Path(path)
        # The export switches the model into export mode and back; work on a copy anyway, so
        # that a failed export cannot leave the caller's model half-switched.
        exported = copy.deepcopy(quantized.model).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ns.export_onnx_qcdq(
                exported, args=example_input, export_path=str(path), dynamo=False,
                input_names=["input"], output_names=["logits"], keep_initializers_as_inputs=False,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )  # fmt: skip
        return path
