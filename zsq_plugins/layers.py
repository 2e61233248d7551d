"""Modules the library recognises in a model's tree: input normalization."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Maps images in [0, 1] to the normalized range the network was trained on.

    Kept as its own module so that quantization adapters and generators can recognise the
    model's input normalization from the module tree instead of from its arithmetic. A model
    whose normalization happens outside it says so with an ``InputSpec`` instead.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
