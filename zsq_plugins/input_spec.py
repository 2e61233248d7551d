"""``InputSpec``: what a model expects as input, where the model itself does not say.

torchvision-style models take images normalized outside them: ``(pixels - mean) / std``, with
pixels in a known range ([0, 1] after ``ToTensor``). Synthetic images must then be produced in
that normalized space, and bounded so that their pixels stay in the range real images have:
unbounded ones are the outliers that wreck min-max ranges.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from zsq_plugins.configio import check_fields, to_json_dict


def _floats(values: Sequence[float] | None, name: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}")
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold numbers, got {values!r}") from None
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"{name} must be finite, got {values!r}")
    return numbers


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputSpec:
    """The model's input contract.

    ``shape`` is one input's (C, H, W). ``mean`` and ``std`` (one value per channel, or one
    for all) describe a normalization applied *outside* the model: it receives
    ``(pixels - mean) / std``, and synthetic images come back in that normalized space. Leave
    them out when the model takes pixels itself (normalizing inside, as the zoo's models do).
    ``low`` and ``high`` bound the pixels before normalization (0 and 1 for images scaled to
    [0, 1]); without them synthetic images are unbounded.
    """

    shape: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.shape) if isinstance(self.shape, Sequence) else ()
        if len(shape) != 3 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape
        ):
            raise ValueError(
                f"shape must be (C, H, W), three positive integers; got {self.shape!r}"
            )
        object.__setattr__(self, "shape", shape)
        mean, std = _floats(self.mean, "mean"), _floats(self.std, "std")
        if (mean is None) != (std is None):
            raise ValueError(
                "give both mean and std (the normalization outside the model), or neither"
            )
        channels = shape[0]
        for name, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) not in (1, channels):
                raise ValueError(
                    f"{name} has {len(values)} values; the input has {channels} channel(s): "
                    f"give 1 or {channels}"
                )
        if std is not None and min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        object.__setattr__(self, "mean", mean and (mean * channels if len(mean) == 1 else mean))
        object.__setattr__(self, "std", std and (std * channels if len(std) == 1 else std))
        if (self.low is None) != (self.high is None):
            raise ValueError("give both low and high (the valid pixel range), or neither")
        if self.low is not None and self.high is not None:
            low, high = float(self.low), float(self.high)
            if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
                raise ValueError(f"the pixel range needs low < high, got [{self.low}, {self.high}]")
            object.__setattr__(self, "low", low)
            object.__setattr__(self, "high", high)

    @property
    def bounded(self) -> bool:
        return self.low is not None

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (N, C, H, W) as the model receives them."""
        if self.mean is None or self.std is None:
            return pixels
        mean, std = self._per_channel(pixels)
        return (pixels - mean) / std

    def pixels(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's inputs (N, C, H, W) as pixels again."""
        if self.mean is None or self.std is None:
            return inputs
        mean, std = self._per_channel(inputs)
        return inputs * std + mean

    def _per_channel(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std shaped (1, C, 1, 1), in ``like``'s dtype and device."""
        return tuple(  # type: ignore[return-value]
            torch.tensor(v, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
            for v in (self.mean, self.std)
        )

    def to_dict(self) -> dict[str, Any]:
        return to_json_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        check_fields(cls, data, "InputSpec field")
        return cls(**data)
