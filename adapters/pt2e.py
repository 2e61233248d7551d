"""The torchao PT2E adapter (toolkit name ``pt2e``): torch.export + ``prepare_pt2e`` with
torchao's ``X86InductorQuantizer``, the successor of torch.ao's FX quantization.

The BN-folded model is exported (``torch.export``) and annotated by ``X86InductorQuantizer``
with quantization specs built from the QuantSpec: low bits are the specs' ``quant_min`` and
``quant_max`` (4-bit unsigned activations are uint8 on [0, 15]), the 8-bit layers (first conv,
last linear, ``keep_8bit``) get an 8-bit configuration through ``set_module_name_qconfig``, so
the quantizer on a layer's input has the bits of the layer that reads it. The specs'
observers are torchao ``FakeQuantize`` modules (min-max), so the prepared model simulates
WxAy in full: weights per channel, activations per tensor, where the X86 recipe puts them.
Calibration is PT2E's own: observers on, fake quantization off, a pass over the data, then
the reverse. ``convert`` gives PT2E's quantize/dequantize graph (``convert_pt2e``).

Two changes to the prepared graph, neither of which changes what it computes:
- an exported graph has no conv/linear modules (they become ``aten`` ops reading parameters),
  so each layer's container module (which holds its ``weight`` and ``bias`` under the FP
  model's name) becomes an identity ``LayerInput`` called on the layer's input: the adapter
  contract's forward pre-hook on ``model.get_submodule(layer)`` then sees the layer's input,
  and adaptive BN finds the layer's ``bias`` there;
- export hoists every parameter read, and so every weight fake-quantize, to the top of the
  graph; each is moved to just before its layer (after the layer's input), so that a block's
  weight quantizers run inside the block, as in the other toolkits.
``convert`` undoes the first on a copy before ``convert_pt2e``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from zsq_plugins.adapter import QuantizedModel, QuantizerKind
from zsq_plugins.adapters.fake_quantize import FakeQuantizeHandle, calibrate
from zsq_plugins.quant.export import ContainerFakeQuantize, bake_weight
from zsq_plugins.quant.fakequant import integer_range
from zsq_plugins.quant.fold import float_graph
from zsq_plugins.quant.reference import eight_bit_layers, layer_bits, quantizable_layers
from zsq_plugins.spec import Granularity, QuantSpec, Symmetry

LAYER_OPS = {
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.default,
    torch.ops.aten.linear.default,
}


def _pt2e() -> Any:
    """torchao's PT2E parts, imported on first use with their import notices silenced."""
    import logging
    from types import SimpleNamespace

    # torchao reports CUDA kernels it cannot load; torch warns about an Enum torchao registers.
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            from torchao.quantization import pt2e
            from torchao.quantization.pt2e import quantize_pt2e
            from torchao.quantization.pt2e.quantizer import QuantizationSpec
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return SimpleNamespace(
        version=torchao.__version__, pt2e=pt2e, QuantizationSpec=QuantizationSpec,
        QuantizationConfig=x86.QuantizationConfig, X86InductorQuantizer=x86.X86InductorQuantizer,
        prepare_pt2e=quantize_pt2e.prepare_pt2e, convert_pt2e=quantize_pt2e.convert_pt2e,
    )  # fmt: skip


class LayerInput(nn.Module):
    """A layer's container in an exported graph (it holds the layer's ``weight`` and ``bias``
    under the FP model's name), called on the layer's input: the identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _activation_spec(bits: int, symmetric: bool) -> Any:
    ns = _pt2e()
    if symmetric:
        (qmin, qmax), dtype, scheme = (
            integer_range(bits, True),
            torch.int8,
            torch.per_tensor_symmetric,
        )
    else:
        (qmin, qmax), dtype, scheme = (
            integer_range(bits, False),
            torch.uint8,
            torch.per_tensor_affine,
        )
    fake_quant = ns.pt2e.FakeQuantize.with_args(
        observer=ns.pt2e.MinMaxObserver, quant_min=qmin, quant_max=qmax, dtype=dtype,
        qscheme=scheme,
    )  # fmt: skip
    return ns.QuantizationSpec(
        dtype=dtype, quant_min=qmin, quant_max=qmax, qscheme=scheme,
        observer_or_fake_quant_ctr=fake_quant,
    )  # fmt: skip


def _weight_spec(bits: int, spec: QuantSpec) -> Any:
    ns = _pt2e()
    symmetric = spec.weight_symmetry is Symmetry.SYMMETRIC
    qmin, qmax = integer_range(bits, signed=True, narrow=symmetric and spec.weight_narrow_range)
    if spec.weight_granularity is Granularity.PER_CHANNEL:
        scheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        observer, axis = ns.pt2e.PerChannelMinMaxObserver, {"ch_axis": 0}
    else:
        scheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        observer, axis = ns.pt2e.MinMaxObserver, {}
    fake_quant = ns.pt2e.FakeQuantize.with_args(
        observer=observer, quant_min=qmin, quant_max=qmax, dtype=torch.int8, qscheme=scheme,
        **axis,
    )  # fmt: skip
    return ns.QuantizationSpec(
        dtype=torch.int8, quant_min=qmin, quant_max=qmax, qscheme=scheme,
        observer_or_fake_quant_ctr=fake_quant, **axis,
    )  # fmt: skip


def _config(weight_bits: int, act_bits: int, spec: QuantSpec) -> Any:
    act = _activation_spec(act_bits, spec.act_symmetry is Symmetry.SYMMETRIC)
    return _pt2e().QuantizationConfig(act, act, _weight_spec(weight_bits, spec), None, False)


def _check_spec(spec: QuantSpec) -> None:
    if spec.act_granularity is Granularity.PER_CHANNEL:
        raise ValueError(
            "act_granularity='per_channel' is not available in PT2E's X86 recipe (it "
            "quantizes activations per tensor); use 'per_tensor'"
        )


def _is_fake_quant(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op != "call_module":
        return False
    return isinstance(graph_module.get_submodule(node.target), _pt2e().pt2e.FakeQuantizeBase)


def _weight_layer(node: torch.fx.Node) -> str | None:
    """The FP module whose weight a get_attr node reads (``stem.0.weight`` -> ``stem.0``)."""
    if node.op != "get_attr" or not str(node.target).endswith(".weight"):
        return None
    return str(node.target).rpartition(".")[0]


def tap_layers(graph_module: torch.fx.GraphModule) -> list[str]:
    """Calls each layer's container on the layer's input and moves its weight fake-quantize
    next to it (module docstring); returns the layers, in graph order."""
    tapped = []
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target not in LAYER_OPS:
            continue
        source, weight = node.args[0], node.args[1]
        reads = weight.args[0] if _is_fake_quant(graph_module, weight) else weight
        layer = _weight_layer(reads)
        if layer is None:
            continue
        graph_module.get_submodule(layer).__class__ = LayerInput
        with graph_module.graph.inserting_before(node):
            tap = graph_module.graph.call_module(layer, (source,))
        node.replace_input_with(source, tap)
        for moved in (reads, weight) if weight is not reads else (reads,):
            node.prepend(moved)
        tapped.append(layer)
    graph_module.recompile()
    return tapped


def untap_layers(graph_module: torch.fx.GraphModule) -> None:
    """Undoes ``tap_layers``' identity calls (the weight fake-quantizes may stay where they
    are), so that PT2E's passes see the graph they annotated."""
    for node in list(graph_module.graph.nodes):
        if node.op == "call_module" and isinstance(
            graph_module.get_submodule(node.target), LayerInput
        ):
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
            graph_module.get_submodule(node.target).__class__ = nn.Module
    graph_module.recompile()


def _producer_name(
    node: torch.fx.Node, prepared: torch.fx.GraphModule, modules: dict[str, nn.Module]
) -> str:
    """The FP module (or op inside one) whose output ``node`` is: a leaf module's name
    (``stem.2``), ``input`` for the model's input, ``<container>.<op>`` for a function
    called in a container's forward (``stages.0.0.add``), the node's name at top level.
    Fake-quantizes and layer inputs pass their input on (the X86 recipe may quantize a value
    twice: at 4 bits through pooling and flattening, then at 8 for the last linear)."""
    if node.op == "placeholder":
        return "input"
    if node.op == "call_module" and (
        _is_fake_quant(prepared, node)
        or isinstance(prepared.get_submodule(str(node.target)), LayerInput)
    ):
        return _producer_name(node.args[0], prepared, modules)
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), ("", None))[0] if stack else ""
    fp_module = modules.get(path)
    if path and fp_module is not None and next(fp_module.children(), None) is None:
        return path
    op = node.name.rstrip("_0123456789") or node.name
    return f"{path}.{op}" if path else node.name


def collect_handles(
    prepared: torch.fx.GraphModule, fp_model: nn.Module
) -> list[FakeQuantizeHandle]:
    """One handle per fake-quantize module, in graph order (a shared one at its first use)."""
    modules = dict(fp_model.named_modules())
    handles: list[FakeQuantizeHandle] = []
    seen: set[int] = set()
    for node in prepared.graph.nodes:
        if not _is_fake_quant(prepared, node):
            continue
        module = prepared.get_submodule(node.target)
        if id(module) in seen:
            continue
        seen.add(id(module))
        layer = _weight_layer(node.args[0])
        if layer is not None:
            handles.append(FakeQuantizeHandle(layer, QuantizerKind.WEIGHT, module))
        else:
            name = _producer_name(node.args[0], prepared, modules)
            handles.append(FakeQuantizeHandle(name, QuantizerKind.ACTIVATION, module))
    return handles


class PT2EAdapter:
    """torchao PT2E (``torch.export`` + ``prepare_pt2e`` with ``X86InductorQuantizer``)."""

    name = "pt2e"
    requires = ("torchao",)
    pip_extra = "pt2e"
    options = MappingProxyType({
        "module_name_qconfigs": "{module name: torchao QuantizationConfig or None}, given to "
        "X86InductorQuantizer.set_module_name_qconfig after the adapter's own entries (the "
        "spec's 8-bit first and last layers, the overflow fix); None keeps a module float",
        "module_type_qconfigs": "{module class: QuantizationConfig or None}, given to "
        "set_module_type_qconfig; the adapter's name entries for layers of those classes are "
        "left out, so that these win",
    })  # fmt: skip

    def quantize(
        self,
        model: nn.Module,
        spec: QuantSpec,
        calibration: Iterable[torch.Tensor],
        example_input: torch.Tensor,
        options: dict[str, Any] | None = None,
    ) -> QuantizedModel:
        ns = _pt2e()
        _check_spec(spec)
        folded = float_graph(model, spec.fold_batchnorm)
        layers = quantizable_layers(folded)
        eight_bit = eight_bit_layers(layers, spec)
        quantizer = ns.X86InductorQuantizer().set_global(
            _config(spec.weight_bits, spec.act_bits, spec)
        )
        options = options or {}
        their_types = dict(options.get("module_type_qconfigs", {}))
        for name, bits in layer_bits(layers, spec).items():
            # PT2E ranks module names above module types: a layer of a type the user
            # configures keeps no name entry of ours, so that their setting wins.
            theirs = type(folded.get_submodule(name)) in their_types
            if bits != (spec.weight_bits, spec.act_bits) and not theirs:
                quantizer.set_module_name_qconfig(name, _config(*bits, spec))
        for module_type, config in their_types.items():
            quantizer.set_module_type_qconfig(module_type, config)
        for name, config in dict(options.get("module_name_qconfigs", {})).items():
            quantizer.set_module_name_qconfig(name, config)
        try:
            batch = ({0: torch.export.Dim.DYNAMIC},)  # any batch size, 1 included
            exported = torch.export.export(
                folded.eval(), (example_input,), dynamic_shapes=batch
            ).module()
        except Exception as error:  # export's errors are many and deep; say what to do
            raise ValueError(
                f"torch.export could not capture the model for PT2E ({type(error).__name__}: "
                f"{error}). PT2E needs a model that torch.export can capture; the fx, nncf "
                "and brevitas toolkits do not use torch.export."
            ) from error
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            prepared = ns.prepare_pt2e(exported, quantizer)
        ns.pt2e.allow_exported_model_train_eval(prepared)
        prepared.eval()
        tapped = tap_layers(prepared)
        images = calibrate(prepared, calibration, ns.pt2e)  # PT2E's own switches
        handles = collect_handles(prepared, folded)
        return QuantizedModel(
            toolkit=self.name,
            model=prepared,
            spec=spec,
            handles=handles,
            report={
                "eight_bit_layers": sorted(eight_bit),
                "layers": tapped,
                "calibration_images": images,
                "torchao_version": ns.version,
            },
        )

    def convert(self, quantized: QuantizedModel) -> torch.fx.GraphModule:
        """PT2E's ``convert_pt2e``: the quantize/dequantize graph (at any bit width: the q/dq
        ops carry each quantizer's integer range), on a copy."""
        ns = _pt2e()
        prepared = copy.deepcopy(quantized.model)
        for handle in collect_handles(prepared, nn.Module()):
            handle.set_scale(handle.scale())  # makes each observer's range give this step back
        untap_layers(prepared)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return ns.convert_pt2e(prepared, fold_quantize=False)

    def export_onnx(
        self, quantized: QuantizedModel, path: str | Path, example_input: torch.Tensor
    ) -> Path:
        """QDQ ONNX (opset 13) of the fake-quantized graph: weights baked on their grid,
        activation quantizers below 8 bits as QDQ + Clip (quant.export)."""
        path = Path(path)
        exported = copy.deepcopy(quantized.model)
        untap_layers(exported)
        for node in list(exported.graph.nodes):
            if not _is_fake_quant(exported, node):
                continue
            handle = FakeQuantizeHandle(
                "", QuantizerKind.ACTIVATION, exported.get_submodule(node.target)
            )
            replacement: nn.Module = nn.Identity()
            if handle.enabled and _weight_layer(node.args[0]) is not None:
                weight = exported.get_parameter(str(node.args[0].target))
                replacement = bake_weight(weight, handle)
            elif handle.enabled:
                replacement = ContainerFakeQuantize(
                    handle.scale(), handle.zero_point(), handle.quant_min, handle.quant_max,
                    handle.axis,
                )  # fmt: skip
            exported.set_submodule(str(node.target), replacement)
        exported.recompile()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                exported, (example_input,), str(path), dynamo=False, opset_version=13,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )  # fmt: skip
        return path
