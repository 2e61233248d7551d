"""The onnxruntime mirror's state written back into ORT's QDQ model (ort_mirror.py says why
the mirror exists): integer weights and their steps, activation steps and zero points, int32
biases at ORT's bias step (input step x weight step), a Clip before each activation quantizer
narrower than its 8-bit ONNX type, the Relu/Clip ORT removed put back where the quantizer's
range no longer implies them, and switched-off quantizers taken out."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from zsq_plugins.adapters.ort_mirror import FakeQuant, QDQMirror

INT32_MAX = 2**31 - 1


def _fitting_weight_scale(layer: Any, weight_quant: FakeQuant, input_scale: float) -> torch.Tensor:
    """The weight steps to write: the layer's own, raised in the channels whose bias at step
    input step x weight step would not fit int32 (ORT's quantizer raises them too). That
    happens where a channel's weights are all zero or nearly (a min-max step of almost
    nothing): its weights, rounded on the raised step, change by less than that step."""
    scale = weight_quant.scale.double().clone()
    if weight_quant.axis is None or layer.bias is None:
        return scale
    needed = layer.bias.detach().double().abs() / (input_scale * INT32_MAX) * 2
    return torch.maximum(scale, needed)


def to_onnx(mirror: QDQMirror, model: Any) -> Any:
    """A copy of the QDQ ``model`` that computes what ``mirror`` computes now: its weights,
    biases, scales and zero points written into the initializers, disabled quantizers taken
    out, and a Clip before every activation quantizer whose levels are narrower than its
    ONNX type."""
    import onnx
    from onnx import helper, numpy_helper

    exported = onnx.ModelProto()
    exported.CopyFrom(model)
    graph = exported.graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    by_name = {node.name: node for node in graph.node}
    replaced: dict[str, Any] = {}  # node name -> its replacement (None: removed)
    added_nodes: dict[str, list[Any]] = {}  # node name -> nodes to put before it
    added_after: dict[str, list[Any]] = {}  # node name -> nodes to put after it
    group_of_output = {
        out: index for index, group in enumerate(mirror.groups) for out in group["outputs"]
    }

    def write(name: str, array: np.ndarray) -> None:
        shape = tuple(initializers[name].dims)  # a per-tensor scale is a scalar in ONNX
        array = array.reshape(shape) if array.size == math.prod(shape) else array
        initializers[name].CopyFrom(numpy_helper.from_array(array, name))

    def as_float(node: Any, values: torch.Tensor) -> None:
        """The dequantizer ``node`` replaced by a float initializer of ``values``."""
        array = values.detach().cpu().float().numpy()
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        replaced[node.name] = None

    for node in graph.node:
        layer = mirror.layers_by_node.get(node.name)
        if layer is None:
            continue
        weight_quant = layer.weight_quant
        weight_dq = producers.get(node.input[1])
        has_bias = len(node.input) > 2 and bool(node.input[2]) and layer.bias is not None
        bias_dq = producers.get(node.input[2]) if has_bias else None
        if bias_dq is not None and bias_dq.op_type != "DequantizeLinear":
            bias_dq = None
        source = group_of_output.get(node.input[0])
        input_quant = mirror.ort_quantizers[source] if source is not None else None
        quantized_weight = weight_quant is not None and bool(weight_quant.enabled)
        integer_bias = (
            bias_dq is not None
            and quantized_weight
            and input_quant is not None
            and bool(input_quant.enabled)
        )
        if weight_quant is not None and weight_dq is not None:
            if quantized_weight:
                scale = weight_quant.scale.double()
                if integer_bias:
                    scale = _fitting_weight_scale(layer, weight_quant, float(input_quant.scale[0]))
                zero_point_type = numpy_helper.to_array(initializers[weight_dq.input[2]]).dtype
                levels = weight_quant.levels(layer.weight.detach(), scale.float())
                if layer.op == "MatMul":  # ONNX holds torch's Linear weight transposed
                    levels = levels.T
                write(weight_dq.input[0], levels.numpy().astype(zero_point_type))
                write(weight_dq.input[1], scale.float().numpy())
                write(weight_dq.input[2], weight_quant.zero_point.numpy().astype(zero_point_type))
            else:
                as_float(weight_dq, layer.weight.T if layer.op == "MatMul" else layer.weight)
        if not has_bias:
            continue
        if bias_dq is None and producers.get(node.input[2]) is None:
            write(node.input[2], layer.bias.detach().numpy().astype(np.float32))
        elif bias_dq is not None and not integer_bias:
            as_float(bias_dq, layer.bias)
        elif bias_dq is not None:
            bias_scale = float(input_quant.scale[0]) * scale
            if weight_quant.axis is None:
                bias_scale = bias_scale.expand(layer.bias.shape)
            integers = torch.round(layer.bias.detach().double() / bias_scale)
            integers = integers.clamp(-INT32_MAX, INT32_MAX)
            write(bias_dq.input[0], integers.numpy().astype(np.int32))
            write(bias_dq.input[1], bias_scale.float().numpy())
            write(bias_dq.input[2], np.zeros(integers.shape, np.int32))

    for index, (group, quantizer) in enumerate(zip(mirror.groups, mirror.ort_quantizers,
                                                   strict=True)):  # fmt: skip
        zero_point_type = numpy_helper.to_array(initializers[group["zero_point"]]).dtype
        write(group["scale"], quantizer.scale.numpy().astype(np.float32))
        write(group["zero_point"], quantizer.zero_point.numpy().astype(zero_point_type))
        narrower = (quantizer.quant_min, quantizer.quant_max) != tuple(group["container"])
        for node in (by_name[name] for name in group["nodes"]):  # its QuantizeLinear nodes
            if not bool(quantizer.enabled):
                replaced[node.name] = helper.make_node(
                    "Identity", [node.input[0]], list(node.output), name=node.name
                )
            elif narrower:
                scale, zero_point = float(quantizer.scale[0]), float(quantizer.zero_point[0])
                low, high = f"{group['scale']}_zsq_low", f"{group['scale']}_zsq_high"
                levels = ((low, quantizer.quant_min), (high, quantizer.quant_max))
                if low not in initializers:
                    for name, level in levels:
                        bound = np.array((level - zero_point) * scale, np.float32)
                        graph.initializer.append(numpy_helper.from_array(bound, name))
                        initializers[name] = graph.initializer[-1]
                clipped = f"{node.input[0]}_zsq_clip{index}"
                clip = helper.make_node(
                    "Clip", [node.input[0], low, high], [clipped], name=f"{node.name}_zsq_clip"
                )
                added_nodes[node.name] = [clip]
                rewired = onnx.NodeProto()
                rewired.CopyFrom(node)
                rewired.input[0] = clipped
                replaced[node.name] = rewired
        if not bool(quantizer.enabled):
            for dequantizer in (producers[out] for out in group["outputs"]):
                replaced[dequantizer.name] = helper.make_node(
                    "Identity", [dequantizer.input[0]], list(dequantizer.output),
                    name=dequantizer.name,
                )  # fmt: skip

    group_of_input = {
        by_name[name].input[0]: index
        for index, group in enumerate(mirror.groups)
        for name in group["nodes"]
    }
    for name, (low, high) in mirror.removed_activations.items():
        index = group_of_input.get(name)
        quantizer = mirror.ort_quantizers[index] if index is not None else None
        if quantizer is not None and bool(quantizer.enabled):
            scale, zero_point = float(quantizer.scale[0]), float(quantizer.zero_point[0])
            range_low = (quantizer.quant_min - zero_point) * scale
            range_high = (quantizer.quant_max - zero_point) * scale
            implied = (low is None or range_low >= low) and (high is None or range_high <= high)
            if implied:
                continue
        producer = producers[name]
        before = f"{name}_zsq_before_activation"
        bounds = []
        for suffix, bound in (("low", low), ("high", high)):
            if bound is None:
                bounds.append("")
                continue
            bound_name = f"{name}_zsq_{suffix}"
            value = np.array(bound, np.float32)
            graph.initializer.append(numpy_helper.from_array(value, bound_name))
            bounds.append(bound_name)
        rewired = onnx.NodeProto()
        rewired.CopyFrom(replaced.get(producer.name) or producer)
        rewired.output[list(rewired.output).index(name)] = before
        replaced[producer.name] = rewired
        clip = helper.make_node("Clip", [before, *bounds], [name], name=f"{name}_zsq_activation")
        added_after.setdefault(producer.name, []).append(clip)

    nodes = []
    for node in graph.node:
        nodes += added_nodes.get(node.name, [])
        if node.name in replaced:
            if replaced[node.name] is not None:
                nodes.append(replaced[node.name])
        else:
            nodes.append(node)
        nodes += added_after.get(node.name, [])
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return exported
