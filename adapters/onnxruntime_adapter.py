"""The ONNX Runtime adapter (toolkit name ``onnxruntime``).

ONNX Runtime quantizes an ONNX model, not a torch one: the BN-folded FP model is exported to
ONNX (opset 17), pre-processed as ORT recommends (``quant_pre_process``: shape inference and
constant folding, which folds explicit padding into the convolutions), and quantized by
``onnxruntime.quantization.quantize_static`` in QDQ format, per-channel weights, calibrated
with one of ORT's own methods (MinMax by default) fed by a CalibrationDataReader over our
data (zsq_plugins.onnx_calibration).

The core's algorithms need a torch model with quantizer handles; ORT has none. The adapter
gives them a mirror (ort_mirror.py): ORT's QDQ graph run op for op in torch, with ORT's
quantizers as FakeQuant modules. The spec's widths are set on the mirror (ORT's types are 8-
and 4-bit; any width up to 8 is held in an 8-bit ONNX type: weights as their integers,
activations with a Clip to their levels), activation ranges start from ORT's calibration,
weight steps from each channel's range. ``deploy`` (called by ``apply``) writes the mirror's
state back into the QDQ model and returns an ``OnnxRuntimeModel``: an InferenceSession in an
nn.Module, which is what ``apply`` returns.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import traceback
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from zsq_plugins.adapter import QuantizedModel
from zsq_plugins.adapters.ort_export import to_onnx
from zsq_plugins.adapters.ort_mirror import (
    FakeQuant,
    MirrorLayer,
    QDQMirror,
    activation_handles,
    weight_handles,
)
from zsq_plugins.errors import ToolkitOptionError, UnsupportedModelError, ZSQError
from zsq_plugins.onnx_calibration import OnnxCalibrationReader
from zsq_plugins.quant.fakequant import affine_params, integer_range
from zsq_plugins.quant.fold import float_graph
from zsq_plugins.quant.reference import eight_bit_layers, layer_bits, quantizable_layers
from zsq_plugins.reporting import write_bytes_atomic
from zsq_plugins.spec import Granularity, QuantSpec, Symmetry

OPSET = 17
"""LayerNormalization is an ONNX op from opset 17 on (before, a chain of elementwise ops)."""
INPUT_NAME, OUTPUT_NAME = "input", "logits"
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")
DEFAULT_CALIBRATION_METHOD = "MinMax"
"""The default calibration method: torch.ao's and NNCF's default range is min-max too."""


class OnnxRuntimeModel(nn.Module):
    """An ONNX model run by an onnxruntime InferenceSession, called like a torch model: float
    tensors in, a float tensor out (no gradients). ``onnx_bytes`` is the serialized model;
    ``save(path)`` writes it."""

    def __init__(self, onnx_bytes: bytes, providers: tuple[str, ...] | None = None) -> None:
        super().__init__()
        import onnxruntime

        self.onnx_bytes = onnx_bytes
        self.providers = tuple(providers or ("CPUExecutionProvider",))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # ORT's warnings about folded initializers are noise
        self.session = onnxruntime.InferenceSession(
            onnx_bytes, options, providers=list(self.providers)
        )
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (output,) = self.session.run(None, {self.input_name: array})[:1]
        return torch.from_numpy(np.ascontiguousarray(output))

    def save(self, path: str | Path) -> Path:
        """Writes the ONNX model to ``path``, atomically."""
        path = Path(path)
        write_bytes_atomic(path, self.onnx_bytes)
        return path

    @classmethod
    def load(cls, path: str | Path, providers: tuple[str, ...] | None = None) -> OnnxRuntimeModel:
        """The model saved at ``path`` (any ONNX file onnxruntime runs)."""
        return cls(Path(path).read_bytes(), providers)


def _ort():
    import onnx
    import onnxruntime
    from onnxruntime import quantization

    return onnx, onnxruntime, quantization


def _export_float(folded: nn.Module, example_input: torch.Tensor, path: Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                folded,
                (example_input,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    except Exception as error:  # the exporter raises many kinds, each with its reason
        raise UnsupportedModelError(
            f"the model does not export to ONNX, which ONNX Runtime quantizes: "
            f"{type(error).__name__}: {error}. Try an op the ONNX exporter supports in place "
            "of the one named, or quantize it in another toolkit (fx, pt2e, nncf, brevitas)."
        ) from error


def float_onnx(folded: nn.Module, example_input: torch.Tensor, folder: Path) -> bytes:
    """The FP model as ORT quantizes it: exported to ONNX (opset 17, any batch size) and
    pre-processed by ORT's ``quant_pre_process`` (shape inference, constant folding); files
    go in ``folder``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    exported, prepared = folder / "fp.onnx", folder / "fp_prepared.onnx"
    _export_float(folded, example_input[:1].detach().cpu().float(), exported)
    try:
        try:
            quant_pre_process(str(exported), str(prepared))
        except AssertionError:
            # ORT's symbolic shape inference asserts on reshapes whose target shape is
            # computed from the batch size (attention's heads); ONNX's own shape inference and
            # the graph optimization still run without it.
            quant_pre_process(str(exported), str(prepared), skip_symbolic_shape=True)
    except Exception as error:  # ORT's shape inference raises bare assertions, among others
        where = traceback.extract_tb(error.__traceback__)[-1]
        raise UnsupportedModelError(
            "ONNX Runtime's pre-processing (quant_pre_process: symbolic shape inference and "
            f"graph optimization) fails on this model: {type(error).__name__} {error} at "
            f"{Path(where.filename).name}:{where.lineno}. It is ORT's own limitation (seen "
            "with attention models, whose reshapes depend on the batch size); quantize this "
            "model with fx, pt2e, nncf or brevitas."
        ) from error
    return prepared.read_bytes()


def _refuse_unowned_weights(model: Any, names: dict[str, str]) -> None:
    """Before any calibration: every weight ORT will quantize belongs to a conv or linear
    module of the FP model (``names``: _layer_names), for the mirror to give its quantizer a
    layer."""
    initializers = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        layer = node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1
        if layer and node.input[1] in initializers and node.name not in names:
            raise UnsupportedModelError(
                f"{node.op_type} {node.name} multiplies by a weight ({node.input[1]}) that "
                "belongs to no nn.Conv2d or nn.Linear of the model (nn.MultiheadAttention's "
                "in_proj_weight is one): the onnxruntime adapter has no layer to give its "
                "quantizer. Write such layers as nn.Linear modules (as the zoo's ViT does), "
                "or quantize this model with fx, pt2e or brevitas."
            )


def _layer_names(model: Any, folded: nn.Module) -> dict[str, str]:
    """ONNX Conv/Gemm node name -> the FP module whose weight it holds: by initializer name
    (the exporter names parameters after their module), else by equal weights."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    layers = dict(quantizable_layers(folded))
    names: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight = node.input[1]
        candidate = weight.removesuffix(".weight")
        if candidate in layers and node.op_type != "MatMul":
            names[node.name] = candidate
            continue
        if weight in initializers:
            values = torch.from_numpy(numpy_helper.to_array(initializers[weight]).copy())
            if node.op_type == "MatMul":  # a Linear on tokens: its weight, transposed
                values = values.T if values.dim() == 2 else values
            match = [n for n, m in layers.items() if m.weight.shape == values.shape
                     and torch.equal(m.weight.detach(), values)]  # fmt: skip
            if len(match) == 1:
                names[node.name] = match[0]
    return names


def _removed_activations(pre: Any, qdq: Any) -> dict[str, tuple[float | None, float | None]]:
    """The Relu/Clip nodes of the float model that ORT took out of the QDQ one (their
    quantizer's range clamps in their place): output tensor -> (low, high)."""
    from onnx import numpy_helper

    kept = {node.name for node in qdq.graph.node}
    constants = {i.name: i for i in pre.graph.initializer}

    def bound(node: Any, position: int) -> float | None:
        if len(node.input) <= position or not node.input[position]:
            return None
        if node.input[position] not in constants:
            raise UnsupportedModelError(f"Clip {node.name} with a computed bound")
        return float(numpy_helper.to_array(constants[node.input[position]]))

    removed: dict[str, tuple[float | None, float | None]] = {}
    for node in pre.graph.node:
        if node.name in kept:
            continue
        if node.op_type == "Relu":
            removed[node.output[0]] = (0.0, None)
        elif node.op_type == "Clip":
            removed[node.output[0]] = (bound(node, 1), bound(node, 2))
        else:
            raise UnsupportedModelError(
                f"ONNX Runtime's quantizer removed {node.op_type} {node.name}, which the mirror "
                "does not know how to stand in for"
            )
    return removed


def _activation_layer(group: dict[str, Any], layer_names: dict[str, str], modules: set[str]):
    """The FP module (or ONNX op) whose output an activation quantizer quantizes."""
    producer = group["producer"]
    if producer is None:
        return "input"
    if producer.name in layer_names:
        return layer_names[producer.name]
    scope = producer.name.strip("/").split("/")
    if len(scope) > 1 and scope[0] in modules:
        return scope[0]
    return producer.name.strip("/") or producer.output[0]


class _DropPerTensorFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "is out-of-range for weight" not in record.getMessage()


@contextlib.contextmanager
def _quiet_per_tensor_fallback() -> Iterator[None]:
    """ORT logs a warning on the root logger for each 1-D constant it cannot quantize per
    channel (a LayerNorm's scale, each time it is visited), then quantizes it per tensor, which
    is what the mirror expects: dozens of lines that ask nothing of the user."""
    fallback = _DropPerTensorFallback()
    logging.getLogger().addFilter(fallback)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(fallback)


class OnnxRuntimeAdapter:
    """onnxruntime.quantization.quantize_static (QDQ), with a torch mirror for the core."""

    name = "onnxruntime"
    requires = ("onnxruntime", "onnx")
    pip_extra = "onnxruntime"
    options = MappingProxyType({
        "calibrate_method": "ORT's calibration method for activation ranges: "
        f"{', '.join(CALIBRATION_METHODS)} (default {DEFAULT_CALIBRATION_METHOD})",
        "extra_options": "quantize_static's extra_options, merged over the adapter's "
        "(ActivationSymmetric/WeightSymmetric from the spec)",
        "nodes_to_exclude": "ONNX node names quantize_static keeps in float",
        "providers": "execution providers of the deployed InferenceSession (default CPU)",
    })  # fmt: skip

    def quantize(
        self,
        model: nn.Module,
        spec: QuantSpec,
        calibration: Iterable[torch.Tensor],
        example_input: torch.Tensor,
        options: dict[str, Any] | None = None,
    ) -> QuantizedModel:
        onnx, onnxruntime, quantization = _ort()
        options = dict(options or {})
        method_name = options.get("calibrate_method", DEFAULT_CALIBRATION_METHOD)
        method_name = getattr(method_name, "name", method_name)
        if method_name not in CALIBRATION_METHODS:
            raise ToolkitOptionError(
                f"calibrate_method {method_name!r} is not one of ORT's: "
                f"{', '.join(CALIBRATION_METHODS)}"
            )
        if not spec.fold_batchnorm:
            raise UnsupportedModelError(
                "the onnxruntime adapter quantizes BN-folded models only: ORT's pre-processing "
                "folds BatchNorm into the convolutions itself. Use fold_batchnorm=True, or "
                "another toolkit to keep BatchNorm apart."
            )
        folded = float_graph(model).eval()
        layers = quantizable_layers(folded)
        eight_bit = eight_bit_layers(layers, spec)
        bits = layer_bits(layers, spec)
        act_symmetric = spec.act_symmetry is Symmetry.SYMMETRIC
        batches = [b[0] if isinstance(b, tuple | list) else b for b in calibration]
        if not batches:
            raise ValueError("the calibration data yielded no batch")
        images = torch.cat([b.detach().cpu().float() for b in batches])
        extra = {
            "ActivationSymmetric": act_symmetric,
            "WeightSymmetric": spec.weight_symmetry is Symmetry.SYMMETRIC,
            **options.get("extra_options", {}),
        }
        with tempfile.TemporaryDirectory(prefix="zsq-ort-") as folder:
            pre_path, q_path = Path(folder) / "pre.onnx", Path(folder) / "qdq.onnx"
            pre_path.write_bytes(float_onnx(folded, example_input, Path(folder)))
            pre = onnx.load(str(pre_path))
            # ORT keeps node names; the float model still names each weight
            layer_names = _layer_names(pre, folded)
            _refuse_unowned_weights(pre, layer_names)
            reader = OnnxCalibrationReader(images, INPUT_NAME, batch_size=len(batches[0]))
            with warnings.catch_warnings(), _quiet_per_tensor_fallback():
                warnings.simplefilter("ignore")
                quantization.quantize_static(
                    str(pre_path),
                    str(q_path),
                    reader,
                    quant_format=quantization.QuantFormat.QDQ,
                    per_channel=spec.weight_granularity is Granularity.PER_CHANNEL,
                    activation_type=(
                        quantization.QuantType.QInt8
                        if act_symmetric
                        else quantization.QuantType.QUInt8
                    ),
                    weight_type=quantization.QuantType.QInt8,
                    calibrate_method=getattr(quantization.CalibrationMethod, method_name),
                    nodes_to_exclude=list(options.get("nodes_to_exclude", [])),
                    extra_options=extra,
                )
            qdq = onnx.load(str(q_path))
        removed = _removed_activations(pre, qdq)
        modules = dict(folded.named_modules())
        eight_bit_nodes = {node for node, name in layer_names.items() if name in eight_bit}
        outputs = {o.name for o in qdq.graph.output}

        def weight_quant_for(name: str, layer: MirrorLayer) -> FakeQuant:
            return _weight_quantizer(layer.weight.detach(), bits[name][0], spec)

        def activation_quant_for(group: dict[str, Any]) -> FakeQuant:
            feeds_8bit = any(c.name in eight_bit_nodes for c in group["consumers"]) or any(
                out in outputs for out in group["outputs"]
            )
            return _activation_quantizer(group, 8 if feeds_8bit else spec.act_bits, act_symmetric)

        mirror = QDQMirror(
            qdq, layer_names, modules, weight_quant_for, activation_quant_for, removed
        )
        names = [_activation_layer(g, layer_names, set(modules)) for g in mirror.groups]
        handles = [*weight_handles(mirror), *activation_handles(mirror, names)]
        return QuantizedModel(
            toolkit=self.name,
            model=mirror.eval(),
            spec=spec,
            handles=handles,
            report={
                "onnxruntime": onnxruntime.__version__,
                "calibrate_method": method_name,
                "eight_bit_layers": sorted(eight_bit),
                "removed_activations": len(removed),
                "providers": list(options.get("providers", ["CPUExecutionProvider"])),
            },
        )

    def onnx_model(self, quantized: QuantizedModel) -> Any:
        """The QDQ ONNX model (``onnx.ModelProto``) that computes what the mirror computes."""
        mirror = quantized.model
        if not isinstance(mirror, QDQMirror):
            raise ZSQError("not a model of the onnxruntime adapter")
        return to_onnx(mirror, mirror.qdq_model)

    def deploy(self, quantized: QuantizedModel) -> OnnxRuntimeModel:
        """The ORT session of the mirror's current state: what ``apply`` returns."""
        model = self.onnx_model(quantized)
        return OnnxRuntimeModel(model.SerializeToString(), tuple(quantized.report["providers"]))

    def export_onnx(
        self, quantized: QuantizedModel, path: str | Path, example_input: torch.Tensor
    ) -> Path:
        """The QDQ model ORT runs (the deployed one), written to ``path``."""
        path = Path(path)
        write_bytes_atomic(path, self.onnx_model(quantized).SerializeToString())
        return path


def _weight_quantizer(weight: torch.Tensor, bits: int, spec: QuantSpec) -> FakeQuant:
    """Min-max weight steps, per output channel unless the spec says per tensor; the grid is
    torch.ao's (symmetric: step max|w| / ((qmax - qmin) / 2))."""
    symmetric = spec.weight_symmetry is Symmetry.SYMMETRIC
    per_channel = spec.weight_granularity is Granularity.PER_CHANNEL
    flat = weight.reshape(weight.shape[0], -1) if per_channel else weight.reshape(1, -1)
    low, high = flat.min(1).values.clamp(max=0), flat.max(1).values.clamp(min=0)
    qmin, qmax = integer_range(bits, signed=True, narrow=symmetric and spec.weight_narrow_range)
    if symmetric:
        scale = torch.maximum(-low, high) / ((qmax - qmin) / 2)
        zero_point = torch.zeros_like(scale)
    else:
        scale = (high - low) / (qmax - qmin)
        zero_point = torch.clamp(qmin - torch.round(low / scale.clamp_min(1e-12)), qmin, qmax)
    scale = scale.clamp_min(1e-12)
    return FakeQuant(scale, zero_point, qmin, qmax, 0 if per_channel else None, -128, 127)


def _activation_quantizer(group: dict[str, Any], bits: int, symmetric: bool) -> FakeQuant:
    """ORT's calibrated range, on the spec's grid for ``bits``."""
    container = group["container"]
    ort_scale, ort_zero_point = group["ort_scale"], group["ort_zero_point"]
    low_level, high_level = (-127, 127) if container[0] < 0 else container  # ORT's grids
    low = torch.tensor([(low_level - ort_zero_point) * ort_scale])
    high = torch.tensor([(high_level - ort_zero_point) * ort_scale])
    scale, zero_point, qmin, qmax = affine_params(low, high, bits, symmetric)
    return FakeQuant(scale, zero_point, qmin, qmax, None, *container)
