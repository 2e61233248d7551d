"""The synthesis objective: BatchNorm-statistics matching and its diversity terms.

Terms (weights on SynthesisConfig):
- batch statistics vs BN running statistics (ZeroQ, Genie);
- per-sample statistics vs BN statistics, with one randomly emphasized layer per sample
  (DSG's layerwise sample enhancement);
- slack alignment (DSG): no push inside a margin derived from the model (expected_deviation);
- decorrelation of samples' penultimate features; an input prior; random-label cross-entropy;
- ZAQ's discrepancy with a quantized opponent (discrepancy.py), maximized: negative weights.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from zsq_plugins.synthesis.config import Distance, SynthesisConfig
from zsq_plugins.synthesis.discrepancy import relation_map
from zsq_plugins.synthesis.hooks import ChannelStatistics, StatisticsTarget


def distance(value: torch.Tensor, target: torch.Tensor, kind: Distance) -> torch.Tensor:
    """Distance over the last (channel) dimension; leading dimensions are kept."""
    diff = value - target
    if kind is Distance.MSE:
        return diff.pow(2).mean(-1)
    return diff.norm(dim=-1)


def channel_margins(std: torch.Tensor, count: int, of_std: bool) -> torch.Tensor:
    """``expected_deviation`` per channel: each channel's own expected fluctuation,
    ``std_c / sqrt(count)`` for a mean and ``std_c / sqrt(2 count)`` for a std."""
    return std / math.sqrt(count * (2.0 if of_std else 1.0))


def expected_deviation(std: torch.Tensor, count: int, kind: Distance, of_std: bool) -> float:
    """Expected distance between a statistic estimated from ``count`` values per channel and
    its population value, if those values were independent draws with per-channel ``std``.

    Mean: each channel's estimate deviates with variance std^2 / count; std: about
    std^2 / (2 count). Real activations are spatially correlated, so their statistics
    fluctuate more than this: as a slack margin (DSG) it is a conservative, model-derived
    scale, multiplied by ``SynthesisConfig.slack``.
    """
    variance = channel_margins(std, count, of_std).pow(2)
    if kind is Distance.MSE:
        return float(variance.mean())
    return float(math.sqrt(float(variance.sum())))


def _slacked(value: torch.Tensor, margin: float) -> torch.Tensor:
    return F.relu(value - margin) if margin > 0 else value


def _floor_only(std: torch.Tensor, target: torch.Tensor, floor: bool) -> torch.Tensor:
    """With ``floor``, a deviation above its target counts as on target: only a shortfall
    is pushed (SynthesisConfig.std_floor)."""
    return torch.minimum(std, target) if floor else std


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Random choices fixed for one batch: emphasized layer per sample, random labels."""

    emphasized_layer: torch.Tensor  # (N,) layer index per sample
    labels: torch.Tensor  # (N,)


def plan_batch(
    size: int, num_layers: int, num_classes: int, generator: torch.Generator
) -> BatchPlan:
    return BatchPlan(
        emphasized_layer=torch.randint(0, max(num_layers, 1), (size,), generator=generator),
        labels=torch.randint(0, num_classes, (size,), generator=generator),
    )


def _aligned(
    value: torch.Tensor,
    target: torch.Tensor,
    target_std: torch.Tensor,
    count: int,
    of_std: bool,
    config: SynthesisConfig,
) -> torch.Tensor:
    """Distance of a statistic to its target, minus DSG's slack: either from the distance
    over all channels (``slack_per_channel=False``) or from each channel's deviation before
    the distance is taken (True, as DSG's code applies its margin element by element)."""
    kind = config.bn_distance
    if config.slack > 0 and config.slack_per_channel:
        margin = config.slack * channel_margins(target_std, count, of_std)
        residual = F.relu((value - target).abs() - margin)
        return distance(residual, torch.zeros_like(residual), kind)
    margin = config.slack * expected_deviation(target_std, count, kind, of_std)
    return _slacked(distance(value, target, kind), margin)


def bn_loss_terms(
    stats: list[ChannelStatistics],
    targets: list[StatisticsTarget],
    config: SynthesisConfig,
    plan: BatchPlan,
) -> dict[str, torch.Tensor]:
    """Batch and per-sample statistics terms, summed over layers."""
    terms: dict[str, torch.Tensor] = {}
    if config.bn_batch_weight > 0:
        total = stats[0].batch_mean.new_zeros(())
        for stat, target in zip(stats, targets, strict=True):
            count = stat.positions * stat.sample_mean.shape[0]
            batch_std = _floor_only(stat.batch_std, target.std, config.std_floor)
            total = total + _aligned(stat.batch_mean, target.mean, target.std, count, False, config)
            total = total + _aligned(batch_std, target.std, target.std, count, True, config)
        terms["bn_batch"] = total
    if config.bn_sample_weight > 0:
        per_layer = []
        for stat, target in zip(stats, targets, strict=True):
            sample_std = _floor_only(stat.sample_std, target.std, config.std_floor)
            per_layer.append(
                _aligned(stat.sample_mean, target.mean, target.std, stat.positions, False, config)
                + _aligned(sample_std, target.std, target.std, stat.positions, True, config)
            )
        losses = torch.stack(per_layer, dim=1)  # (N, layers)
        sample_term = losses.sum(1).mean()
        if config.layer_emphasis > 0:
            chosen = losses.gather(1, plan.emphasized_layer.to(losses.device)[:, None])
            sample_term = sample_term + config.layer_emphasis * chosen.mean()
        terms["bn_sample"] = sample_term
    return terms


def input_prior(z: torch.Tensor, kind: Distance) -> torch.Tensor:
    """Each sample's per-channel mean and std in normalized space pulled to 0 and 1."""
    var, mean = torch.var_mean(z.flatten(2), dim=2, correction=0)
    std = torch.sqrt(var + 1e-8)
    return (
        distance(mean, torch.zeros_like(mean), kind) + distance(std, torch.ones_like(std), kind)
    ).mean()


def decorrelation(features: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity between different samples' features."""
    similarity = relation_map(features)
    n = similarity.shape[0]
    if n < 2:
        return similarity.new_zeros(())
    off_diagonal = similarity - torch.diag_embed(torch.diagonal(similarity))
    return off_diagonal.pow(2).sum() / (n * (n - 1))


def total_objective(
    config: SynthesisConfig,
    stats: list[ChannelStatistics],
    targets: list[StatisticsTarget],
    z: torch.Tensor,
    logits: torch.Tensor,
    features: torch.Tensor | None,
    plan: BatchPlan,
    discrepancies: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted objective and its unweighted terms (for logging). ``discrepancies``
    (``output``/``relation`` against an opponent) are maximized: they enter negated."""
    terms = bn_loss_terms(stats, targets, config, plan) if stats else {}
    weights = {"bn_batch": config.bn_batch_weight, "bn_sample": config.bn_sample_weight}
    if config.input_prior_weight > 0:
        terms["input"] = input_prior(z, config.bn_distance)
        weights["input"] = config.input_prior_weight
    if config.decorrelation_weight > 0 and features is not None:
        terms["decorrelation"] = decorrelation(features)
        weights["decorrelation"] = config.decorrelation_weight
    if config.output_weight > 0:
        terms["output"] = F.cross_entropy(logits, plan.labels.to(logits.device))
        weights["output"] = config.output_weight
    for name, weight in (
        ("discrepancy", config.discrepancy_weight),
        ("relation", config.relation_weight),
    ):
        if weight > 0 and discrepancies is not None and name in discrepancies:
            terms[name] = discrepancies[name]
            weights[name] = -weight
    if not terms:
        raise ValueError("the synthesis objective has no active term; set a weight above 0")
    total = sum(weights[name] * value for name, value in terms.items())
    assert isinstance(total, torch.Tensor)
    return total, {name: float(value.detach()) for name, value in terms.items()}
