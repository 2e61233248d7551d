"""Per-channel moments propagated through a traced model, for the weight-statistics targets
(weight_stats.py states the rules for conv and linear layers and why).

Each tensor carries its channels' (mean, variance) and the axis its channels lie on: 1 for
images (N, C, H, W), the last for features and tokens (N, F), (N, L, C), so that a channel-
last ConvNeXt block (permute, LayerNorm, pointwise linears) and a vision transformer (patch
embedding, flatten, transpose, attention) propagate as well as a CNN. Approximations, each
written where it is made:

- LayerNorm over the channels: E[y_c] = gamma_c (m_c - m) / s + beta_c and
  Var[y_c] = gamma_c^2 v_c (1 - 1/C) / s^2, with m the mean of the channel means and s^2 the
  expected variance over a token's channels (mean(v) (1 - 1/C) + the spread of the m_c):
  the fluctuation of each token's own mean and variance is ignored. GroupNorm the same per
  group, over its channels and positions;
- attention: the output of softmax(q k^T) v is a convex combination of v's tokens, so it
  keeps v's channel means; its variance is taken as v's (an upper bound, reached when each
  query attends to one token). Written out with heads, the channels are split over two axes
  (heads, head_dim) and followed through the transposes until they are merged back; a fused
  q/k/v linear's channels are split along their outermost axis (timm's ``unbind``).
  ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``
  (leaves for torch.fx) are propagated through their own layers, whose linears get targets
  too;
- a tensor concatenated with or added to a parameter (a class token, position embeddings):
  the parameter's values along the other axes are taken as a distribution per channel;
- picking tokens (``x[:, 0]``) keeps the channel moments.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from zsq_plugins.errors import UnsupportedModelError
from zsq_plugins.layers import Normalize
from zsq_plugins.synthesis.moments import (
    Moments,
    clamped_gaussian,
    elementwise_moments,
    max_of_gaussians,
    product_moments,
)

log = logging.getLogger(__name__)

PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout)
PASS_THROUGH_METHODS = ("contiguous", "clone", "float", "to", "detach")
ADD_CALLS = (operator.add, torch.add)
SUB_CALLS = (operator.sub, torch.sub)
MUL_CALLS = (operator.mul, torch.mul)
DIV_CALLS = (operator.truediv, torch.div)
MATMUL_CALLS = (operator.matmul, torch.matmul, torch.bmm)
CONCAT_CALLS = (torch.cat, torch.concat)
CLAMP_CALLS = {torch.relu: (0.0, math.inf), nn.functional.relu: (0.0, math.inf),
               nn.functional.relu6: (0.0, 6.0)}  # fmt: skip
ELEMENTWISE_CALLS = {
    nn.functional.gelu: nn.functional.gelu, nn.functional.silu: nn.functional.silu,
    nn.functional.hardswish: nn.functional.hardswish, torch.sigmoid: torch.sigmoid,
    nn.functional.sigmoid: torch.sigmoid, nn.functional.hardsigmoid: nn.functional.hardsigmoid,
    torch.tanh: torch.tanh, nn.functional.leaky_relu: nn.functional.leaky_relu,
}  # fmt: skip
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


@dataclasses.dataclass(frozen=True)
class Stat:
    """A tensor's per-channel moments and the axis its channels lie on."""

    mean: torch.Tensor
    var: torch.Tensor
    axis: int
    group: tuple[int, ...] = ()
    """When the channels are split over several axes (attention heads: heads, then head_dim),
    those axes, outermost first (``axis`` is then the first); empty otherwise."""

    @property
    def moments(self) -> Moments:
        return self.mean, self.var

    @property
    def axes(self) -> tuple[int, ...]:
        return self.group or (self.axis,)

    def like(self, moments: Moments, axis: int | None = None) -> Stat:
        if axis is None:
            return Stat(moments[0], moments[1], self.axis, self.group)
        return Stat(moments[0], moments[1], axis)

    def on_axes(self, axes: tuple[int, ...]) -> Stat:
        return Stat(self.mean, self.var, axes[0], axes if len(axes) > 1 else ())


class _Scores:
    """q k^T: attention scores, whose moments are not needed."""


class _Weights:
    """softmax of attention scores: rows of convex weights over tokens."""


SCORES, WEIGHTS = _Scores(), _Weights()


def conv_moments(conv: nn.Conv2d, moments: Moments) -> Moments:
    """Conv output moments per channel (weight_stats.py: the kernel window taken as smooth)."""
    mean_in, var_in = moments
    groups = conv.groups
    weight = conv.weight.detach()
    out_channels, per_group = weight.shape[:2]
    sums = weight.sum(dim=(2, 3)).view(groups, out_channels // groups, per_group)
    mean = torch.bmm(sums, mean_in.view(groups, per_group, 1)).flatten()
    var = torch.bmm(sums.pow(2), var_in.view(groups, per_group, 1)).flatten()
    if conv.bias is not None:
        mean = mean + conv.bias.detach()
    return mean, var


def linear_moments(linear: nn.Linear, moments: Moments) -> Moments:
    """Linear output moments per feature (input features independent)."""
    return affine_moments(linear.weight, linear.bias, moments)


def affine_moments(weight: torch.Tensor, bias: torch.Tensor | None, moments: Moments) -> Moments:
    """Moments of ``x @ weight.T + bias`` for independent input features."""
    weight = weight.detach()
    mean = weight @ moments[0] + (bias.detach() if bias is not None else 0.0)
    return mean, weight.pow(2) @ moments[1]


def normalized_moments(
    moments: Moments, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float, positions_shared: bool,
) -> Moments:  # fmt: skip
    """LayerNorm (one group over the channels, ``positions_shared`` False) or GroupNorm
    (``groups`` groups over their channels and positions): see the module docstring."""
    mean, var = moments
    channels = len(mean)
    m, v = mean.view(groups, -1), var.view(groups, -1)
    per_group = m.shape[1]
    shrink = 1.0 if positions_shared else 1 - 1 / per_group
    centre = m.mean(1, keepdim=True)
    spread = (v * shrink).mean(1, keepdim=True) + (m - centre).pow(2).mean(1, keepdim=True)
    scale = (spread + eps).sqrt()
    out_mean = ((m - centre) / scale).flatten()
    out_var = (v * shrink / scale.pow(2)).flatten()
    if weight is not None:
        out_mean, out_var = out_mean * weight.detach(), out_var * weight.detach().pow(2)
    if bias is not None:
        out_mean = out_mean + bias.detach()
    assert len(out_mean) == channels
    return out_mean, out_var


def parameter_moments(tensor: torch.Tensor, axis: int, channels: int, rank: int) -> Moments | None:
    """A parameter's values along all axes but ``axis``, as a distribution per channel, its
    shape broadcast (right-aligned) to ``rank`` dimensions."""
    if tensor.dim() > rank:
        return None
    tensor = tensor.reshape((1,) * (rank - tensor.dim()) + tuple(tensor.shape))
    if tensor.shape[axis] not in (1, channels):
        return None
    tensor = tensor.expand(*tensor.shape[:axis], channels, *tensor.shape[axis + 1 :])
    values = tensor.detach().float().movedim(axis, 0).reshape(channels, -1)
    return values.mean(1), values.var(1, unbiased=False)


class Propagation:
    """One pass over a traced, BN-folded graph; ``layers`` collects every conv/linear
    output's moments by module name (layers inside torch.nn leaves included)."""

    def __init__(self, graph: torch.fx.GraphModule, strict: bool) -> None:
        self.graph, self.strict = graph, strict
        self.modules = dict(graph.named_modules())
        self.values: dict[torch.fx.Node, Any] = {}
        self.layers: dict[str, Moments] = {}
        self.axes: dict[str, int] = {}
        """Each layer's output channel axis (the last for a linear layer on tokens)."""

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def shape(node: torch.fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def stat(self, value: Any) -> Stat | None:
        found = self.values.get(value) if isinstance(value, torch.fx.Node) else None
        return found if isinstance(found, Stat) else None

    def linear(self, name: str, module: nn.Linear, x: Stat) -> Stat:
        self.layers[name], self.axes[name] = linear_moments(module, x.moments), x.axis
        return x.like(self.layers[name])

    def activation(self, function: Any, x: Stat) -> Stat:
        if function in CLAMP_CALLS:
            return x.like(clamped_gaussian(x.moments, *CLAMP_CALLS[function]))
        if isinstance(function, nn.ReLU):
            return x.like(clamped_gaussian(x.moments, 0.0, math.inf))
        if type(function) in ELEMENTWISE_MODULES:
            return x.like(elementwise_moments(ELEMENTWISE_MODULES[type(function)](function),
                                              x.moments))  # fmt: skip
        return x.like(elementwise_moments(function, x.moments))

    def attention(self, name: str, module: nn.MultiheadAttention, x: Stat) -> Stat:
        embed = module.embed_dim
        if module._qkv_same_embed_dim:
            weight = module.in_proj_weight[2 * embed :]
        else:
            weight = module.v_proj_weight
        bias = module.in_proj_bias[2 * embed :] if module.in_proj_bias is not None else None
        v = x.like(affine_moments(weight, bias, x.moments))  # softmax(qk^T) v keeps v's moments
        # No target for out_proj: the module's functional forward reads its weight without
        # calling it, so a hook there would never see its output.
        return x.like(linear_moments(module.out_proj, v.moments))

    @staticmethod
    def add(a: Stat, b: Stat, sign: float = 1.0) -> Stat:
        return a.like((a.mean + sign * b.mean, a.var + b.var))

    def layer_norm(self, module: nn.LayerNorm, x: Stat) -> Stat:
        return x.like(normalized_moments(x.moments, 1, module.weight, module.bias, module.eps,
                                         positions_shared=False))  # fmt: skip

    def encoder_layer(self, name: str, layer: nn.TransformerEncoderLayer, x: Stat) -> Stat:
        def attend(h: Stat) -> Stat:
            return self.attention(f"{name}.self_attn", layer.self_attn, h)

        def feed_forward(h: Stat) -> Stat:
            h = self.activation(layer.activation, self.linear(f"{name}.linear1", layer.linear1, h))
            return self.linear(f"{name}.linear2", layer.linear2, h)

        if layer.norm_first:
            x = self.add(x, attend(self.layer_norm(layer.norm1, x)))
            return self.add(x, feed_forward(self.layer_norm(layer.norm2, x)))
        x = self.layer_norm(layer.norm1, self.add(x, attend(x)))
        return self.layer_norm(layer.norm2, self.add(x, feed_forward(x)))

    # -- rules -----------------------------------------------------------------------------
    def module_rule(self, node: torch.fx.Node, x: Stat | None, source) -> Any:
        module = self.modules[node.target]
        shape = self.shape(node)
        if isinstance(module, Normalize):
            return Stat(torch.zeros(shape[1]), torch.ones(shape[1]), 1)
        marker = self.values.get(source) if source is not None else None
        if isinstance(module, PASS_THROUGH_MODULES) and marker in (SCORES, WEIGHTS):
            return marker  # dropout on attention weights (timm's attn_drop)
        if x is None:
            return None
        if isinstance(module, nn.Conv2d) and x.axis == 1:
            self.layers[node.target] = conv_moments(module, x.moments)
            self.axes[node.target] = 1
            return x.like(self.layers[node.target])
        if isinstance(module, nn.Linear) and x.axis == len(self.shape(source)) - 1:
            return self.linear(node.target, module, x)
        if isinstance(module, nn.ReLU6 | nn.Hardtanh):
            low, high = (
                (0.0, 6.0) if isinstance(module, nn.ReLU6) else (module.min_val, module.max_val)
            )
            return x.like(clamped_gaussian(x.moments, low, high))
        if isinstance(module, nn.ReLU) or type(module) in ELEMENTWISE_MODULES:
            return self.activation(module, x)
        if isinstance(module, PASS_THROUGH_MODULES):
            return x
        if isinstance(module, nn.MaxPool2d | nn.AvgPool2d | nn.AdaptiveAvgPool2d) and x.axis == 1:
            return self.pooled(x, source, node, isinstance(module, nn.MaxPool2d))
        if isinstance(module, nn.Flatten):
            return self.flatten(x, source, module.start_dim, module.end_dim)
        last = x.axis == len(shape) - 1
        if isinstance(module, nn.LayerNorm) and last and module.normalized_shape == (len(x.mean),):
            return self.layer_norm(module, x)
        if isinstance(module, nn.GroupNorm) and x.axis == 1:
            return x.like(
                normalized_moments(
                    x.moments,
                    module.num_groups,
                    module.weight,
                    module.bias,
                    module.eps,
                    positions_shared=True,
                )
            )
        if isinstance(module, nn.MultiheadAttention) and x.axis == len(shape) - 1:
            return (self.attention(node.target, module, x), None)
        if isinstance(module, nn.TransformerEncoderLayer) and x.axis == len(shape) - 1:
            return self.encoder_layer(node.target, module, x)
        if isinstance(module, nn.TransformerEncoder) and x.axis == len(shape) - 1:
            for index, layer in enumerate(module.layers):
                x = self.encoder_layer(f"{node.target}.layers.{index}", layer, x)
            return self.layer_norm(module.norm, x) if module.norm is not None else x
        return None

    def pooled(self, x: Stat, source, node, maximum: bool) -> Stat:
        n = math.prod(self.shape(source)) // max(1, math.prod(self.shape(node)))
        if maximum:
            shift, scale = max_of_gaussians(max(n, 1))
            return x.like((x.mean + x.var.sqrt() * shift, x.var * scale))
        return x.like((x.mean, x.var / max(n, 1)))

    def flatten(self, x: Stat, source, start: int, end: int) -> Stat | None:
        rank = len(self.shape(source))
        start, end = start % rank, end % rank
        if x.axis < start:
            return x
        if x.axis > end:
            return x.like(x.moments, x.axis - (end - start))
        if x.axis != start:
            return None  # channels inside a merged block, not leading it
        positions = math.prod(self.shape(source)[start + 1 : end + 1])
        return x.like((x.mean.repeat_interleave(positions), x.var.repeat_interleave(positions)))

    def function_rule(self, node: torch.fx.Node, x: Stat | None, source) -> Any:
        target, args = node.target, node.args
        method = node.op == "call_method"
        if not method and target in (*ADD_CALLS, *SUB_CALLS, *MUL_CALLS, *DIV_CALLS):
            return self.binary(node)
        if not method and target in CONCAT_CALLS:
            return self.concat(node)
        if (not method and target in MATMUL_CALLS) or (method and target == "matmul"):
            return self.matmul(node)
        if target is operator.getitem:
            return self.getitem(node)
        constant = self.values.get(source) if source is not None else None
        if method and target in (*PASS_THROUGH_METHODS, "expand") and torch.is_tensor(constant):
            return constant  # a parameter broadcast (a class token): the same distribution
        if (method and target == "softmax") or target in (torch.softmax, nn.functional.softmax):
            return WEIGHTS if self.values.get(args[0]) is SCORES else None
        if x is None:
            return None
        if not method and (target in CLAMP_CALLS or target in ELEMENTWISE_CALLS):
            return self.activation(ELEMENTWISE_CALLS.get(target, target), x)
        if not method and target is nn.functional.adaptive_avg_pool2d and x.axis == 1:
            return self.pooled(x, source, node, maximum=False)
        if (method and target in PASS_THROUGH_METHODS) or (method and target == "expand"):
            return x
        shape, before = self.shape(node), self.shape(source)
        if (method and target == "mean") or target is torch.mean:
            if shape is not None and x.axis < len(shape) and shape[x.axis] == len(x.mean):
                return self.pooled(x, source, node, maximum=False)
            if shape is not None and len(shape) == len(before) - 2 and x.axis == 1:
                return self.pooled(x, source, node, maximum=False)  # (N, C, H, W) -> (N, C)
            return None
        if target in ("flatten", torch.flatten):
            start = node.kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            end = node.kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
            return self.flatten(x, source, start, end)
        if target in ("permute", torch.permute, "transpose", torch.transpose):
            return self.moved(x, target, args, len(before))
        if target in ("reshape", "view", torch.reshape, "unflatten", torch.unflatten):
            return self.reshape(x, before, shape) or self.regroup(x, before, shape)
        return None

    def matmul(self, node: torch.fx.Node) -> Any:
        left, right = self.values.get(node.args[0]), self.values.get(node.args[1])
        if left is WEIGHTS and isinstance(right, Stat):
            return right
        if isinstance(left, Stat) and isinstance(right, Stat):
            return SCORES
        return None

    def grouped_rule(self, node: torch.fx.Node, x: Stat, source) -> Any:
        """The few operations attention applies to channels split over heads: moving and
        merging the axes, scaling, the products with the other operand."""
        target, args, method = node.target, node.args, node.op == "call_method"
        if node.op == "call_module":
            return x if isinstance(self.modules[target], PASS_THROUGH_MODULES) else None
        if (not method and target in MATMUL_CALLS) or (method and target == "matmul"):
            return self.matmul(node)
        if not method and target in (*MUL_CALLS, *DIV_CALLS):
            other = args[1] if self.values.get(args[0]) is x else args[0]
            return self.binary(node) if isinstance(other, int | float) else None
        if method and target in PASS_THROUGH_METHODS:
            return x
        before, after = self.shape(source), self.shape(node)
        if target in ("unbind", torch.unbind) and before is not None:
            dim = node.kwargs.get("dim", args[1] if len(args) > 1 else 0) % len(before)
            return self.split_outer(x, dim, before[dim])
        if target is operator.getitem and isinstance(args[1], int) and before is not None:
            parts = self.split_outer(x, 0, before[0])  # timm's qkv[0]
            return parts[args[1]] if parts is not None else None
        if before is None or after is None:
            return None
        if target in ("reshape", "view", "flatten", "unflatten", torch.reshape, torch.flatten):
            return self.regroup(x, before, after)
        if target in ("permute", torch.permute, "transpose", torch.transpose):
            return self.moved(x, target, args, len(before))
        return None

    @staticmethod
    def moved(x: Stat, target: Any, args: tuple, rank: int) -> Stat:
        """Where a permute or transpose puts the channel axes."""
        if target in ("permute", torch.permute):
            dims = args[1] if len(args) == 2 and isinstance(args[1], list | tuple) else args[1:]
            dims = [d % rank for d in dims]
            return x.on_axes(tuple(dims.index(a) for a in x.axes))
        a, b = (d % rank for d in args[1:3])
        return x.on_axes(tuple({a: b, b: a}.get(axis, axis) for axis in x.axes))

    @staticmethod
    def split_outer(x: Stat, dim: int, size: int) -> tuple[Stat, ...] | None:
        """The parts of channels split along their outermost axis ``dim`` (a fused q/k/v
        projection's three), each on the remaining axes."""
        if x.axes[0] != dim or len(x.axes) < 2 or len(x.mean) % size:
            return None
        per = len(x.mean) // size
        rest = tuple(a - (a > dim) for a in x.axes[1:])
        return tuple(
            Stat(x.mean[i * per : (i + 1) * per], x.var[i * per : (i + 1) * per], 0).on_axes(rest)
            for i in range(size)
        )

    @staticmethod
    def regroup(x: Stat, before: tuple[int, ...], after: tuple[int, ...]) -> Stat | None:
        """Where channels on consecutive axes land after a reshape that keeps the elements
        before them in place: on the axes whose sizes multiply to the channel count (split over
        heads, or merged back)."""
        axes = x.axes
        if axes != tuple(range(axes[0], axes[0] + len(axes))):
            return None
        leading = math.prod(before[: axes[0]])
        count, start = 1, 0
        while start < len(after) and count < leading:
            count *= after[start]
            start += 1
        channels, end = 1, start
        while end < len(after) and channels < len(x.mean):
            channels *= after[end]
            end += 1
        if count != leading or channels != len(x.mean) or end == start:
            return None
        return x.on_axes(tuple(range(start, end)))

    def reshape(self, x: Stat, before: tuple[int, ...], after: tuple[int, ...]) -> Stat | None:
        """Where the channel axis survives a reshape (the elements before it keep their
        count), its new position; a full flatten repeats each channel's moments."""
        leading = math.prod(before[: x.axis])
        count, position = 1, 0
        while position < len(after) and count < leading:
            count *= after[position]
            position += 1
        if count == leading and position < len(after) and after[position] == before[x.axis]:
            return x.like(x.moments, position)
        if len(after) == 2 and after[0] == before[0] and x.axis == 1:  # a full flatten
            positions = after[1] // len(x.mean)
            return x.like((x.mean.repeat_interleave(positions), x.var.repeat_interleave(positions)))
        return None

    def operand(self, value: Any, like: Stat, rank: int) -> Stat | float | None:
        """An operand of a binary op as moments on ``like``'s axis (a parameter's values taken
        as a distribution), a number, or None."""
        if isinstance(value, int | float):
            return float(value)
        found = self.values.get(value) if isinstance(value, torch.fx.Node) else None
        if isinstance(found, Stat):
            return found
        if isinstance(found, torch.Tensor):
            moments = parameter_moments(found, like.axis, len(like.mean), rank)
            return like.like(moments) if moments is not None else None
        return None

    def binary(self, node: torch.fx.Node) -> Any:
        left, right = node.args[:2]
        numbers = [isinstance(a, int | float) for a in (left, right)]
        if SCORES in (self.values.get(left), self.values.get(right)) and any(numbers):
            return SCORES  # attention scores scaled
        anchor = self.stat(left) or self.stat(right)
        if anchor is None:
            return None
        if node.target in DIV_CALLS:
            if not isinstance(right, int | float) or right == 0:
                return None
            return anchor.like((anchor.mean / right, anchor.var / right**2))
        rank = len(self.shape(node))
        a, b = self.operand(left, anchor, rank), self.operand(right, anchor, rank)
        if a is None or b is None:
            return None
        if isinstance(a, Stat) and isinstance(b, Stat) and a.axes != b.axes:
            return None
        subtract, multiply = node.target in SUB_CALLS, node.target in MUL_CALLS
        if isinstance(a, float) or isinstance(b, float):
            tensor, number = (a, b) if isinstance(b, float) else (b, a)
            if multiply:
                return tensor.like((tensor.mean * number, tensor.var * number**2))
            sign = -1.0 if subtract and tensor is b else 1.0
            offset = -number if subtract and tensor is a else number
            return tensor.like((sign * tensor.mean + offset, tensor.var))
        if multiply:
            return a.like(product_moments(a.moments, b.moments))
        return self.add(a, b, -1.0 if subtract else 1.0)

    def concat(self, node: torch.fx.Node) -> Stat | None:
        parts = list(node.args[0])
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        anchor = next((self.stat(p) for p in parts if self.stat(p) is not None), None)
        shape = self.shape(node)
        if anchor is None or shape is None:
            return None
        dim %= len(shape)
        if dim == anchor.axis:
            stats = [self.stat(p) for p in parts]
            if any(s is None for s in stats):
                return None
            return anchor.like(tuple(torch.cat([s.moments[i] for s in stats]) for i in (0, 1)))
        stats = [self.operand(p, anchor, len(shape)) for p in parts]
        sizes = [self.shape(p)[dim] if self.shape(p) else None for p in parts]
        if any(not isinstance(s, Stat) for s in stats) or None in sizes:
            return None
        total = sum(sizes)  # a mixture of the parts along the concatenated axis
        mean = sum(s.mean * n for s, n in zip(stats, sizes, strict=True)) / total
        second = sum((s.var + s.mean.pow(2)) * n for s, n in zip(stats, sizes, strict=True))
        return anchor.like((mean, (second / total - mean.pow(2)).clamp_min(0)))

    def getitem(self, node: torch.fx.Node) -> Any:
        container, index = node.args
        found = self.values.get(container)
        if isinstance(found, tuple):
            return found[index] if isinstance(index, int) else None
        if not isinstance(found, Stat):
            return None
        index = index if isinstance(index, tuple) else (index,)
        if Ellipsis in index or None in index or len(index) > found.axis + 1:
            return None
        if len(index) == found.axis + 1 and index[-1] != slice(None):
            return None  # the channels themselves are picked
        dropped = sum(isinstance(i, int) for i in index[: found.axis])
        return found.like(found.moments, found.axis - dropped)

    # -- the pass --------------------------------------------------------------------------
    def unsupported(self, node: torch.fx.Node) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"weight statistics cannot be propagated through {node.op} {node.target!r} "
            f"(node {node.name}); supported: conv, linear, clamps, elementwise activations "
            "(GELU, SiLU, Hardswish, sigmoid, tanh...), pooling, LayerNorm, GroupNorm, "
            "attention (nn.MultiheadAttention, nn.TransformerEncoder, softmax(q k^T) v with "
            "heads, a fused qkv linear), "
            "flatten, permute, transpose, reshape, addition, multiplication, concatenation, "
            "dropout. Use another preset (e.g. adversarial or noise)."
        )

    def run(self, input_shape: tuple[int, ...]) -> dict[str, Moments]:
        ShapeProp(self.graph).propagate(torch.zeros(1, *input_shape))
        for node in self.graph.graph.nodes:
            if node.op == "output":
                continue
            if node.op == "placeholder":
                channels = self.shape(node)[1]
                self.values[node] = Stat(torch.zeros(channels), torch.ones(channels), 1)
                continue
            if node.op == "get_attr":
                self.values[node] = _attribute(self.graph, node.target)
                continue
            source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
            x = self.stat(source)
            if x is not None and x.group:
                result = self.grouped_rule(node, x, source)
            elif node.op == "call_module":
                result = self.module_rule(node, x, source)
            else:
                result = self.function_rule(node, x, source)
            if result is None:
                result = self.fallback(node, x, source)
            self.values[node] = result
        return self.layers

    def fallback(self, node: torch.fx.Node, x: Stat | None, source) -> Any:
        shape = self.shape(node)
        if shape is None and node.op != "call_module":
            return None  # a size, a shape: no tensor to follow
        before = self.shape(source) if source is not None else None
        keeps = (
            x is not None and shape is not None and before is not None
            and len(shape) == len(before) and max(x.axes) < len(shape)
            and math.prod(shape[a] for a in x.axes) == len(x.mean)
        )  # fmt: skip
        layer = node.op == "call_module" and isinstance(
            self.modules[node.target], nn.Conv2d | nn.Linear
        )  # one whose channels are not where it reads them: no moments to pass on
        if self.strict or not keeps or layer:
            raise self.unsupported(node)
        log.warning(
            "weight statistics: no rule for %s %r (node %s); its input's moments pass through "
            "unchanged (an approximation)", node.op, node.target, node.name,
        )  # fmt: skip
        return x


def _attribute(graph: torch.fx.GraphModule, target: str) -> Any:
    owner_name, _, attribute = target.rpartition(".")
    owner = graph.get_submodule(owner_name) if owner_name else graph
    return getattr(owner, attribute)


def propagate(
    graph: torch.fx.GraphModule, input_shape: tuple[int, ...], strict: bool = False
) -> dict[str, Moments]:
    """Predicted output moments of every conv/linear layer of a BN-folded graph, by name
    (layers inside ``nn.MultiheadAttention`` and ``nn.TransformerEncoder`` leaves too).

    An operation without a rule passes its input's moments on unchanged, with a warning naming
    it, when its output keeps the input's channels; with ``strict``, or where the channels
    change, it is refused."""
    return Propagation(graph, strict).run(input_shape)
