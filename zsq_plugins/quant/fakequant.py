"""Uniform affine quantization: quantize-dequantize and MSE-optimal clipping search."""

from __future__ import annotations

import torch

CLIP_SEARCH_STEPS = 100
"""Candidate clipping ratios tried by the MSE search (linear grid over (0, 1])."""


def integer_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """The integer levels of a ``bits``-wide grid; ``narrow`` drops a signed grid's most
    negative level so that it is symmetric about 0."""
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def affine_params(
    low: torch.Tensor, high: torch.Tensor, bits: int, symmetric: bool, narrow: bool = False
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scale and zero point covering [low, high] (which is widened to include 0).

    Symmetric: signed grid (``narrow``: without its most negative level), zero point 0,
    scale max|x| / qmax. Asymmetric: unsigned grid.
    """
    low = torch.minimum(low, torch.zeros_like(low))
    high = torch.maximum(high, torch.zeros_like(high))
    if symmetric:
        qmin, qmax = integer_range(bits, signed=True, narrow=narrow)
        scale = torch.maximum(-low, high) / qmax
        zero_point = torch.zeros_like(scale)
    else:
        qmin, qmax = integer_range(bits, signed=False)
        scale = (high - low) / (qmax - qmin)
        zero_point = torch.round(-low / scale.clamp_min(1e-12)).clamp(qmin, qmax)
    return scale.clamp_min(1e-12), zero_point, qmin, qmax


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize; ``axis`` for per-channel parameters."""
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero_point = scale.view(shape), zero_point.view(shape)
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def mse_clip_range(
    values: torch.Tensor, bits: int, symmetric: bool, steps: int = CLIP_SEARCH_STEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range [ratio * min, ratio * max] that minimizes the quantization MSE of
    ``values`` (a flat sample), searched over ``steps`` ratios in (0, 1]."""
    values = values.flatten().float()
    low, high = values.min(), values.max()
    best, best_range = None, (low, high)
    for step in range(1, steps + 1):
        ratio = step / steps
        candidate = (low * ratio, high * ratio)
        scale, zero_point, qmin, qmax = affine_params(*candidate, bits, symmetric)
        error = (fake_quantize(values, scale, zero_point, qmin, qmax) - values).pow(2).mean()
        if best is None or error < best:
            best, best_range = error, candidate
    return best_range
