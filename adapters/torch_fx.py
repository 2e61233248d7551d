"""The torch.ao FX adapter (toolkit name ``fx``).

The model's BatchNorm is folded first, then ``prepare_qat_fx`` inserts FakeQuantize modules
for weights (per channel) and activations (per tensor), so that a WxAy model is simulated in
full; ``.eval()`` keeps it a deterministic fake-quantized model. Calibration is torch.ao's own:
observers on, fake quantization off, a loop over the DataLoader, then the reverse.

Two graph fixes after ``prepare_qat_fx`` (each measured to cost accuracy when left out):
- bit widths follow the consumer: an activation quantizer feeding an 8-bit layer (the first
  conv, the last linear) or the model's output is 8-bit, every other one has ``act_bits``
  (FX sizes it by the producer's qconfig and shares it through pooling and flattening);
- a fake-quant between a layer and the ReLU/ReLU6/Hardtanh that consumes it is dropped when
  the activation's output is fake-quantized too (FX does not fuse conv-ReLU6 and would
  otherwise quantize the pre-activation, negatives included, on the same grid).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from zsq_plugins.adapter import QuantizedModel, QuantizerKind
from zsq_plugins.adapters.fake_quantize import FakeQuantizeHandle, calibrate
from zsq_plugins.layers import Normalize
from zsq_plugins.quant.export import ContainerFakeQuantize, bake_weight, write_on_grid
from zsq_plugins.quant.fakequant import integer_range
from zsq_plugins.quant.fold import float_graph
from zsq_plugins.quant.reference import eight_bit_layers, layer_bits, quantizable_layers
from zsq_plugins.spec import OVERFLOW_SAFE_WEIGHT_BITS, Granularity, QuantSpec, Symmetry

CLAMP_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
CLAMP_FUNCTIONS = (torch.relu, nn.functional.relu, nn.functional.relu6, nn.functional.hardtanh)


def _ao():
    """torch.ao.quantization, imported with its deprecation warning silenced on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch.ao.quantization as ao
        import torch.ao.quantization.quantize_fx as quantize_fx
    return ao, quantize_fx


def activation_fake_quant(bits: int, symmetric: bool):
    ao, _ = _ao()
    if symmetric:
        (qmin, qmax), dtype = integer_range(bits, signed=True), torch.qint8
        scheme = torch.per_tensor_symmetric
    else:
        (qmin, qmax), dtype = integer_range(bits, signed=False), torch.quint8
        scheme = torch.per_tensor_affine
    return ao.FakeQuantize.with_args(
        observer=ao.MinMaxObserver, quant_min=qmin, quant_max=qmax, dtype=dtype, qscheme=scheme
    )


def weight_fake_quant(bits: int, spec: QuantSpec):
    ao, _ = _ao()
    symmetric = spec.weight_symmetry is Symmetry.SYMMETRIC
    per_channel = spec.weight_granularity is Granularity.PER_CHANNEL
    # torch.ao takes any integer range; its symmetric observers scale to (qmax - qmin) / 2.
    qmin, qmax = integer_range(bits, signed=True, narrow=symmetric and spec.weight_narrow_range)
    if per_channel:
        scheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        return ao.FakeQuantize.with_args(
            observer=ao.PerChannelMinMaxObserver,
            quant_min=qmin,
            quant_max=qmax,
            dtype=torch.qint8,
            qscheme=scheme,
            ch_axis=0,
        )
    scheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    return ao.FakeQuantize.with_args(
        observer=ao.MinMaxObserver,
        quant_min=qmin,
        quant_max=qmax,
        dtype=torch.qint8,
        qscheme=scheme,
    )


def _qconfig(weight_bits: int, act_bits: int, spec: QuantSpec):
    ao, _ = _ao()
    return ao.QConfig(
        activation=activation_fake_quant(act_bits, spec.act_symmetry is Symmetry.SYMMETRIC),
        weight=weight_fake_quant(weight_bits, spec),
    )


def _is_fake_quant(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    ao, _ = _ao()
    if node.op != "call_module":
        return False
    return isinstance(graph_module.get_submodule(node.target), ao.FakeQuantizeBase)


def _is_clamp_activation(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(node.target), CLAMP_ACTIVATIONS)
    return node.op == "call_function" and node.target in CLAMP_FUNCTIONS


def drop_pre_activation_quantizers(graph_module: torch.fx.GraphModule) -> int:
    """Removes fake-quants whose only user is a clamp activation that is fake-quantized."""
    dropped = 0
    for node in list(graph_module.graph.nodes):
        if not _is_fake_quant(graph_module, node) or len(node.users) != 1:
            continue
        (activation,) = node.users
        if not _is_clamp_activation(graph_module, activation):
            continue
        if all(_is_fake_quant(graph_module, user) for user in activation.users):
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
            dropped += 1
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return dropped


def set_activation_bits(
    graph_module: torch.fx.GraphModule, eight_bit: set[str], spec: QuantSpec
) -> None:
    """Gives each activation fake-quant the bit width of its consumers (8 for 8-bit layers and
    the output, else act_bits); a quantizer shared under several names is split."""
    symmetric = spec.act_symmetry is Symmetry.SYMMETRIC
    for node in graph_module.graph.nodes:
        if not _is_fake_quant(graph_module, node):
            continue
        feeds_8bit = any(
            user.op == "output" or (user.op == "call_module" and user.target in eight_bit)
            for user in node.users
        )
        bits = 8 if feeds_8bit else spec.act_bits
        current = graph_module.get_submodule(node.target)
        if round(math.log2(current.quant_max - current.quant_min + 1)) != bits:
            setattr(graph_module, node.target, activation_fake_quant(bits, symmetric)())


def merge_qconfig_mappings(ours: Any, theirs: Any, modules: dict[str, nn.Module]) -> None:
    """Writes the entries of the QConfigMapping ``theirs`` into ``ours``, so that they win:
    torch.ao gives module names priority over regexes and object types, so each of our
    module-name entries that one of their regexes or object types covers is dropped first."""
    for name in list(ours.module_name_qconfigs):
        covered = type(modules.get(name)) in theirs.object_type_qconfigs or any(
            re.match(pattern, name) for pattern in theirs.module_name_regex_qconfigs
        )
        if covered:
            del ours.module_name_qconfigs[name]
    if theirs.global_qconfig is not None:
        ours.set_global(theirs.global_qconfig)
    for object_type, qconfig in theirs.object_type_qconfigs.items():
        ours.set_object_type(object_type, qconfig)
    for pattern, qconfig in theirs.module_name_regex_qconfigs.items():
        ours.set_module_name_regex(pattern, qconfig)
    for name, qconfig in theirs.module_name_qconfigs.items():
        ours.set_module_name(name, qconfig)
    for key, qconfig in theirs.module_name_object_type_order_qconfigs.items():
        ours.set_module_name_object_type_order(*key, qconfig)


def _producer(node: torch.fx.Node) -> str:
    source = node.args[0]
    if not isinstance(source, torch.fx.Node):
        return node.name
    if source.op == "call_module":
        return str(source.target)
    if source.op == "placeholder":
        return "input"
    return source.name


class TorchFXAdapter:
    """torch.ao.quantization FX graph mode (``prepare_qat_fx`` / ``convert_fx``)."""

    name = "fx"
    requires = ("torch.ao.quantization",)
    pip_extra = None
    missing_hint = (
        f"torch {torch.__version__} no longer ships torch.ao's FX quantization (deprecated "
        "upstream in favour of torchao PT2E; its removal is tracked in pytorch/ao#2259). Use "
        "toolkit='pt2e', its successor, or a torch that still ships it (docs/index.md lists "
        "the versions tested)"
    )
    options = MappingProxyType({
        "qconfig_mapping": "a torch.ao QConfigMapping (or its to_dict() form) merged over the "
        "adapter's, which sets the spec's global qconfig and one per layer whose bits differ "
        "(8-bit first and last layers, the overflow fix): its global qconfig (if set), object "
        "types, regexes and module names win (a None qconfig keeps a module float); "
        "activation widths still follow their consumers",
        "prepare_custom_config": "a torch.ao PrepareCustomConfig for prepare_qat_fx; the "
        "adapter adds input normalization to its non-traceable module classes",
        "backend_config": "a torch.ao BackendConfig for prepare_qat_fx (default torch's)",
    })  # fmt: skip

    def quantize(
        self,
        model: nn.Module,
        spec: QuantSpec,
        calibration: Iterable[torch.Tensor],
        example_input: torch.Tensor,
        options: dict[str, Any] | None = None,
    ) -> QuantizedModel:
        ao, quantize_fx = _ao()
        from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

        options = options or {}
        prepared_input = float_graph(model, spec.fold_batchnorm)
        layers = quantizable_layers(prepared_input)
        eight_bit = eight_bit_layers(layers, spec)
        mapping = ao.QConfigMapping().set_global(_qconfig(spec.weight_bits, spec.act_bits, spec))
        for name, bits in layer_bits(layers, spec).items():
            if bits != (spec.weight_bits, spec.act_bits):
                mapping.set_module_name(name, _qconfig(*bits, spec))
        if "qconfig_mapping" in options:
            theirs = options["qconfig_mapping"]
            if isinstance(theirs, dict):
                theirs = ao.QConfigMapping.from_dict(theirs)
            merge_qconfig_mappings(mapping, theirs, dict(prepared_input.named_modules()))
        custom = copy.deepcopy(options.get("prepare_custom_config") or PrepareCustomConfig())
        # Input normalization stays one module, so its output quantizer is named after it.
        classes = list(custom.non_traceable_module_classes)
        custom.set_non_traceable_module_classes([*classes, Normalize])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            prepared = quantize_fx.prepare_qat_fx(
                prepared_input.train(),
                mapping,
                example_inputs=(example_input,),
                prepare_custom_config=custom,
                backend_config=options.get("backend_config"),
            )
        prepared.eval()
        dropped = drop_pre_activation_quantizers(prepared)
        set_activation_bits(prepared, eight_bit, spec)
        calibrate(prepared, calibration, _ao()[0])
        handles = collect_handles(prepared)
        return QuantizedModel(
            toolkit=self.name,
            model=prepared,
            spec=spec,
            handles=handles,
            report={
                "dropped_pre_activation_quantizers": dropped,
                "eight_bit_layers": sorted(eight_bit),
            },
        )

    def convert(self, quantized: QuantizedModel) -> nn.Module:
        """torch.ao's ``convert_fx``: real int8 kernels when every quantizer is 8-bit (weights
        may have the overflow fix's 7 bits: the int8 kernels hold them exactly)."""
        _, quantize_fx = _ao()
        if any(handle.bits < minimum_int8_bits(handle) for handle in quantized.handles):
            raise ValueError(
                "convert_fx produces int8 kernels; this model has quantizers below 8 bits. "
                "Keep the fake-quantized model (quantized.model) for simulation."
            )
        prepared = copy.deepcopy(quantized.model)
        # convert_fx quantizes each weight again and clamps it to its dtype, not to its
        # quantizer's range: a 7-bit weight at +63.5 steps would become 64, not 63. Weights
        # already on their grid come back as exactly their integers.
        for handle in collect_handles(prepared):
            if handle.kind is QuantizerKind.WEIGHT and handle.enabled:
                write_on_grid(prepared.get_submodule(handle.layer).weight, handle)
        with warnings.catch_warnings():
            # torch 2.13 deprecates torch.ao and its quantized tensors; converting is the point.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
            return quantize_fx.convert_fx(prepared)

    def export_onnx(
        self, quantized: QuantizedModel, path: str | Path, example_input: torch.Tensor
    ) -> Path:
        """QDQ ONNX (opset 13): weights baked on their grid, activation quantizers below 8 bits
        as QDQ + Clip (quant.export)."""
        path = Path(path)
        exported = copy.deepcopy(quantized.model)
        for handle in collect_handles(exported):
            if not handle.enabled:
                replacement: nn.Module = nn.Identity()
            elif handle.kind is QuantizerKind.WEIGHT:
                replacement = bake_weight(exported.get_submodule(handle.layer).weight, handle)
            else:
                replacement = ContainerFakeQuantize(
                    handle.scale(),
                    handle.zero_point(),
                    handle.quant_min,
                    handle.quant_max,
                    handle.axis,
                )
            _replace_module(exported, handle.module, replacement)
        exported.recompile()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                exported,
                (example_input,),
                str(path),
                dynamo=False,
                opset_version=13,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        return path


def minimum_int8_bits(handle: FakeQuantizeHandle) -> int:
    """The fewest bits a quantizer may have for ``convert_fx``'s int8 kernels to compute what
    it simulates: torch clamps weights to their observer's range, activations to 8 bits."""
    return OVERFLOW_SAFE_WEIGHT_BITS if handle.kind is QuantizerKind.WEIGHT else 8


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Puts ``new`` wherever ``old`` is registered (shared modules have several names)."""
    for name, module in list(root.named_modules(remove_duplicate=False)):
        if module is old:
            parent_name, _, attribute = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, attribute, new)


def collect_handles(prepared: torch.fx.GraphModule) -> list[FakeQuantizeHandle]:
    handles: list[FakeQuantizeHandle] = []
    seen: set[int] = set()
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        module = prepared.get_submodule(node.target)
        weight_quant = getattr(module, "weight_fake_quant", None)
        if weight_quant is not None and id(weight_quant) not in seen:
            seen.add(id(weight_quant))
            handles.append(FakeQuantizeHandle(node.target, QuantizerKind.WEIGHT, weight_quant))
        elif _is_fake_quant(prepared, node) and id(module) not in seen:
            seen.add(id(module))
            handles.append(FakeQuantizeHandle(_producer(node), QuantizerKind.ACTIVATION, module))
    return handles
