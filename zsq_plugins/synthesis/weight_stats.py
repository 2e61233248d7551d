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
  average pooling: mean kept, variance divided by n; addition: means and variances add;
  flatten repeats each channel's moments.

The predicted mean and standard deviation of every conv/linear output are targets the engine
matches (``SynthesisConfig(statistics="weights")``), read at that layer's output, or at its
BatchNorm's output when BN follows; the ``weight-stats`` preset uses them. Measured on
vgg_nobn_fmnist, the means follow real data closely while deep layers' variances are
underestimated (channels are correlated, and the rule takes them as independent).
"""

from __future__ import annotations

import math
import operator
from functools import cache

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from zsq_plugins.errors import UnsupportedModelError
from zsq_plugins.layers import Normalize
from zsq_plugins.quant.fold import fold_batchnorm, trace
from zsq_plugins.synthesis.hooks import StatisticsTarget

Moments = tuple[torch.Tensor, torch.Tensor]  # (mean, variance) per channel or feature

PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout)
FLATTEN_CALLS = (torch.flatten,)
ADD_CALLS = (operator.add, torch.add)
RELU_CALLS = {torch.relu: (0.0, math.inf), nn.functional.relu: (0.0, math.inf),
              nn.functional.relu6: (0.0, 6.0)}  # fmt: skip


def _normal_pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def clamped_gaussian(moments: Moments, low: float, high: float) -> Moments:
    """Mean and variance of clamp(Y, low, high) for Y ~ N(mean, var), per channel."""
    mean, var = moments
    std = var.clamp_min(1e-12).sqrt()
    alpha = (low - mean) / std
    beta = (high - mean) / std if math.isfinite(high) else torch.full_like(mean, math.inf)
    cdf_a, cdf_b = _normal_cdf(alpha), _normal_cdf(beta)
    pdf_a = _normal_pdf(alpha)
    pdf_b = torch.where(torch.isfinite(beta), _normal_pdf(beta), torch.zeros_like(beta))
    beta_pdf = torch.where(torch.isfinite(beta), beta * pdf_b, torch.zeros_like(beta))
    upper = 0.0 if not math.isfinite(high) else high
    first = low * cdf_a + upper * (1 - cdf_b) + mean * (cdf_b - cdf_a) + std * (pdf_a - pdf_b)
    second = (
        low**2 * cdf_a
        + upper**2 * (1 - cdf_b)
        + (mean**2 + var) * (cdf_b - cdf_a)
        + 2 * mean * std * (pdf_a - pdf_b)
        + var * (alpha * pdf_a - beta_pdf)
    )
    return first, (second - first**2).clamp_min(0.0)


@cache
def max_of_gaussians(n: int) -> tuple[float, float]:
    """Mean and variance of the maximum of n independent standard normals (Monte Carlo with a
    fixed seed, 10^6 draws: exact enough for targets, and reproducible)."""
    draws = torch.randn(1_000_000, n, generator=torch.Generator().manual_seed(0))
    maxima = draws.max(dim=1).values
    return float(maxima.mean()), float(maxima.var())


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


def propagate(graph: torch.fx.GraphModule, input_shape: tuple[int, ...]) -> dict[str, Moments]:
    """Predicted output moments of every conv/linear layer of a BN-folded graph, by name."""
    ShapeProp(graph).propagate(torch.zeros(1, *input_shape))
    modules = dict(graph.named_modules())
    values: dict[torch.fx.Node, Moments] = {}
    layers: dict[str, Moments] = {}

    def unsupported(node: torch.fx.Node) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"weight statistics cannot be propagated through {node.op} {node.target!r} "
            f"(node {node.name}); supported: conv, linear, ReLU/ReLU6/Hardtanh, pooling, "
            "flatten, addition, dropout. Use another preset (e.g. adversarial or noise)."
        )

    for node in graph.graph.nodes:
        if node.op in ("get_attr", "output"):
            continue
        if node.op == "placeholder":
            channels = _shape(node)[1]
            values[node] = (torch.zeros(channels), torch.ones(channels))
            continue
        source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        incoming = values.get(source) if source is not None else None
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, Normalize):
                channels = _shape(node)[1]
                values[node] = (torch.zeros(channels), torch.ones(channels))
            elif incoming is None:
                raise unsupported(node)
            elif isinstance(module, nn.Conv2d):
                values[node] = layers[node.target] = _conv_moments(module, incoming)
            elif isinstance(module, nn.Linear):
                values[node] = layers[node.target] = _linear_moments(module, incoming)
            elif isinstance(module, nn.ReLU):
                values[node] = clamped_gaussian(incoming, 0.0, math.inf)
            elif isinstance(module, nn.ReLU6):
                values[node] = clamped_gaussian(incoming, 0.0, 6.0)
            elif isinstance(module, nn.Hardtanh):
                values[node] = clamped_gaussian(incoming, module.min_val, module.max_val)
            elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d | nn.AdaptiveAvgPool2d):
                n = math.prod(_shape(source)[2:]) // max(1, math.prod(_shape(node)[2:]))
                mean, var = incoming
                if isinstance(module, nn.MaxPool2d):
                    shift, scale = max_of_gaussians(max(n, 1))
                    values[node] = (mean + var.sqrt() * shift, var * scale)
                else:
                    values[node] = (mean, var / max(n, 1))
            elif isinstance(module, nn.Flatten):
                values[node] = _flatten(incoming, _shape(source))
            elif isinstance(module, PASS_THROUGH_MODULES):
                values[node] = incoming
            else:
                raise unsupported(node)
        elif node.op == "call_function" and node.target in ADD_CALLS:
            left, right = node.args[:2]
            if isinstance(left, torch.fx.Node) and isinstance(right, torch.fx.Node):
                values[node] = (
                    values[left][0] + values[right][0],
                    values[left][1] + values[right][1],
                )
            else:
                tensor, number = (left, right) if isinstance(left, torch.fx.Node) else (right, left)
                values[node] = (values[tensor][0] + float(number), values[tensor][1])
        elif node.op == "call_function" and node.target in RELU_CALLS and incoming is not None:
            values[node] = clamped_gaussian(incoming, *RELU_CALLS[node.target])
        elif incoming is not None and (
            (node.op == "call_function" and node.target in FLATTEN_CALLS)
            or (node.op == "call_method" and node.target in ("flatten", "view", "reshape"))
        ):
            values[node] = _flatten(incoming, _shape(source))
        else:
            raise unsupported(node)
    return layers


def _flatten(moments: Moments, shape: tuple[int, ...]) -> Moments:
    positions = math.prod(shape[2:]) if len(shape) > 2 else 1
    return moments[0].repeat_interleave(positions), moments[1].repeat_interleave(positions)


def weight_statistics_targets(
    model: nn.Module, input_shape: tuple[int, ...]
) -> list[StatisticsTarget]:
    """Targets for every conv/linear output of ``model``, derived from its weights.

    Computed on the BN-folded graph; a layer followed by BatchNorm is read at the BN's output
    (the folded conv's output), so the rule also runs on BN models, ignoring their BN statistics.
    """
    predicted = propagate(fold_batchnorm(model).cpu(), input_shape)
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
