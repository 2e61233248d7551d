"""Input augmentation applied at each synthesis step (not to the stored images)."""

from __future__ import annotations

import torch

from zsq_plugins.synthesis.config import SynthesisConfig


def augment(x: torch.Tensor, config: SynthesisConfig, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``config.jitter`` pixels (one shift per step, as in
    DeepInversion) and per-sample horizontal flips when ``config.flip``."""
    if config.jitter > 0:
        dy, dx = torch.randint(-config.jitter, config.jitter + 1, (2,), generator=generator)
        x = torch.roll(x, shifts=(int(dy), int(dx)), dims=(-2, -1))
    if config.flip:
        mask = torch.rand(x.shape[0], generator=generator) < 0.5
        mask = mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        x = torch.where(mask, x.flip(-1), x)
    return x
