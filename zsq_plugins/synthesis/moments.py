"""Moments of a Gaussian through the elementwise functions of a network, for the weight-statistics
propagation (weight_stats.py): a channel's values are taken as N(mean, variance).

- clamps (ReLU, ReLU6, Hardtanh): exact moments of a clamped Gaussian;
- any other elementwise function f (GELU, SiLU, Hardswish, sigmoid, tanh, hard sigmoid, leaky
  ReLU, ELU...): E[f(Y)] and Var[f(Y)] by Gauss-Hermite quadrature (``QUADRATURE_NODES``
  nodes: exact for polynomials of degree below twice that, within 1e-3 of sampling for these
  smooth or piecewise-linear functions);
- the maximum of n independent Gaussians (max pooling), by seeded sampling;
- products of two tensors (squeeze-excite gates, layer scales), taken as independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import numpy as np
import torch

Moments = tuple[torch.Tensor, torch.Tensor]  # (mean, variance) per channel or feature

QUADRATURE_NODES = 48
"""Gauss-Hermite nodes of ``elementwise_moments``."""


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


@cache
def _hermite() -> tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = np.polynomial.hermite.hermgauss(QUADRATURE_NODES)
    return torch.from_numpy(nodes).double(), torch.from_numpy(weights).double() / math.sqrt(math.pi)


def elementwise_moments(
    function: Callable[[torch.Tensor], torch.Tensor], moments: Moments
) -> Moments:
    """Mean and variance of ``function(Y)`` for Y ~ N(mean, var), per channel (Gauss-Hermite:
    E[f(Y)] = sum_i w_i f(mean + sqrt(2 var) x_i) / sqrt(pi))."""
    mean, var = (m.double() for m in moments)
    nodes, weights = _hermite()
    points = mean.unsqueeze(-1) + (2 * var.clamp_min(0)).sqrt().unsqueeze(-1) * nodes
    values = function(points)
    first = (values * weights).sum(-1)
    second = (values.pow(2) * weights).sum(-1)
    dtype = moments[0].dtype
    return first.to(dtype), (second - first.pow(2)).clamp_min(0).to(dtype)


def product_moments(left: Moments, right: Moments) -> Moments:
    """Mean and variance of X * Y for independent X and Y (broadcast channel by channel)."""
    (mean_x, var_x), (mean_y, var_y) = left, right
    mean = mean_x * mean_y
    second = (var_x + mean_x.pow(2)) * (var_y + mean_y.pow(2))
    return mean, (second - mean.pow(2)).clamp_min(0)
