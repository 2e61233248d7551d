"""Measurements of a set of images against a model: how well they match its BN statistics."""

from __future__ import annotations

import torch
from torch import nn

from zsq_plugins.synthesis.config import Distance
from zsq_plugins.synthesis.hooks import StatisticsCapture, batchnorm_targets
from zsq_plugins.synthesis.model_info import batchnorm_layers
from zsq_plugins.synthesis.objectives import distance


@torch.no_grad()
def bn_statistics_loss(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 128,
    kind: Distance | str = Distance.MSE,
) -> float:
    """Distance of batch statistics to the BN running statistics, summed over BN layers and
    averaged over batches of ``batch_size``: the quantity the BN presets minimize, so real
    data, noise and every preset can be put on one scale."""
    kind = Distance(kind)
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError("the model has no BatchNorm layer with running statistics")
    model.eval()
    totals = []
    capture = StatisticsCapture(batchnorm_targets(layers))
    with capture:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])
            total = 0.0
            for stat, target in zip(capture.collected(), capture.targets, strict=True):
                total += float(distance(stat.batch_mean, target.mean, kind))
                total += float(distance(stat.batch_std, target.std, kind))
            totals.append(total)
    return sum(totals) / len(totals)
