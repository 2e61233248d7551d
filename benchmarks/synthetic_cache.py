"""Synthetic sets shared by the benchmarks, cached under one folder per exact configuration
(zsq_plugins.compare.synthetic_set_folder: the same layout ``zsq compare`` uses)."""

from __future__ import annotations

from pathlib import Path

from zsq_plugins import synthesize, zoo
from zsq_plugins.compare import synthetic_set_folder
from zsq_plugins.synthesis import SyntheticDataset


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
        cache_dir=synthetic_set_folder(root, model_name, preset, budget, num_samples, seed),
        progress=progress,
    )
