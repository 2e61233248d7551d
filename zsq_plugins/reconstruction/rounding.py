"""Learned rounding (AdaRound) and learned step sizes (LSQ): the differentiable quantizers
the routine puts in place of a toolkit's own while it optimizes, and bakes back afterwards."""

from __future__ import annotations

import torch
from torch import nn

DROP_RESOLUTION = 2**16
"""QDrop's probability is drawn at this resolution: each element takes 16 random bits."""


def drop_mask(
    shape: torch.Size | tuple[int, ...], probability: float, generator: torch.Generator
) -> torch.Tensor:
    """QDrop's mask: True, with ``probability`` (rounded to a multiple of 1 / 65,536), where an
    element keeps its float value. The bits come four elements to a 64-bit draw: a float
    uniform per element cost as much as a convolution on a 224 px model's early activations."""
    numel = int(torch.Size(shape).numel())
    words = torch.empty(-(-numel // 4), dtype=torch.int64)
    words.random_(-(2**63), 2**63 - 1, generator=generator)  # every bit uniform
    threshold = round(probability * DROP_RESOLUTION) - DROP_RESOLUTION // 2
    return (words.view(torch.int16)[:numel] < threshold).view(shape)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Rounding with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


class AdaRoundWeight(nn.Module):
    """W_q = s * (clamp(floor(W / s0) + h(V) + z, qmin, qmax) - z), per output channel.

    h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1) is AdaRound's rectified sigmoid;
    V starts where h(V) equals the fractional part of W / s0, so the soft weight starts at W.
    The integer part floor(W / s0) is fixed at the initial step s0; with ``learn_scale`` the
    step s is a parameter too and moves the dequantized weight (Genie-M).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        quant_min: int,
        quant_max: int,
        zeta: float = 1.1,
        gamma: float = -0.1,
        learn_scale: bool = False,
    ) -> None:
        super().__init__()
        shape = (-1,) + (1,) * (weight.dim() - 1)
        scale = scale.detach().reshape(shape).float().clone()
        self.register_buffer("floor", torch.floor(weight.detach() / scale))
        self.register_buffer("zero_point", zero_point.detach().reshape(shape).float().clone())
        self.scale = nn.Parameter(scale, requires_grad=learn_scale)
        self.quant_min, self.quant_max = quant_min, quant_max
        self.zeta, self.gamma = zeta, gamma
        fraction = weight.detach() / scale - self.floor
        ratio = ((fraction - gamma) / (zeta - gamma)).clamp(1e-4, 1 - 1e-4)
        self.rounding = nn.Parameter(torch.log(ratio / (1 - ratio)))

    def soft(self) -> torch.Tensor:
        stretched = torch.sigmoid(self.rounding) * (self.zeta - self.gamma) + self.gamma
        return torch.clamp(stretched, 0, 1)

    def levels(self, hard: bool = False) -> torch.Tensor:
        """Integer levels (soft during optimization, hard = what the toolkit stores)."""
        offset = (self.soft() >= 0.5).float() if hard else self.soft()
        return torch.clamp(self.floor + offset + self.zero_point, self.quant_min, self.quant_max)

    def forward(self, hard: bool = False) -> torch.Tensor:
        return (self.levels(hard) - self.zero_point) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's sum of 1 - |2h(V) - 1|^beta: pushes every h(V) to 0 or 1."""
        return (1 - (2 * self.soft() - 1).abs().pow(beta)).sum()


class _ToolkitValueLSQGradient(torch.autograd.Function):
    """Forward: the toolkit's quantized value ``exact`` (with QDrop, the float input where
    ``keep``). Backward: LSQ's straight-through gradients for the input and the step, from
    one pass over the saved input. Recording LSQ's dozen elementwise operations instead cost
    most of a reconstruction step on a 224 px model, whose early activations hold millions of
    values per batch."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        exact: torch.Tensor,
        keep: torch.Tensor | None,
        quant_min: int,
        quant_max: int,
        factor: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, scale, zero_point, keep)
        ctx.bounds = (quant_min, quant_max, factor)  # type: ignore[attr-defined]
        return exact.clone() if keep is None else torch.where(keep, x, exact)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, scale, zero_point, keep = ctx.saved_tensors  # type: ignore[attr-defined]
        quant_min, quant_max, factor = ctx.bounds  # type: ignore[attr-defined]
        # Integer levels relative to the zero point, so that no pass adds it. Every pass runs
        # over millions of values on a 224 px model: each is in place where it can be, and
        # masks select (masked_fill) rather than multiply (a bool factor is cast to a float
        # copy first).
        low, high = quant_min - float(zero_point), quant_max - float(zero_point)
        ratio = x / scale
        levels = torch.round(ratio)
        outside = (levels < low).logical_or_(levels > high)
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            blocked = outside if keep is None else outside.logical_and(keep.logical_not())
            grad_x = grad.masked_fill(blocked, 0.0)
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            # d/ds of (clamp(round(x / s) + z) - z) * s, rounding straight through:
            # (level - z) - x / s inside the range, (bound - z) outside it.
            step = levels.clamp_(low, high).sub_(ratio.masked_fill_(outside, 0.0))
            if keep is not None:
                step.masked_fill_(keep, 0.0)
            grad_scale = torch.dot(step.flatten(), grad.flatten().to(step.dtype)) * factor
            grad_scale = grad_scale.reshape(scale.shape)
        return grad_x, grad_scale, None, None, None, None, None, None


class LSQActivation(nn.Module):
    """Per-tensor fake quantization with a learned step size (LSQ's gradient scaling).

    Given ``exact``, the toolkit's own quantization of the same input with the same step
    (``QuantizerHandle.override(..., with_output=True)``), the forward value is the toolkit's
    to the last bit and only the gradient is LSQ's: toolkits differ in the arithmetic
    (``x / s`` or ``x * (1 / s)``, the zero point added before or after rounding), which
    decides ties, so a step learned here reproduces exactly once written back. ``keep``
    (QDrop, with ``exact``) marks the elements that pass unquantized."""

    def __init__(
        self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int
    ) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.detach().flatten()[:1].float().clone())
        self.register_buffer("zero_point", zero_point.detach().flatten()[:1].float().round())
        self.quant_min, self.quant_max = quant_min, quant_max

    def forward(
        self,
        x: torch.Tensor,
        exact: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # LSQ scales the step's gradient by 1 / sqrt(numel * qmax) for stable learning.
        factor = 1.0 / (x.numel() / x.shape[0] * self.quant_max) ** 0.5
        if exact is not None:
            return _ToolkitValueLSQGradient.apply(
                x, self.scale, self.zero_point, exact.detach(), keep,
                self.quant_min, self.quant_max, factor,
            )  # fmt: skip
        if keep is not None:
            raise ValueError("keep (QDrop) needs the toolkit's value: pass exact too")
        scaled_grad = self.scale * factor
        scale = self.scale.detach() + (scaled_grad - scaled_grad.detach())
        levels = torch.clamp(round_ste(x / scale) + self.zero_point, self.quant_min, self.quant_max)
        return (levels - self.zero_point) * scale
