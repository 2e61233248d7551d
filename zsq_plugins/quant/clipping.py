"""Accurate activation clipping (AAC): activation ranges from the FP model's own activations.

After a toolkit has calibrated its quantized model (its observers: min-max, histogram...),
every activation quantizer is given the range that minimizes the mean squared quantization
error of the values it would receive in the *floating-point* model, on the calibration
images, searched on the quantizer's own integer grid:

- the FP values: the quantized model is run with every quantizer overridden by the identity
  (through the adapter handles), so each activation quantizer sees exactly the FP32 (BN-folded)
  activations at its place in the toolkit's graph; a seeded random sample of at most
  ``values_per_quantizer`` values is kept per quantizer;
- the search: 100 clipping ratios r in (0, 1] of the FP range. A quantizer with zero point 0
  (symmetric, or unsigned after a ReLU) keeps it and tries scales r * s0, with s0 the smallest
  scale that covers the values; an asymmetric one tries the range [r * min, r * max] with its
  zero point re-derived;
- the result is written through the handles, so the toolkit's own model carries it.

Low-bit activation quantizers calibrated by min-max on data with outliers waste most of their
levels; the MSE clip trades a little clipping error for a much finer step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from zsq_plugins.adapter import QuantizedModel, QuantizerHandle
from zsq_plugins.errors import ZSQError
from zsq_plugins.quant.fakequant import CLIP_SEARCH_STEPS, fake_quantize

VALUES_PER_QUANTIZER = 65536
"""Activation values sampled per quantizer for the MSE search."""


@dataclasses.dataclass(frozen=True)
class ClipResult:
    layer: str
    old_scale: float
    new_scale: float
    zero_point: float
    mse_before: float
    mse_after: float


def grid_mse_range(
    values: torch.Tensor,
    quant_min: int,
    quant_max: int,
    fixed_zero_point: bool,
    steps: int = CLIP_SEARCH_STEPS,
) -> tuple[float, float, float] | None:
    """(scale, zero point, MSE) minimizing the quantization MSE of ``values`` on the integer
    grid [quant_min, quant_max], with zero point 0 if ``fixed_zero_point``; None when all
    values are 0 (no range to choose)."""
    values = values.flatten().float()
    low = min(float(values.min()), 0.0)
    high = max(float(values.max()), 0.0)
    if high - low <= 0:
        return None
    best: tuple[float, float, float] | None = None
    for step in range(1, steps + 1):
        ratio = step / steps
        if fixed_zero_point:
            covering = [high / quant_max] if quant_max > 0 else []
            if quant_min < 0:
                covering.append(low / quant_min)
            scale = ratio * max(covering)
            zero_point = 0.0
        else:
            scale = ratio * (high - low) / (quant_max - quant_min)
            shifted = quant_min - round(ratio * low / scale)
            zero_point = float(min(max(shifted, quant_min), quant_max))
        if scale <= 0:
            continue
        scale_t = torch.tensor(scale)
        zero_t = torch.tensor(zero_point)
        error = float(
            (fake_quantize(values, scale_t, zero_t, quant_min, quant_max) - values).pow(2).mean()
        )
        if best is None or error < best[2]:
            best = (scale, zero_point, error)
    assert best is not None
    return best


@contextmanager
def _float_run(quantized: QuantizedModel, sample: int, seed: int) -> Iterator[dict[int, list]]:
    """Every quantizer overridden by the identity; activation inputs sampled into the dict."""
    generator = torch.Generator().manual_seed(seed)
    store: dict[int, list[torch.Tensor]] = {}

    def record(index: int):
        def identity(x: torch.Tensor) -> torch.Tensor:
            flat = x.detach().flatten()
            take = torch.randint(0, flat.numel(), (min(sample, flat.numel()),), generator=generator)
            store.setdefault(index, []).append(flat[take.to(flat.device)].float().cpu())
            return x

        return identity

    removers = [h.override(lambda w: w) for h in quantized.weight_handles()]
    removers += [h.override(record(i)) for i, h in enumerate(quantized.activation_handles())]
    try:
        yield store
    finally:
        for remover in removers:
            remover.remove()


def _per_tensor(handle: QuantizerHandle) -> None:
    if handle.axis is not None:
        raise ZSQError(
            f"accurate activation clipping sets per-tensor ranges; the activation quantizer of "
            f"{handle.layer!r} is per-channel (axis {handle.axis})"
        )


def clip_activations(
    quantized: QuantizedModel,
    images: torch.Tensor,
    *,
    batch_size: int = 64,
    values_per_quantizer: int = VALUES_PER_QUANTIZER,
    seed: int = 0,
) -> list[ClipResult]:
    """Sets every enabled activation quantizer of ``quantized`` to the MSE-optimal range of
    the FP activations it receives on ``images`` (see the module docstring); one whose FP
    values are all zero, or whose calibrated range already has the lower error, keeps it.
    Returns what changed, per quantizer."""
    handles = quantized.activation_handles()  # _float_run's store is keyed by this order
    for handle in handles:
        if handle.enabled:
            _per_tensor(handle)
    batches = max(1, -(-len(images) // batch_size))
    per_batch = max(1, values_per_quantizer // batches)
    model = quantized.model
    with torch.no_grad(), _float_run(quantized, per_batch, seed) as store:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])
    results = []
    for index, handle in enumerate(handles):
        if not handle.enabled:
            continue
        samples = store.get(index)
        if not samples:
            raise ZSQError(f"the activation quantizer of {handle.layer!r} saw no data")
        values = torch.cat(samples)
        old_scale, old_zero = handle.scale(), handle.zero_point()
        fixed = bool((old_zero == 0).all())
        grid = (handle.quant_min, handle.quant_max)
        before = float((fake_quantize(values, old_scale, old_zero, *grid) - values).pow(2).mean())
        found = grid_mse_range(values, handle.quant_min, handle.quant_max, fixed)
        if found is None or found[2] >= before:
            continue  # the toolkit's range is already as good: keep it
        scale, zero_point, after = found
        handle.set_scale(torch.full_like(old_scale, scale))
        if not fixed:
            handle.set_zero_point(torch.full_like(old_zero, zero_point))
        old = float(old_scale.flatten()[0])
        results.append(ClipResult(handle.layer, old, scale, zero_point, before, after))
    return results
