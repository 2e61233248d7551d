"""The NNCF adapter (toolkit name ``nncf``), on NNCF's PyTorch backend.

BatchNorm is folded first (NNCF does not fold it). NNCF's torch backend takes eager modules
(a ``torch.fx.GraphModule`` goes to its FX backend, whose q/dq are int8 whatever the bits),
so the folded convolutions go back into a copy of the user's model whose BatchNorms become
``nn.Identity``: ``fold_batchnorm(model)``'s computation under the FP model's module names.
``nncf.quantize`` inserts quantizers as hooks (weights: pre-hooks on the weight port;
activations: post-hooks) and calibrates them over ``nncf.Dataset``: global min-max ranges,
bias correction off.

Bit widths: NNCF's hardware configurations refuse most widths below 8, so every quantizer is
made at 8 bits, then given its width through ``num_bits``, which re-derives the integer levels
and keeps the calibrated range (a min-max grid at the new width). Weights get ``weight_bits``
except the 8-bit layers (first conv, last linear, ``keep_8bit``); an activation quantizer gets
8 bits if it feeds such a layer, ``act_bits`` otherwise. NNCF keeps symmetric weights on a
narrow grid ([-127, 127] at 8 bits, [-7, 7] at 4), as OpenVINO runs them; unless the spec asks
for that (``weight_narrow_range``), the adapter gives them the full grid, as the other toolkits
have it. Handles report the grid.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsq_plugins.adapter import HandleBase, QuantizedModel, QuantizerKind
from zsq_plugins.adapters.nncf_options import OPTIONS, load_nncf, nncf_arguments
from zsq_plugins.errors import UnsupportedModelError
from zsq_plugins.quant.export import ContainerFakeQuantize, bake_weight
from zsq_plugins.quant.fold import fold_batchnorm, trace
from zsq_plugins.quant.reference import eight_bit_layers, quantizable_layers
from zsq_plugins.spec import Granularity, QuantSpec, Symmetry


def _images(batch: Any) -> torch.Tensor:
    """The input of a calibration batch, which may be an (input, target) pair."""
    return batch[0] if isinstance(batch, tuple | list) else batch


class NNCFQuantizerHandle(HandleBase):
    """An NNCF ``SymmetricQuantizer`` / ``AsymmetricQuantizer`` through the QuantizerHandle
    protocol (scale = step size, integer zero point).

    NNCF stores a range, not a step. Symmetric: ``scale`` is the top of the range, so step =
    scale / level_high and the zero point is 0. Asymmetric: ``input_low`` and ``input_range``,
    which NNCF's ``TuneRange`` widens on every call so that 0 falls on the grid. Read here as
    NNCF's kernel computes them: step = tuned range / (levels - 1), zero point = round(-tuned
    low / step). Written as low = -zero_point * step, range = (levels - 1) * step, a fixed point
    of ``TuneRange``, so the grid is exactly the one written.
    """

    def __init__(
        self,
        layer: str,
        kind: QuantizerKind,
        module: nn.Module,
        hook: str,
        feeds: frozenset[str] = frozenset(),
    ) -> None:
        if module.is_using_log_scale_storage:
            raise ValueError(f"{hook}: quantizers with log-scale storage are not supported")
        super().__init__(layer, kind, module)
        self.hook = hook
        self.symmetric = not hasattr(module, "input_low")
        # The conv/linear layers an activation quantizer's output reaches without being
        # quantized again (through pooling, flatten): empty for one that only guards an
        # addition or the like, which is what a placement ablation switches off.
        self.feeds = feeds

    @property
    def bits(self) -> int:
        return int(self._module.num_bits)

    @property
    def quant_min(self) -> int:
        return int(self._module.level_low)

    @property
    def quant_max(self) -> int:
        return int(self._module.level_high)

    @property
    def axis(self) -> int | None:
        if not self._module.per_channel:
            return None
        return next((i for i, size in enumerate(self._module.scale_shape) if size > 1), 0)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, width) as NNCF's kernel quantizes with them, eps and tuning included."""
        module = self._module
        with torch.no_grad():
            if self.symmetric:
                top = module.scale.abs() + module.eps
                low = top * (module.level_low / module.level_high)
                return low, top - low
            low, high = module.get_input_low_input_high()
            return low, high - low

    def scale(self) -> torch.Tensor:
        _, width = self._range()
        return (width / (self.quant_max - self.quant_min)).flatten().clone()

    def zero_point(self) -> torch.Tensor:
        if self.symmetric:  # NNCF's signed and unsigned symmetric grids both hold 0 at 0
            return torch.zeros(self._module.scale.numel(), dtype=torch.int32)
        low, width = self._range()
        steps_per_unit = (self.quant_max - self.quant_min) / width  # the kernel's order
        return torch.round(-low * steps_per_unit).flatten().int()

    def _write(self, step: torch.Tensor, zero_point: torch.Tensor) -> None:
        module = self._module
        step = step.detach().float().reshape(module.scale_shape)
        if bool((step <= 0).any()):
            raise ValueError(f"{self.layer}: scales must be positive (NNCF uses |scale|)")
        with torch.no_grad():  # in place: the Parameters (and optimizers holding them) stay
            if self.symmetric:
                module.scale.data.copy_(step * module.level_high)
                return
            zero_point = zero_point.float().reshape(module.scale_shape).to(step.device)
            module.input_low.data.copy_(-zero_point * step)
            module.input_range.data.copy_((self.quant_max - self.quant_min) * step)

    def set_scale(self, value: torch.Tensor) -> None:
        self._write(value, self.zero_point())

    def set_zero_point(self, value: torch.Tensor) -> None:
        value = torch.round(value.detach().float()).flatten()
        if self.symmetric:
            if bool((value != 0).any()):
                raise ValueError(f"{self.layer}: a symmetric NNCF quantizer's zero point is 0")
            return
        if bool(((value < self.quant_min) | (value > self.quant_max)).any()):
            # TuneRange clamps the range to contain 0: such a zero point cannot be held.
            raise ValueError(
                f"{self.layer}: NNCF keeps 0 inside the range; the zero point must lie in "
                f"[{self.quant_min}, {self.quant_max}]"
            )
        self._write(self.scale(), value.expand(self._module.input_low.numel()))

    @property
    def enabled(self) -> bool:
        return bool(self._module.is_enabled_quantization())

    def set_enabled(self, enabled: bool) -> None:
        # NNCF's switch is the ``enabled`` buffer; its enable/disable_quantization() also
        # flip requires_grad of the scales, which would change what the core optimizes.
        self._module.enabled.fill_(int(enabled))


def folded_eager(model: nn.Module, folded: torch.fx.GraphModule) -> nn.Module:
    """A copy of ``model`` computing what ``folded`` (its BN-folded trace) computes, with its
    own ``forward`` and module names: folded convs replace their namesakes, and the
    BatchNorms that folding removed become ``nn.Identity``."""
    eager = copy.deepcopy(model).eval()
    kept = dict(folded.named_modules())
    for name, module in list(eager.named_modules())[1:]:  # the root itself stays
        if isinstance(module, nn.BatchNorm2d) and name not in kept:
            replacement: nn.Module = nn.Identity()
        elif isinstance(module, nn.Conv2d) and name in kept:
            replacement = copy.deepcopy(kept[name])
        else:
            continue
        parent_name, _, attribute = name.rpartition(".")
        setattr(eager.get_submodule(parent_name) if parent_name else eager, attribute, replacement)
    return eager


def _forward_without_hooks(self: nn.Sequential, input: Any) -> Any:
    """nn.Sequential's forward, skipping NNCF's hook storage: NNCF adds the storage as a child
    of the model it quantizes, and a top-level nn.Sequential would call it as a layer (NNCF
    3.4 fails on any top-level nn.Sequential)."""
    from nncf.torch.function_hook.wrapper import ATR_HOOK_STORAGE

    for name, module in self._modules.items():
        if name != ATR_HOOK_STORAGE and module is not None:
            input = module(input)
    return input


class HookSafeSequential(nn.Sequential):
    """nn.Sequential that NNCF can hook (see ``_forward_without_hooks``)."""

    forward = _forward_without_hooks


def hook_safe(model: nn.Module) -> nn.Module:
    """``model`` itself, given a hook-safe class if it runs nn.Sequential's forward; module
    names and isinstance checks stay as they were."""
    cls = type(model)
    if not isinstance(model, nn.Sequential) or cls.forward is not nn.Sequential.forward:
        return model
    if cls is nn.Sequential:
        model.__class__ = HookSafeSequential
    else:
        namespace = {"forward": _forward_without_hooks, "__module__": cls.__module__}
        model.__class__ = type(cls.__name__, (cls,), namespace)
    return model


def _advanced_parameters(spec: QuantSpec) -> Any:
    nncf = load_nncf()
    from nncf.common.quantization.structs import QuantizationScheme
    from nncf.quantization.advanced_parameters import QuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if spec.act_granularity is Granularity.PER_CHANNEL:
        raise ValueError(
            "act_granularity='per_channel' is not available in NNCF (its hardware "
            "configurations quantize activations per tensor); use 'per_tensor'"
        )

    def scheme(symmetry: Symmetry) -> Any:
        symmetric = symmetry is Symmetry.SYMMETRIC
        return QuantizationScheme.SYMMETRIC if symmetric else QuantizationScheme.ASYMMETRIC

    return nncf.AdvancedQuantizationParameters(
        # Bias correction moves biases, so switching the quantizers off would no longer give
        # the FP32 model back; the core's reconstruction does that job on the handles.
        disable_bias_correction=True,
        # The overflow fix halves the first layer's weight grid for old x86 int8 kernels;
        # the spec asks for a full 8-bit first layer.
        overflow_fix=nncf.OverflowFix.DISABLE,
        # One statistic per calibration batch, so that subset_size counts batches.
        batchwise_statistics=False,
        weights_quantization_params=QuantizationParameters(
            mode=scheme(spec.weight_symmetry),
            per_channel=spec.weight_granularity is Granularity.PER_CHANNEL,
        ),
        activations_quantization_params=QuantizationParameters(
            mode=scheme(spec.act_symmetry), per_channel=False
        ),
        # Global min and max over the data, as torch.ao's MinMaxObserver (NNCF's default for
        # activations averages the per-batch extremes).
        activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
        weights_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
    )


def _calibration_dataset(calibration: Iterable[Any]) -> tuple[Any, int]:
    """nncf.Dataset over the batches, and their count. NNCF reads the data twice (a batch to
    trace the graph, then the statistics), so a one-shot iterator is materialized."""
    source: Iterable[Any] = calibration
    if not isinstance(calibration, Sized) or isinstance(calibration, Iterator):
        source = list(calibration)
    count = len(source)  # type: ignore[arg-type]
    if count == 0:
        raise ValueError("the calibration data yielded no batch")
    return load_nncf().Dataset(source, _images), count


class _Topology:
    """NNCF's graph of the FP model, read in the FP model's module names."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, hooks: list) -> None:
        from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph

        self.modules = dict(model.named_modules())
        self.graph = build_nncf_graph(model, example_input)
        self.post = {op for kind, op, _ in hooks if kind == "post_hooks"}
        self.pre = {(op, port) for kind, op, port in hooks if kind == "pre_hooks"}

    def weight_layer(self, op_name: str, port: int) -> str | None:
        """The module whose weight enters ``port`` of ``op_name``; None for an activation,
        including either input of a product of two activations (attention's q k^T), which
        NNCF's metatype lists as weight ports."""
        from nncf.torch.model_graph_manager import (
            find_const_node_in_constant_subgraph,
            split_const_name,
        )

        node = self.graph.get_node_by_name(op_name)
        if port not in getattr(node.metatype, "weight_port_ids", []):
            return None
        for edge in self.graph.get_input_edges(node):
            if edge.input_port_id == port:
                const = find_const_node_in_constant_subgraph(edge.from_node, self.graph)
                return None if const is None else split_const_name(const.layer_attributes.name)[0]
        return None

    def output_name(self, op_name: str) -> str:
        """The FP module whose output ``op_name`` produces ("input": the model's input). A
        leaf module's op is named after the module (``stem.2``, ``normalize``); a functional
        op in a container's forward after both (``add``, ``layer1.0.add``, ``add_1`` for
        a second call)."""
        if self.graph.get_node_by_name(op_name).node_type == "nncf_model_input":
            return "input"
        scope, function, call = op_name.rsplit("/", 2)
        module_name = scope.replace("/", ".")
        module = self.modules.get(module_name)
        if module_name and module is not None and next(module.children(), None) is None:
            return module_name
        name = f"{module_name}.{function}" if module_name else function
        return name if call == "0" else f"{name}_{call}"

    def input_name(self, op_name: str, port: int) -> str:
        """The producer of what enters ``port`` of ``op_name``."""
        for edge in self.graph.get_input_edges(self.graph.get_node_by_name(op_name)):
            if edge.input_port_id == port:
                return self.output_name(edge.from_node.node_name)
        return op_name

    def consumers(self, op_name: str, port: int | None) -> set[str]:
        """Conv/linear layers fed by the quantizer on ``op_name``'s output (port None) or on
        its input ``port``, through ops that pass values on unquantized (pooling, flatten)."""
        node = self.graph.get_node_by_name(op_name)
        frontier = [(node, port)] if port is not None else self._users(node)
        layers: set[str] = set()
        seen: set[str] = set()
        while frontier:
            target, target_port = frontier.pop()
            layer = self._layer_fed(target, target_port)
            if layer is not None:
                layers.add(layer)
            elif target.node_name not in self.post and target.node_name not in seen:
                seen.add(target.node_name)
                frontier.extend(self._users(target))
        return layers

    def _users(self, node: Any) -> list[tuple[Any, int]]:
        """(op, port) pairs that read ``node``'s output, less those re-quantized on entry."""
        edges = self.graph.get_output_edges(node)
        return [
            (edge.to_node, edge.input_port_id)
            for edge in edges
            if (edge.to_node.node_name, edge.input_port_id) not in self.pre
        ]

    def _layer_fed(self, node: Any, port: int) -> str | None:
        """The layer of ``node`` if it is a weighted op and ``port`` one of its inputs."""
        for weight_port in getattr(node.metatype, "weight_port_ids", []):
            layer = self.weight_layer(node.node_name, weight_port)
            if weight_port != port and layer is not None:
                return layer
        return None


def _named_quantizers(model: nn.Module) -> list[tuple[str, tuple[str, str, int], nn.Module]]:
    """(hook name, (hook type, op name, port), quantizer) for every place of a quantizer; one
    that NNCF shares between places (unified scales) is listed at each."""
    from nncf.torch.function_hook.hook_storage import decode_hook_name
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import BaseQuantizer

    return [
        (name, decode_hook_name(name), module)
        for name, module in get_hook_storage(model).named_hooks(remove_duplicate=False)
        if isinstance(module, BaseQuantizer)
    ]


def collect_handles(
    quantized: nn.Module, topology: _Topology, eight_bit: set[str], spec: QuantSpec
) -> list[NNCFQuantizerHandle]:
    """One handle per quantizer, given its bit width (module docstring); a shared quantizer
    is named after its first place and is 8-bit if any of its places needs 8 bits."""
    found: dict[int, tuple[str, QuantizerKind, nn.Module, str, int, frozenset[str]]] = {}
    for hook, (hook_type, op_name, port), module in _named_quantizers(quantized):
        weight_of = topology.weight_layer(op_name, port) if hook_type == "pre_hooks" else None
        feeds: set[str] = set()
        if weight_of is not None:
            kind, layer = QuantizerKind.WEIGHT, weight_of
            bits = 8 if layer in eight_bit else spec.weight_bits
        else:
            kind = QuantizerKind.ACTIVATION
            if hook_type == "pre_hooks":
                layer = topology.input_name(op_name, port)
                feeds = topology.consumers(op_name, port)
            else:
                layer, feeds = topology.output_name(op_name), topology.consumers(op_name, None)
            bits = 8 if feeds & eight_bit else spec.act_bits
        if id(module) in found:
            layer, kind, _, hook, first_bits, first_feeds = found[id(module)]
            bits = max(bits, first_bits)
            feeds |= first_feeds
        found[id(module)] = (layer, kind, module, hook, bits, frozenset(feeds))
    input_bits: dict[str, int] = {}
    for _, kind, _, _, bits, feeds in found.values():
        for fed in feeds if kind is QuantizerKind.ACTIVATION else ():
            input_bits[fed] = max(bits, input_bits.get(fed, 0))
    narrow = spec.weight_narrow_range and spec.weight_symmetry is Symmetry.SYMMETRIC
    handles = []
    for layer, kind, module, hook, bits, feeds in found.values():
        if kind is QuantizerKind.WEIGHT:  # an unquantized input counts as 8-bit: unknown
            bits = spec.int8_weight_bits(bits, input_bits.get(layer, 8))
        if kind is QuantizerKind.WEIGHT and module.narrow_range != narrow:
            # Like the bit width, the grid is set after nncf.quantize: NNCF's hardware
            # configuration refuses weights off the narrow grid. The flag is read by set_levels
            # (which the num_bits setter calls), and NNCF's ONNX export reads it too.
            module._narrow_range = narrow
            module.set_levels()
        if module.num_bits != bits:
            module.num_bits = bits  # the setter re-derives level_low and level_high
        handles.append(NNCFQuantizerHandle(layer, kind, module, hook, feeds))
    return handles


class NNCFAdapter:
    """NNCF post-training quantization (``nncf.quantize``, PyTorch backend)."""

    name = "nncf"
    requires = ("nncf",)
    pip_extra = "nncf"
    options = OPTIONS

    def quantize(
        self,
        model: nn.Module,
        spec: QuantSpec,
        calibration: Iterable[torch.Tensor],
        example_input: torch.Tensor,
        options: dict[str, Any] | None = None,
    ) -> QuantizedModel:
        nncf = load_nncf()
        refuse_unsupported(model)
        advanced = _advanced_parameters(spec)
        if spec.fold_batchnorm:
            folded = fold_batchnorm(model)
            fp_model = hook_safe(folded_eager(model, folded))
        else:
            folded = trace(copy.deepcopy(model))
            fp_model = hook_safe(copy.deepcopy(model).eval())
        eight_bit = eight_bit_layers(quantizable_layers(folded), spec)
        dataset, batches = _calibration_dataset(calibration)
        # The preset naming the spec's activation mode (the advanced parameters set both).
        mixed = spec.act_symmetry is Symmetry.ASYMMETRIC
        preset = nncf.QuantizationPreset.MIXED if mixed else nncf.QuantizationPreset.PERFORMANCE
        defaults = {"preset": preset, "subset_size": batches, "advanced_parameters": advanced}
        arguments = nncf_arguments(defaults, options or {})
        arguments["ignored_scope"] = with_norms_ignored(arguments.get("ignored_scope"), folded)
        quantized = nncf.quantize(fp_model, dataset, **arguments)
        hooks = [point for _, point, _ in _named_quantizers(quantized)]
        topology = _Topology(fp_model, example_input, hooks)
        handles = collect_handles(quantized, topology, eight_bit, spec)
        return QuantizedModel(
            toolkit=self.name,
            model=quantized.eval(),
            spec=spec,
            handles=handles,
            report={
                "eight_bit_layers": sorted(eight_bit),
                "calibration_batches": batches,
                "nncf_version": nncf.__version__,
            },
        )

    def export_onnx(
        self, quantized: QuantizedModel, path: str | Path, example_input: torch.Tensor
    ) -> Path:
        """QDQ ONNX (opset 13): ``nncf.strip`` turns 8-bit quantizers into torch FakeQuantize;
        weights below 8 bits are baked on their grid and activation quantizers below 8 bits
        become QDQ + Clip first (quant.export), which ONNX can hold."""
        nncf = load_nncf()
        from nncf.torch.function_hook.wrapper import get_hook_storage

        path = Path(path)
        exported = copy.deepcopy(quantized.model)
        storage = get_hook_storage(exported)
        weight_layers = {handle.hook: handle.layer for handle in quantized.weight_handles()}
        for hook, _, module in _named_quantizers(exported):
            handle = NNCFQuantizerHandle(hook, QuantizerKind.ACTIVATION, module, hook)
            if not handle.enabled:
                storage.set_submodule(hook, nn.Identity())
            elif handle.bits < 8 and hook in weight_layers:
                weight = exported.get_submodule(weight_layers[hook]).weight
                storage.set_submodule(hook, bake_weight(weight, handle))
            elif handle.bits < 8:
                fake_quant = ContainerFakeQuantize(
                    handle.scale(), handle.zero_point(), handle.quant_min, handle.quant_max,
                    handle.axis,
                )  # fmt: skip
                storage.set_submodule(hook, fake_quant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stripped = nncf.strip(
                exported, do_copy=False, strip_format=nncf.StripFormat.NATIVE,
                example_input=example_input,
            )  # fmt: skip
            torch.onnx.export(
                stripped.eval(), (example_input,), str(path), dynamo=False, opset_version=13,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )  # fmt: skip
        return path


NORM_TYPES = {nn.LayerNorm: "layer_norm", nn.GroupNorm: "group_norm"}
"""Normalization layers NNCF is told to leave alone (by its op type). NNCF 3.4 gives their
1-D weight a per-channel quantizer and fills it with a per-tensor statistic, which fails
inside NNCF (``RuntimeError: shape '[C]' is invalid for input of size 1``,
min_max/torch_backend.py); torch.ao and PT2E leave layer norms float too."""


def with_norms_ignored(scope: Any, folded: nn.Module) -> Any:
    """``scope`` (the user's nncf.IgnoredScope, or None) with the op types of the model's
    LayerNorm/GroupNorm layers added (NORM_TYPES)."""
    nncf = load_nncf()
    present = sorted({name for kind, name in NORM_TYPES.items()
                      if any(isinstance(m, kind) for m in folded.modules())})  # fmt: skip
    if not present:
        return scope
    if scope is None:
        return nncf.IgnoredScope(types=present, validate=False)
    return nncf.IgnoredScope(
        names=list(scope.names),
        patterns=list(scope.patterns),
        types=sorted({*scope.types, *present}),
        subgraphs=list(scope.subgraphs),
        validate=False,
    )


def refuse_unsupported(model: nn.Module) -> None:
    """Fails before any work on constructs NNCF 3.4's torch backend cannot quantize."""
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if attention:
        raise UnsupportedModelError(
            f"NNCF {load_nncf().__version__} cannot quantize nn.MultiheadAttention "
            f"({attention[0]}{' and others' if len(attention) > 1 else ''}): its torch backend "
            "finds no constant weight for the attention's functional projections "
            "(InternalError: Could not find a constant node in the model graph). Quantize "
            "this model with fx, pt2e or brevitas, or write the attention with nn.Linear "
            "projections."
        )
