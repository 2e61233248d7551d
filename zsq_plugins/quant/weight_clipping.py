"""Error-searched weight step sizes, per output channel, on the quantizer's own integer grid.

Each toolkit calibrates its weight quantizers by its own rule: at 4 bits on the full signed
grid, a channel's largest |w| lands on 7 steps in NNCF, 7.5 in torch.ao and 8 in Brevitas; at
2 bits on 1, 1.5 and 2. Those are all covering (min-max) steps, far from the step that
minimizes the rounding error at low bit widths, and each toolkit starts from a different one.
BRECQ and QDrop therefore start every weight quantizer from an error-minimizing step before
reconstruction (their ``scale_method='mse'``: the L_2.4 error over clipping ratios from 1.0
down to 0.21 of the covering range). This module does the same search through the adapter
handles, so reconstruction starts from the same step in every toolkit:

- the candidates: per channel, r * s0 for r = 1.00, 0.99, ..., 0.21, with s0 the smallest step
  that covers the channel's values on the grid at the quantizer's zero point (which is kept);
- the error: sum |Q(w) - w|^2.4 over the channel's weights (BRECQ's norm: between the MSE and
  a max-error criterion, it penalizes the large rounding errors of clipped weights more);
- a channel keeps the toolkit's own step when that one is already at least as good.
"""

from __future__ import annotations

import dataclasses

import torch

from zsq_plugins.adapter import QuantizedModel, QuantizerHandle
from zsq_plugins.capture import float_weights
from zsq_plugins.errors import ZSQError

WEIGHT_CLIP_RATIOS = tuple(1.0 - i / 100 for i in range(80))
"""Fractions of the covering step tried per channel (BRECQ/QDrop: 1.00 down to 0.21)."""
WEIGHT_ERROR_NORM = 2.4
"""p of the L_p rounding error the search minimizes (BRECQ/QDrop: 2.4)."""


@dataclasses.dataclass(frozen=True)
class WeightStepResult:
    layer: str
    channels: int
    changed: int
    """Channels whose step the search replaced (the others kept the toolkit's)."""
    error_before: float
    error_after: float
    """Summed L_p rounding error of the layer's weights with the toolkit's and the new steps."""


def _channel_rows(weight: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return weight.detach().float().reshape(1, -1)
    return weight.detach().float().movedim(axis, 0).reshape(weight.shape[axis], -1)


def _lp_error(
    rows: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
) -> torch.Tensor:
    levels = torch.clamp(torch.round(rows / scale) + zero_point, quant_min, quant_max)
    return ((levels - zero_point) * scale - rows).abs().pow(WEIGHT_ERROR_NORM).sum(1, keepdim=True)


def search_weight_scale(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None,
) -> tuple[torch.Tensor, int, float, float]:
    """(step, channels changed, error before, error after) for ``weight`` quantized on
    [quant_min, quant_max] with per-channel (``axis``) or per-tensor ``scale`` and
    ``zero_point``; the step has the shape of ``scale``."""
    rows = _channel_rows(weight, axis)
    count = rows.shape[0]
    current = scale.detach().float().reshape(-1, 1).expand(count, 1)
    zero = zero_point.detach().float().reshape(-1, 1).expand(count, 1)
    high = rows.amax(1, keepdim=True).clamp_min(0)
    low = rows.amin(1, keepdim=True).clamp_max(0)
    covering = torch.zeros_like(high)
    if quant_max > 0:
        covering = torch.maximum(covering, high / (quant_max - zero).clamp_min(1))
    covering = torch.maximum(covering, low / (quant_min - zero).clamp_max(-1))
    best_scale = current.clone()
    before = _lp_error(rows, current, zero, quant_min, quant_max)
    best_error = before.clone()
    for ratio in WEIGHT_CLIP_RATIOS:
        candidate = (covering * ratio).clamp_min(1e-12)
        error = _lp_error(rows, candidate, zero, quant_min, quant_max)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, candidate, best_scale)
    changed = int((best_scale != current).sum())
    return (
        best_scale.reshape(scale.shape).to(scale.dtype),
        changed,
        float(before.sum()),
        float(best_error.sum()),
    )


def init_weight_steps(
    quantized: QuantizedModel, images: torch.Tensor, handles: list[QuantizerHandle] | None = None
) -> list[WeightStepResult]:
    """Sets every weight quantizer of ``quantized`` (or of ``handles``) to the per-channel step
    that minimizes its weights' L_p rounding error (see the module docstring), through the
    handles. ``images`` (one is enough) runs the model once to read the float weights each
    quantizer receives (fx's, for one, are BatchNorm-folded)."""
    handles = quantized.weight_handles() if handles is None else handles
    weights = float_weights(quantized.model, handles, images)
    results = []
    for weight, handle in zip(weights, handles, strict=True):
        if not torch.isfinite(weight).all():
            raise ZSQError(
                f"the weights of {handle.layer!r} contain NaN or Inf; the quantized model cannot "
                "be calibrated: check the float model's weights"
            )
        scale, changed, before, after = search_weight_scale(
            weight,
            handle.scale(),
            handle.zero_point(),
            handle.quant_min,
            handle.quant_max,
            handle.axis,
        )
        if changed:
            handle.set_scale(scale)
        results.append(
            WeightStepResult(handle.layer, scale.numel(), changed, before, min(before, after))
        )
    return results
