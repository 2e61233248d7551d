"""The synthetic-data provider: one engine, presets named after their papers."""

from zsq_plugins.configio import Budget
from zsq_plugins.synthesis.api import calibration_loader, synthesize
from zsq_plugins.synthesis.artifact import SyntheticDataset
from zsq_plugins.synthesis.config import Distance, Parameterization, SynthesisConfig
from zsq_plugins.synthesis.engine import SynthesisDiverged
from zsq_plugins.synthesis.presets import GENERATORS, GeneratorPreset, Preset, get_preset

__all__ = [
    "GENERATORS",
    "Budget",
    "Distance",
    "GeneratorPreset",
    "Parameterization",
    "Preset",
    "SynthesisConfig",
    "SynthesisDiverged",
    "SyntheticDataset",
    "calibration_loader",
    "get_preset",
    "synthesize",
]
