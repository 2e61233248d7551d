"""Block reconstruction shared by every toolkit (AdaRound, BRECQ, QDrop, Genie-M)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from zsq_plugins.adapter import QuantizedModel
from zsq_plugins.budgets import auto_budget, model_macs
from zsq_plugins.configio import Budget
from zsq_plugins.graph.block_inputs import BlockInputCache
from zsq_plugins.reconstruction.config import ReconstructionConfig
from zsq_plugins.reconstruction.presets import RECONSTRUCTIONS, ReconstructionPreset
from zsq_plugins.reconstruction.routine import ReconstructionReport
from zsq_plugins.reconstruction.routine import reconstruct as _run


def reconstruct(
    quantized: QuantizedModel,
    fp_model: nn.Module,
    images: torch.Tensor,
    preset: str = "genie-m",
    budget: Budget | str = Budget.AUTO,
    *,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> ReconstructionReport:
    """Reconstructs a toolkit's quantized model (``report.quantized`` of ``apply``, or an
    adapter's ``quantize`` result) towards ``fp_model`` on ``images``, block by block, and
    writes the learned rounding and step sizes back into the toolkit's own quantizers.

    ``checkpoint_dir`` saves the state after every block there; calling again with the same
    folder (and the same quantized model, images, preset, budget and seed), after an
    interruption, resumes after the last finished block. ``budget`` is ``auto`` (the
    default: ``cpu`` with fewer steps for models costlier per image than the Fashion-MNIST zoo
    models, zsq_plugins.budgets), ``cpu`` or ``paper``; ``overrides`` set any
    ReconstructionConfig field."""
    config = RECONSTRUCTIONS.get(preset).config(budget).replace(**overrides)
    if Budget.parse(budget) is Budget.AUTO:
        macs = model_macs(fp_model, tuple(images.shape[1:]))
        config = auto_budget(macs).scale_reconstruction(config, fixed=overrides)
    return _run(
        quantized,
        fp_model,
        images,
        config,
        seed=seed,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
    )


__all__ = [
    "RECONSTRUCTIONS",
    "BlockInputCache",
    "Budget",
    "ReconstructionConfig",
    "ReconstructionPreset",
    "ReconstructionReport",
    "reconstruct",
]
