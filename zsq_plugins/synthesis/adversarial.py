"""Adversarial calibration data (after ZAQ): images where the toolkit's quantized model and
the FP model disagree most, alternating with the toolkit's calibration on them.

ZAQ (Liu et al., CVPR 2021) alternates a generator that maximizes the two-level discrepancy
between the FP and the quantized model with training of the quantized model that minimizes it.
Here the minimizing player is post-training calibration instead of training: each round, the
toolkit calibrates (its adapter, then accurate activation clipping, as ``apply(...,
aac=True)`` does) on every image generated so far, and the next batch of images is distilled
against *that* quantized model. The first round calibrates on a seed set (``seed_preset``,
Gaussian noise by default, so no BatchNorm is needed anywhere). The quantized model is
reached only through the adapter and the toolkit's own model, so the same loop runs in
every toolkit.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
from torch import nn

from zsq_plugins.adapter import get_adapter
from zsq_plugins.configio import Budget
from zsq_plugins.quant.clipping import clip_activations
from zsq_plugins.spec import QuantSpec
from zsq_plugins.synthesis.api import calibration_loader, synthesize
from zsq_plugins.synthesis.artifact import SyntheticDataset

log = logging.getLogger(__name__)

DEFAULT_ROUNDS = 4
"""Rounds of (calibrate, generate): the first generates the seed set; each later one a
quarter of the images against the model calibrated on all images so far."""


def calibrated_opponent(
    model: nn.Module, toolkit: str, spec: QuantSpec, images: torch.Tensor, seed: int
) -> nn.Module:
    """The toolkit's model calibrated on ``images``, with accurate activation clipping."""
    loader = calibration_loader(images)
    quantized = get_adapter(toolkit).quantize(model.eval(), spec, loader, images[:2])
    clip_activations(quantized, images, seed=seed)
    return quantized.model


def adversarial_synthesize(
    model: nn.Module,
    toolkit: str,
    spec: QuantSpec,
    num_samples: int,
    preset: str = "adversarial",
    seed: int = 0,
    *,
    rounds: int = DEFAULT_ROUNDS,
    seed_preset: str = "noise",
    budget: Budget | str = Budget.CPU,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> SyntheticDataset:
    """``num_samples`` images for quantizing ``model`` with ``toolkit`` at ``spec``: a seed
    set, then ``rounds - 1`` sets each distilled against the toolkit's model calibrated on all
    the images before it. With ``cache_dir``, each round's set is cached under it (a resumed
    run reuses finished rounds: the same calibration gives the same opponent)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 2:
        raise ValueError(
            f"rounds must be an integer >= 2 (a seed round and one more), got {rounds!r}"
        )
    if num_samples < rounds:
        raise ValueError(f"num_samples ({num_samples}) must be at least rounds ({rounds})")
    share = math.ceil(num_samples / rounds)
    sizes = [share] * (rounds - 1) + [num_samples - share * (rounds - 1)]

    def folder(index: int) -> str | None:
        return None if cache_dir is None else os.path.join(os.fspath(cache_dir), f"round{index}")

    parts = [
        synthesize(
            model,
            sizes[0],
            seed_preset,
            seed,
            budget=budget,
            cache_dir=folder(0),
            progress=progress,
            **overrides,  # input_shape and the like; a noise seed ignores the rest
        )
    ]
    manifests = [parts[0].manifest]
    for index in range(1, rounds):
        pool = torch.cat([part.images for part in parts])
        opponent = calibrated_opponent(model, toolkit, spec, pool, seed)
        part = synthesize(
            model,
            sizes[index],
            preset,
            seed + index,
            budget=budget,
            cache_dir=folder(index),
            progress=progress,
            opponent=opponent,
            **overrides,
        )
        log.info("adversarial round %d/%d: %d images", index + 1, rounds, len(part.images))
        parts.append(part)
        manifests.append(part.manifest)
    images = torch.cat([part.images for part in parts])
    manifest = {
        "identity": {
            "preset": preset,
            "toolkit": toolkit,
            "spec": spec.label,
            "rounds": rounds,
            "seed_preset": seed_preset,
            "seed": seed,
            "num_samples": num_samples,
        },
        "complete": True,
        "rounds": manifests,
    }
    return SyntheticDataset(images, manifest)
