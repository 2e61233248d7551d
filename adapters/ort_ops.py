"""The ONNX ops the onnxruntime mirror runs in torch (besides Conv/Gemm and Q/DQ pairs),
with ONNX's semantics for the attributes torch's exporter and ORT's pre-processing emit."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from zsq_plugins.errors import UnsupportedModelError


def attributes(node: Any) -> dict[str, Any]:
    """An ONNX node's attributes as Python values."""
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _clip(x: torch.Tensor, low: torch.Tensor | None, high: torch.Tensor | None) -> torch.Tensor:
    if low is not None:
        x = torch.maximum(x, low)
    if high is not None:
        x = torch.minimum(x, high)
    return x


def _pool_padding(attrs: dict[str, Any], x: torch.Tensor, fill: float) -> torch.Tensor:
    pads = attrs.get("pads")
    if not pads or not any(pads):
        return x
    half = len(pads) // 2
    torch_pads = []
    for axis in reversed(range(half)):
        torch_pads += [pads[axis], pads[axis + half]]
    return F.pad(x, torch_pads, value=fill)


def _average_pool(x: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    if attrs.get("ceil_mode", 0):
        raise UnsupportedModelError("AveragePool with ceil_mode=1 is not mirrored")
    include_pad = bool(attrs.get("count_include_pad", 0))
    if include_pad:
        x = _pool_padding(attrs, x, 0.0)
    elif attrs.get("pads") and any(attrs["pads"]):
        raise UnsupportedModelError("AveragePool with padding left out of the count")
    return F.avg_pool2d(x, attrs["kernel_shape"], attrs.get("strides", attrs["kernel_shape"]))


def _max_pool(x: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    x = _pool_padding(attrs, x, -math.inf)
    return F.max_pool2d(
        x,
        attrs["kernel_shape"],
        attrs.get("strides", attrs["kernel_shape"]),
        dilation=attrs.get("dilations", 1),
        ceil_mode=bool(attrs.get("ceil_mode", 0)),
    )


def _flatten(x: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    axis = attrs.get("axis", 1)
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _reshape(x: torch.Tensor, shape: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    target = [int(v) for v in shape.tolist()]
    if not attrs.get("allowzero", 0):
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


def _reduce_mean(x: torch.Tensor, attrs: dict[str, Any], axes: Any = None) -> torch.Tensor:
    axes = attrs.get("axes") if axes is None else [int(a) for a in axes.tolist()]
    keep = bool(attrs.get("keepdims", 1))
    return x.mean(dim=tuple(axes), keepdim=keep) if axes else x.mean()


def _layer_norm(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = inputs[0]
    axis = attrs.get("axis", -1) % x.dim()
    bias = inputs[2] if len(inputs) > 2 else None
    return F.layer_norm(x, x.shape[axis:], inputs[1], bias, attrs.get("epsilon", 1e-5))


def _shape(x: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    dims = list(x.shape)[attrs.get("start", 0) : attrs.get("end", x.dim())]
    return torch.tensor(dims, dtype=torch.int64)


def _gather(x: torch.Tensor, indices: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    axis = attrs.get("axis", 0) % x.dim()
    indices = indices.long()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    picked = x.movedim(axis, 0)[indices]  # indices' dims, then x's other dims
    return picked.movedim(tuple(range(indices.dim())), tuple(range(axis, axis + indices.dim())))


def _unsqueeze(x: torch.Tensor, axes: torch.Tensor | None, attrs: dict[str, Any]) -> torch.Tensor:
    wanted = attrs.get("axes") if axes is None else [int(a) for a in axes.tolist()]
    rank = x.dim() + len(wanted)
    for axis in sorted(a % rank for a in wanted):
        x = x.unsqueeze(axis)
    return x


def _slice(inputs: list[Any]) -> torch.Tensor:
    x, starts, ends = inputs[:3]
    axes = inputs[3] if len(inputs) > 3 and inputs[3] is not None else None
    steps = inputs[4] if len(inputs) > 4 and inputs[4] is not None else None
    axes_list = [int(a) for a in axes.tolist()] if axes is not None else list(range(len(starts)))
    index = [slice(None)] * x.dim()
    for i, axis in enumerate(axes_list):
        step = int(steps[i]) if steps is not None else 1
        if step != 1:
            raise UnsupportedModelError(f"Slice with step {step} is not mirrored")
        size = x.shape[axis]
        start, end = (max(-size, min(size, int(v[i]))) for v in (starts, ends))  # ONNX clamps
        index[axis] = slice(start, end)
    return x[tuple(index)]


def _expand(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(int(v) for v in shape.tolist())))


# op type -> f(inputs, attributes); inputs are tensors (or None for an empty input name).
OPS: dict[str, Callable[[list[Any], dict[str, Any]], torch.Tensor]] = {
    "Relu": lambda i, a: torch.relu(i[0]),
    "LeakyRelu": lambda i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "Clip": lambda i, a: _clip(i[0], *[*i[1:], None, None][:2]),
    "Sigmoid": lambda i, a: torch.sigmoid(i[0]),
    "HardSigmoid": lambda i, a: torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1),
    "HardSwish": lambda i, a: F.hardswish(i[0]),
    "Add": lambda i, a: i[0] + i[1],
    "Sub": lambda i, a: i[0] - i[1],
    "Mul": lambda i, a: i[0] * i[1],
    "Div": lambda i, a: i[0] / i[1],
    "GlobalAveragePool": lambda i, a: i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "AveragePool": lambda i, a: _average_pool(i[0], a),
    "MaxPool": lambda i, a: _max_pool(i[0], a),
    "Flatten": lambda i, a: _flatten(i[0], a),
    "Reshape": lambda i, a: _reshape(i[0], i[1], a),
    "Transpose": lambda i, a: i[0].permute(a.get("perm", list(reversed(range(i[0].dim()))))),
    "Concat": lambda i, a: torch.cat(list(i), dim=a["axis"]),
    "Identity": lambda i, a: i[0],
    "Softmax": lambda i, a: torch.softmax(i[0], dim=a.get("axis", -1)),
    "ReduceMean": lambda i, a: _reduce_mean(i[0], a, i[1] if len(i) > 1 else None),
    "Erf": lambda i, a: torch.erf(i[0]),
    "Pow": lambda i, a: torch.pow(i[0], i[1]),
    "Sqrt": lambda i, a: torch.sqrt(i[0]),
    "MatMul": lambda i, a: torch.matmul(i[0], i[1]),
    "LayerNormalization": lambda i, a: _layer_norm(i, a),
    # The shape arithmetic of batch-dependent reshapes (attention's heads, a class token
    # expanded to the batch), left in the graph when ORT's symbolic shape inference is skipped.
    "Shape": lambda i, a: _shape(i[0], a),
    "Gather": lambda i, a: _gather(i[0], i[1], a),
    "Unsqueeze": lambda i, a: _unsqueeze(i[0], i[1] if len(i) > 1 else None, a),
    "Slice": lambda i, a: _slice(i),
    "Equal": lambda i, a: i[0] == i[1],
    "Where": lambda i, a: torch.where(i[0].bool(), i[1], i[2]),
    "Expand": lambda i, a: _expand(i[0], i[1]),
}
