"""Configuration of the synthesis engine: what is optimized, the objective, augmentation.

Every default lives here once, with the paper it comes from. Presets (presets.py) are named
instances of this dataclass.
"""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from typing import Any

from zsq_plugins.configio import checked_replace, to_json_dict

ADDED_LATER: dict[str, Any] = {"slack_per_channel": False}
"""Fields added after synthetic sets were cached, with the value those sets were made with."""


class Parameterization(str, Enum):
    NOISE = "noise"
    """No optimization: Gaussian noise in the model's normalized input space (the baseline)."""
    PIXELS = "pixels"
    """Pixels optimized directly (ZeroQ, DSG)."""
    GENERATOR = "generator"
    """A small conv generator and its latent vectors, optimized jointly, fresh per batch (Genie)."""


class StatisticsSource(str, Enum):
    BATCHNORM = "batchnorm"
    """Targets are BatchNorm running statistics, read at each BN's input (ZeroQ, DSG, Genie)."""
    WEIGHTS = "weights"
    """Targets are derived from the weights alone, read at each conv/linear output (GZSQ-style,
    for models without BatchNorm); see synthesis/weight_stats.py."""


class Distance(str, Enum):
    MSE = "mse"
    """Squared error averaged over channels, ``||a - b||^2 / C`` (ZeroQ's and Genie's code)."""
    NORM = "norm"
    """Euclidean distance over channels, ``||a - b||_2`` (DSG's slack is a margin on it)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SynthesisConfig:
    """One generator's configuration. The field defaults are building blocks, each cited to
    its source; ``SynthesisConfig()`` itself is no paper's method. Start from a preset
    (``get_preset(name).config(budget)``, presets.py) and ``replace`` what you change."""

    parameterization: Parameterization = Parameterization.PIXELS
    iterations: int = 500
    """Optimization steps per batch. ZeroQ and DSG use 500; Genie uses 4000."""
    batch_size: int = 128
    """Images optimized together (their batch statistics are matched). Genie uses 128."""
    lr: float = 0.1
    """Adam learning rate of the pixels or latents (Genie's latents: 0.1; ZeroQ's pixels: 0.5)."""
    generator_lr: float = 0.01
    """Adam learning rate of the generator's weights (Genie: 0.01)."""
    generator_lr_decay: float = 0.95
    """Generator lr multiplier per 100 iterations, applied smoothly per step (Genie: 0.95/100)."""
    plateau_patience: int = 100
    """Iterations without improvement before the pixel/latent lr is reduced 10x (Genie: 100)."""
    min_lr: float = 1e-4
    """Floor of the plateau schedule (Genie: 1e-4)."""
    latent_dim: int = 256
    """Size of Genie's latent vectors (Genie: 256)."""
    generator_channels: tuple[int, int] = (128, 64)
    """Widths of the generator's two conv stages (Genie, after GDFQ: 128, 64)."""
    generator_tanh: bool = True
    """Squash the generator's output with tanh before its output BatchNorm (Genie: yes). The
    ``genie`` preset turns it off and bounds images with ``clamp_to_input_range`` instead."""

    statistics: StatisticsSource = StatisticsSource.BATCHNORM
    """Where the statistics targets come from."""
    bn_distance: Distance = Distance.MSE
    std_floor: bool = False
    """Treat each target standard deviation as a floor: push deviations below it up, leave
    those above it alone. For weight-derived targets (``weight-stats``), whose deviations
    are biased low: the propagation takes channels as independent, and the positive
    correlations between channels after ReLU make real deviations larger, increasingly so
    with depth."""
    bn_batch_weight: float = 1.0
    """Weight of matching batch statistics (mean, std over N, H, W) to BN running statistics."""
    bn_sample_weight: float = 0.0
    """Weight of matching each sample's statistics (over H, W) to BN statistics (DSG)."""
    layer_emphasis: float = 0.0
    """Extra weight of one random layer per sample in the per-sample term (DSG's LSE: 1.0)."""
    slack: float = 0.0
    """DSG's slack alignment: margin, in units of the model-derived expected fluctuation of the
    statistic (see objectives.expected_deviation), inside which statistics are not pushed."""
    slack_per_channel: bool = False
    """Apply the slack margin to each channel's deviation before the distance over channels
    (DSG's code: ``max(|a_c - b_c| - m, 0)`` element by element), with each channel's own
    expected fluctuation as its margin; False: one margin on the distance over all channels."""
    decorrelation_weight: float = 0.0
    """Weight of the mean squared cosine similarity between samples' penultimate features."""
    input_prior_weight: float = 1.0
    """Weight of pulling each sample's normalized-input mean/std to 0/1 (ZeroQ, Genie)."""
    output_weight: float = 0.0
    """Weight of cross-entropy to random labels on the model's output (GDFQ-style)."""
    discrepancy_weight: float = 0.0
    """ZAQ's output-level discrepancy: weight of the L1 distance between the FP model's and a
    quantized opponent's logits (summed over classes, averaged over the batch), which the
    images *maximize* (it enters the objective negated). Needs an opponent: ``apply(...,
    data="adversarial")`` plays the toolkit's quantized model (synthesis/adversarial.py)."""
    relation_weight: float = 0.0
    """ZAQ's intermediate-level discrepancy: weight of the squared difference between the FP
    model's and the opponent's sample-relation maps (cosine similarities between the
    batch's images) at the input of every conv/linear layer both models have, maximized."""

    jitter: int = 0
    """Random translation of the input by up to this many pixels per step (DeepInversion)."""
    flip: bool = False
    """Random horizontal flips per step."""
    swing: int = 0
    """Genie's swing convolution: reflect-pad every strided conv's input by this many pixels
    and crop back at a random offset, during distillation only (Genie: 1)."""
    clamp_to_input_range: bool = False
    """Keep images inside the model's valid input range (e.g. [0, 1] for the zoo's models)."""

    def __post_init__(self) -> None:
        for field, enum in (
            ("parameterization", Parameterization),
            ("statistics", StatisticsSource),
            ("bn_distance", Distance),
        ):
            value = getattr(self, field)
            try:
                object.__setattr__(self, field, enum(value))
            except ValueError:
                choices = ", ".join(repr(m.value) for m in enum)
                raise ValueError(f"{field} must be one of {choices}; got {value!r}") from None
        positive_ints = ("iterations", "batch_size", "latent_dim", "plateau_patience")
        for field in positive_ints:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        for field in ("lr", "generator_lr", "min_lr"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be > 0, got {getattr(self, field)!r}")
        if not 0 < self.generator_lr_decay <= 1:
            raise ValueError(f"generator_lr_decay must be in (0, 1], got {self.generator_lr_decay}")
        weights = (
            "bn_batch_weight",
            "bn_sample_weight",
            "layer_emphasis",
            "slack",
            "decorrelation_weight",
            "input_prior_weight",
            "output_weight",
            "discrepancy_weight",
            "relation_weight",
        )
        for field in weights:
            if not getattr(self, field) >= 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)!r}")
        for field in ("jitter", "swing"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field} must be a non-negative integer, got {value!r}")
        channels = tuple(self.generator_channels)
        if len(channels) != 2 or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"generator_channels must be two positive ints, got {channels!r}")
        object.__setattr__(self, "generator_channels", channels)

    @property
    def uses_statistics(self) -> bool:
        """Whether the objective has a statistics-matching term."""
        if self.parameterization is Parameterization.NOISE:
            return False
        return self.bn_batch_weight > 0 or self.bn_sample_weight > 0

    @property
    def needs_opponent(self) -> bool:
        """Whether the objective plays against a quantized model (ZAQ's discrepancy)."""
        if self.parameterization is Parameterization.NOISE:
            return False
        return self.discrepancy_weight > 0 or self.relation_weight > 0

    @property
    def uses_batchnorm(self) -> bool:
        """Whether the objective reads BatchNorm statistics (so needs BatchNorm layers)."""
        return self.uses_statistics and self.statistics is StatisticsSource.BATCHNORM

    def replace(self, **overrides: Any) -> SynthesisConfig:
        return checked_replace(self, "synthesis", **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, without those added later at the value that older records
        (cached sets, their identity) implied, so that a new field leaves their keys alone."""
        data = to_json_dict(self)
        return {k: v for k, v in data.items() if not (k in ADDED_LATER and v == ADDED_LATER[k])}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynthesisConfig:
        return cls().replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
