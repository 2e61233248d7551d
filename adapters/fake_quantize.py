"""What the FX and PT2E adapters share: torch-style FakeQuantize modules (torch.ao's and
torchao's have the same attributes) seen as quantizer handles, and the observe-then-quantize
calibration loop."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from zsq_plugins.adapter import HandleBase


class FakeQuantizeHandle(HandleBase):
    """A torch.ao FakeQuantize seen through the QuantizerHandle protocol."""

    @property
    def quant_min(self) -> int:
        return int(self._module.quant_min)

    @property
    def quant_max(self) -> int:
        return int(self._module.quant_max)

    @property
    def bits(self) -> int:
        return round(math.log2(self.quant_max - self.quant_min + 1))

    @property
    def axis(self) -> int | None:
        per_channel = self._module.qscheme in (
            torch.per_channel_symmetric,
            torch.per_channel_affine,
        )
        return int(self._module.ch_axis) if per_channel else None

    def scale(self) -> torch.Tensor:
        return self._module.scale.detach().clone()

    def set_scale(self, value: torch.Tensor) -> None:
        self._module.scale = value.detach().to(self._module.scale).reshape(self._module.scale.shape)
        self._sync_observer()

    def _sync_observer(self) -> None:
        """Makes the observer's range give back this scale and zero point: ``convert_fx``
        recomputes quantization parameters from the observer, not from the scale buffer."""
        observer = self._module.activation_post_process
        scale = self._module.scale.detach().float()
        zero_point = self._module.zero_point.detach().float()
        symmetric = self._module.qscheme in (
            torch.per_tensor_symmetric,
            torch.per_channel_symmetric,
        )
        if symmetric:  # torch: scale = max(|min|, max) / ((quant_max - quant_min) / 2)
            high = scale * (self.quant_max - self.quant_min) / 2
            low = -high
        else:  # torch: scale = (max - min) / (quant_max - quant_min), zero point from min
            low = (self.quant_min - zero_point) * scale
            high = (self.quant_max - zero_point) * scale
        observer.min_val = low.reshape(observer.min_val.shape).to(observer.min_val)
        observer.max_val = high.reshape(observer.max_val.shape).to(observer.max_val)

    def zero_point(self) -> torch.Tensor:
        return self._module.zero_point.detach().clone()

    def set_zero_point(self, value: torch.Tensor) -> None:
        current = self._module.zero_point
        self._module.zero_point = torch.round(value.detach()).to(current).reshape(current.shape)
        self._sync_observer()

    @property
    def enabled(self) -> bool:
        return bool(self._module.fake_quant_enabled[0])

    def set_enabled(self, enabled: bool) -> None:
        self._module.enable_fake_quant(enabled)


def calibrate(prepared: nn.Module, calibration: Iterable[torch.Tensor], switches: Any) -> int:
    """torch.ao's calibration: observers on and fake quantization off over the data, then
    the reverse; returns the number of images seen. ``switches`` holds the
    ``enable_observer``/``disable_fake_quant``/... functions (torch.ao's for FX; torchao's
    PT2E has its own, for its own FakeQuantize classes)."""
    ao = switches
    prepared.apply(ao.enable_observer)
    prepared.apply(ao.disable_fake_quant)
    seen = 0
    with torch.no_grad():
        for batch in calibration:
            images = batch[0] if isinstance(batch, tuple | list) else batch
            prepared(images)
            seen += len(images)
    if seen == 0:
        raise ValueError("the calibration data yielded no batch")
    prepared.apply(ao.disable_observer)
    prepared.apply(ao.enable_fake_quant)
    return seen
