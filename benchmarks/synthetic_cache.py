"""Synthetic sets shared by the benchmarks, cached under one folder per exact configuration.

The folder name carries a hash of the preset's resolved config, so a changed preset makes a
new set instead of tripping over (or silently reusing) one made by the old configuration.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from zsq_plugins import synthesize, zoo
from zsq_plugins.synthesis import SyntheticDataset
from zsq_plugins.synthesis.presets import get_preset


def cache_folder(
    root: Path, model_name: str, preset: str, budget: str, num_samples: int, seed: int
) -> Path:
    config = get_preset(preset).config(budget).to_json()
    digest = hashlib.sha256(config.encode()).hexdigest()[:10]
    return root / model_name / f"{preset}-{budget}-n{num_samples}-seed{seed}-{digest}"


def cached_synthesize(
    root: Path,
    model_name: str,
    preset: str,
    num_samples: int,
    seed: int,
    budget: str = "cpu",
    progress: bool = True,
) -> SyntheticDataset:
    return synthesize(
        zoo.load(model_name),
        num_samples,
        preset,
        seed,
        budget=budget,
        cache_dir=cache_folder(root, model_name, preset, budget, num_samples, seed),
        progress=progress,
    )
