"""Statistics targets derived from the weights alone, for models without BatchNorm.

After GZSQ's idea (data distilled from the pretrained weights). Each tensor's channels are
propagated as Gaussians with a per-channel mean and variance, starting from a standardized
input (mean 0, variance 1 per channel, in the model's normalized space), through the
BN-folded graph:

- conv, output channel o, with S[o,i] = sum_k W[o,i,k] (the channel's weight sum over its
  kernel window):  E[y_o] = b_o + sum_i S[o,i] E[x_i],  Var[y_o] = sum_i S[o,i]^2 Var[x_i].
  The variance assumes each input channel is smooth across a kernel window (fully correlated
  there, as natural images and their feature maps are) and channels independent. Assuming
  every position independent instead (sum of W^2) made the predicted standard deviation of a
  trained VGG's deep layers 20-100x smaller than on real data;
- linear: E[y] = b + W E[x], Var[y] = W^2 Var[x] (features independent);
- ReLU / ReLU6 / Hardtanh: exact moments of a Gaussian clamped to [low, high];
- max pooling over n values: mean and variance of the maximum of n independent Gaussians;
  average pooling (and a spatial mean): mean kept, variance divided by n; addition and
  subtraction: means add (subtract), variances add; flatten repeats each channel's moments;
- GELU, SiLU, Hardswish, sigmoid, tanh and the other elementwise activations: Gauss-Hermite
  moments (moments.py); a product of tensors as independent factors; concatenation along
  channels joins their moments.
An operation without a rule passes its input's moments on unchanged, with a warning, when it
keeps the channels (refused with ``strict``, and always where the channels change).

The predicted mean and standard deviation of every conv/linear output are targets the engine
matches (``SynthesisConfig(statistics="weights")``), read at that layer's output, or at its
BatchNorm's output when BN follows; the ``weight-stats`` preset uses them. Measured on
vgg_nobn_fmnist, the means follow real data closely while deep layers' variances are
underestimated (channels are correlated, and the rule takes them as independent).
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from zsq_plugins.errors import UnsupportedModelError
from zsq_plugins.layers import Normalize
from zsq_plugins.quant.fold import fold_batchnorm, trace
from zsq_plugins.synthesis.hooks import StatisticsTarget
from zsq_plugins.synthesis.moments import (
    Moments,
    clamped_gaussian,
    elementwise_moments,
    max_of_gaussians,
    product_moments,
)

log = logging.getLogger(__name__)

PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout)
FLATTEN_CALLS = (torch.flatten,)
ADD_CALLS = (operator.add, torch.add)
SUB_CALLS = (operator.sub, torch.sub)
RELU_CALLS = {torch.relu: (0.0, math.inf), nn.functional.relu: (0.0, math.inf),
              nn.functional.relu6: (0.0, 6.0)}  # fmt: skip


def _conv_moments(conv: nn.Conv2d, moments: Moments) -> Moments:
    mean_in, var_in = moments
    groups = conv.groups
    weight = conv.weight.detach()
    out_channels, per_group = weight.shape[:2]
    sums = weight.sum(dim=(2, 3)).view(groups, out_channels // groups, per_group)
    squares = sums.pow(2)
    mean_in = mean_in.view(groups, per_group, 1)
    var_in = var_in.view(groups, per_group, 1)
    mean = torch.bmm(sums, mean_in).flatten()
    var = torch.bmm(squares, var_in).flatten()
    if conv.bias is not None:
        mean = mean + conv.bias.detach()
    return mean, var


def _linear_moments(linear: nn.Linear, moments: Moments) -> Moments:
    weight = linear.weight.detach()
    mean = weight @ moments[0] + (linear.bias.detach() if linear.bias is not None else 0.0)
    return mean, weight.pow(2) @ moments[1]


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


ELEMENTWISE_MODULES: dict[type[nn.Module], Callable[[nn.Module], Callable]] = {
    nn.GELU: lambda m: lambda x: nn.functional.gelu(x, approximate=m.approximate),
    nn.SiLU: lambda m: nn.functional.silu,
    nn.Hardswish: lambda m: nn.functional.hardswish,
    nn.Sigmoid: lambda m: torch.sigmoid,
    nn.Hardsigmoid: lambda m: nn.functional.hardsigmoid,
    nn.Tanh: lambda m: torch.tanh,
    nn.LeakyReLU: lambda m: lambda x: nn.functional.leaky_relu(x, m.negative_slope),
    nn.ELU: lambda m: lambda x: nn.functional.elu(x, m.alpha),
    nn.Mish: lambda m: nn.functional.mish,
}
"""Activation modules whose moments come from Gauss-Hermite quadrature (moments.py)."""
ELEMENTWISE_CALLS = {
    nn.functional.gelu: nn.functional.gelu, nn.functional.silu: nn.functional.silu,
    nn.functional.hardswish: nn.functional.hardswish, torch.sigmoid: torch.sigmoid,
    nn.functional.sigmoid: torch.sigmoid, nn.functional.hardsigmoid: nn.functional.hardsigmoid,
    torch.tanh: torch.tanh, nn.functional.leaky_relu: nn.functional.leaky_relu,
}  # fmt: skip
MUL_CALLS = (operator.mul, torch.mul)
CONCAT_CALLS = (torch.cat, torch.concat)
SPATIAL_MEAN_CALLS = (nn.functional.adaptive_avg_pool2d,)


def _pooled(incoming: Moments, source: torch.fx.Node, node: torch.fx.Node, maximum: bool):
    n = math.prod(_shape(source)[2:]) // max(1, math.prod(_shape(node)[2:]))
    mean, var = incoming
    if maximum:
        shift, scale = max_of_gaussians(max(n, 1))
        return mean + var.sqrt() * shift, var * scale
    return mean, var / max(n, 1)


def _binary(node: torch.fx.Node, values: dict[torch.fx.Node, Moments]) -> Moments | None:
    """Addition, subtraction or multiplication of two tensors, or of a tensor and a number
    (None: an operand is neither)."""
    left, right = node.args[:2]
    subtract = node.target in (operator.sub, torch.sub)
    if isinstance(left, torch.fx.Node) and isinstance(right, torch.fx.Node):
        if left not in values or right not in values:
            return None
        if node.target in MUL_CALLS:
            return product_moments(values[left], values[right])
        return values[left][0] + (-1 if subtract else 1) * values[right][0], (
            values[left][1] + values[right][1]
        )
    tensor, number = (left, right) if isinstance(left, torch.fx.Node) else (right, left)
    if tensor not in values or not isinstance(number, int | float):
        return None
    mean, var = values[tensor]
    if node.target in MUL_CALLS:
        return mean * number, var * number**2
    if subtract:
        return (mean - number, var) if tensor is left else (number - mean, var)
    return mean + number, var


def propagate(
    graph: torch.fx.GraphModule, input_shape: tuple[int, ...], strict: bool = False
) -> dict[str, Moments]:
    """Predicted output moments of every conv/linear layer of a BN-folded graph, by name.

    An operation without a rule (the module docstring lists the rules) passes its input's
    moments on unchanged, with a warning naming it, when its output has the input's channels;
    with ``strict``, or where the channels change, it is refused."""
    ShapeProp(graph).propagate(torch.zeros(1, *input_shape))
    modules = dict(graph.named_modules())
    values: dict[torch.fx.Node, Moments] = {}
    layers: dict[str, Moments] = {}

    def unsupported(node: torch.fx.Node) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"weight statistics cannot be propagated through {node.op} {node.target!r} "
            f"(node {node.name}); supported: conv, linear, clamps, elementwise activations "
            "(GELU, SiLU, Hardswish, sigmoid, tanh...), pooling, flatten, addition, "
            "multiplication, concatenation, dropout. Use another preset (e.g. adversarial or "
            "noise)."
        )

    def rule(node: torch.fx.Node, incoming: Moments | None, source) -> Moments | None:
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, Normalize):
                channels = _shape(node)[1]
                return torch.zeros(channels), torch.ones(channels)
            if incoming is None:
                return None
            if isinstance(module, nn.Conv2d):
                layers[node.target] = _conv_moments(module, incoming)
                return layers[node.target]
            if isinstance(module, nn.Linear):
                layers[node.target] = _linear_moments(module, incoming)
                return layers[node.target]
            if isinstance(module, nn.ReLU):
                return clamped_gaussian(incoming, 0.0, math.inf)
            if isinstance(module, nn.ReLU6):
                return clamped_gaussian(incoming, 0.0, 6.0)
            if isinstance(module, nn.Hardtanh):
                return clamped_gaussian(incoming, module.min_val, module.max_val)
            if type(module) in ELEMENTWISE_MODULES:
                return elementwise_moments(ELEMENTWISE_MODULES[type(module)](module), incoming)
            if isinstance(module, nn.MaxPool2d | nn.AvgPool2d | nn.AdaptiveAvgPool2d):
                return _pooled(incoming, source, node, isinstance(module, nn.MaxPool2d))
            if isinstance(module, nn.Flatten):
                return _flatten(incoming, _shape(source))
            if isinstance(module, PASS_THROUGH_MODULES):
                return incoming
            return None
        if node.op == "call_function" and node.target in (*ADD_CALLS, *MUL_CALLS, *SUB_CALLS):
            return _binary(node, values)
        if node.op == "call_function" and node.target in CONCAT_CALLS:
            parts = node.args[0]
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim % len(_shape(node)) != 1 or any(p not in values for p in parts):
                return None
            return tuple(torch.cat([values[p][i] for p in parts]) for i in (0, 1))  # type: ignore[return-value]
        if incoming is None:
            return None
        if node.op == "call_function" and node.target in RELU_CALLS:
            return clamped_gaussian(incoming, *RELU_CALLS[node.target])
        if node.op == "call_function" and node.target in ELEMENTWISE_CALLS:
            return elementwise_moments(ELEMENTWISE_CALLS[node.target], incoming)
        if node.op == "call_function" and node.target in SPATIAL_MEAN_CALLS:
            return _pooled(incoming, source, node, maximum=False)
        if (
            node.op == "call_method"
            and node.target == "mean"
            and _shape(node)[1:2] == _shape(source)[1:2]
        ):
            return _pooled(incoming, source, node, maximum=False)
        if (node.op == "call_function" and node.target in FLATTEN_CALLS) or (
            node.op == "call_method" and node.target in ("flatten", "view", "reshape")
        ):
            return _flatten(incoming, _shape(source))
        return None

    for node in graph.graph.nodes:
        if node.op in ("get_attr", "output"):
            continue
        if node.op == "placeholder":
            channels = _shape(node)[1]
            values[node] = (torch.zeros(channels), torch.ones(channels))
            continue
        source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        incoming = values.get(source) if source is not None else None
        result = rule(node, incoming, source)
        if result is None:
            same_channels = (
                incoming is not None and len(_shape(node)) > 1
                and _shape(node)[1] == _shape(source)[1]
            )  # fmt: skip
            if strict or not same_channels:
                raise unsupported(node)
            log.warning(
                "weight statistics: no rule for %s %r (node %s); its input's moments pass "
                "through unchanged (an approximation)", node.op, node.target, node.name,
            )  # fmt: skip
            result = incoming
        values[node] = result
    return layers


def _flatten(moments: Moments, shape: tuple[int, ...]) -> Moments:
    positions = math.prod(shape[2:]) if len(shape) > 2 else 1
    return moments[0].repeat_interleave(positions), moments[1].repeat_interleave(positions)


def weight_statistics_targets(
    model: nn.Module, input_shape: tuple[int, ...], strict: bool = False
) -> list[StatisticsTarget]:
    """Targets for every conv/linear output of ``model``, derived from its weights.

    Computed on the BN-folded graph; a layer followed by BatchNorm is read at the BN's output
    (the folded conv's output), so the rule also runs on BN models, ignoring their BN statistics.
    """
    predicted = propagate(fold_batchnorm(model).cpu(), input_shape, strict)
    original = trace(model)
    modules = dict(model.named_modules())
    targets = []
    for node in original.graph.nodes:
        if node.op != "call_module" or node.target not in predicted:
            continue
        users = list(node.users)
        read_at = node.target
        if (
            len(users) == 1
            and users[0].op == "call_module"
            and isinstance(modules[users[0].target], nn.modules.batchnorm._BatchNorm)
        ):
            read_at = users[0].target
        mean, var = predicted[node.target]
        device = modules[read_at].weight.device if hasattr(modules[read_at], "weight") else None
        targets.append(
            StatisticsTarget(
                node.target,
                modules[read_at],
                mean.to(device),
                var.clamp_min(1e-10).sqrt().to(device),
                on_output=True,
            )
        )
    return targets
