"""Configuration of the block-reconstruction routine; presets are instances of it.

Every default cites its source: AdaRound (Nagel et al., ICML 2020), BRECQ (Li et al., ICLR
2021), QDrop (Wei et al., ICLR 2022), Genie-M (Jeon et al., CVPR 2023), LSQ (Esser et al.,
ICLR 2020).
"""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from typing import Any

from zsq_plugins.configio import checked_replace, to_json_dict
from zsq_plugins.graph.block_inputs import BlockInputCache
from zsq_plugins.graph.blocks import Granularity

RESULT_NEUTRAL = ("block_inputs",)
"""ReconstructionConfig fields that change time and memory only, never the result."""

ADDED_LATER = {"loss": "sum", "schedule": "joint", "act_stage_fraction": 0.25}
"""Fields added after results were recorded, with the value that gives those results: a
recorded configuration without the field, and one with this value, are the same."""


class LossReduction(str, Enum):
    SUM = "sum"
    SPATIAL_MEAN = "spatial_mean"


class Schedule(str, Enum):
    JOINT = "joint"
    TWO_STAGE = "two_stage"


def same_result_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A recorded configuration (``to_dict()`` form) without the ``RESULT_NEUTRAL`` fields
    (nor the ``ADDED_LATER`` ones at the value that recorded results had)."""
    return {
        k: v
        for k, v in config.items()
        if k not in RESULT_NEUTRAL and not (k in ADDED_LATER and v == ADDED_LATER[k])
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReconstructionConfig:
    """The routine's configuration. ``ReconstructionConfig()`` is BRECQ's block
    reconstruction at the ``paper`` budget with rounding and activation steps learned jointly
    (the ``brecq`` preset learns them in BRECQ's two stages); the entry points (``apply``,
    ``zsq_plugins.reconstruct``) default to ``genie-m`` at the ``auto`` budget instead: start
    from ``RECONSTRUCTIONS.get(name).config(budget)`` and ``replace`` what you change."""

    granularity: Granularity = Granularity.BLOCK
    """``layer`` reconstructs each conv/linear alone (AdaRound); ``block`` whole blocks (BRECQ)."""
    iterations: int = 20000
    """Optimization steps per block (BRECQ/QDrop/Genie: 20000)."""
    batch_size: int = 32
    """Images per step (BRECQ/QDrop/Genie: 32)."""
    rounding_lr: float = 1e-3
    """Adam learning rate of the rounding variables V (AdaRound/BRECQ: 1e-3)."""
    weight_scale_lr: float = 0.0
    """Adam learning rate of the weight step sizes; 0 keeps them fixed (AdaRound, BRECQ,
    QDrop). Genie-M learns them jointly with the rounding (Genie-M: 1e-4)."""
    act_scale_lr: float = 4e-5
    """Adam learning rate of the activation step sizes, learned LSQ-style (BRECQ/QDrop: 4e-5)."""
    rounding_weight: float = 0.01
    """Weight lambda of AdaRound's rounding regularizer (BRECQ/QDrop: 0.01)."""
    beta_start: float = 20.0
    """Initial temperature of the regularizer 1 - |2h(V) - 1|^beta (AdaRound: 20)."""
    beta_end: float = 2.0
    """Final temperature (AdaRound: 2)."""
    warmup: float = 0.2
    """Fraction of iterations without the regularizer, reconstruction loss only (AdaRound: 0.2)."""
    zeta: float = 1.1
    """Stretch of AdaRound's rectified sigmoid, upper end (AdaRound: 1.1)."""
    gamma: float = -0.1
    """Stretch of AdaRound's rectified sigmoid, lower end (AdaRound: -0.1)."""
    drop_probability: float = 0.0
    """QDrop: probability of replacing a quantized activation element by its FP value during
    reconstruction (QDrop: 0.5); 0 disables it (AdaRound, BRECQ)."""
    learn_act_scales: bool = True
    """Learn activation step sizes (BRECQ, QDrop, Genie-M); AdaRound keeps them fixed."""
    init_act_ranges: bool = True
    """Start every activation quantizer from the MSE-optimal clip of the FP activations
    (zsq_plugins.quant.clipping) instead of the toolkit's calibrated range, as BRECQ and
    QDrop initialize activation steps by an MSE search; a toolkit's min-max range at 4 bits
    is far from it, and learned steps move too little in a short budget to make up for it."""
    init_weight_steps: bool = True
    """Start every weight quantizer from the per-channel step that minimizes its weights' L_2.4
    rounding error (zsq_plugins.quant.weight_clipping) instead of the toolkit's min-max step,
    as BRECQ and QDrop initialize weight steps by an error search. The toolkits' own steps
    differ (a channel's max|w| on 7, 7.5 or 8 steps at 4 bits; 1, 1.5 or 2 at 2 bits), a
    rounding-only preset cannot move them, and Genie-M's learned step moves too little in a
    short budget: without the search, the toolkit's calibration rule decides the result."""
    schedule: Schedule = Schedule.JOINT
    """``joint`` learns each block's rounding and activation steps together (QDrop, Genie-M);
    ``two_stage`` is BRECQ's own schedule: every block's rounding first, with activations in
    float, then every block's activation steps with the rounding fixed."""
    act_stage_fraction: float = 0.25
    """With ``two_stage``, the activation stage's steps per block as a fraction of
    ``iterations`` (BRECQ: 5000 activation steps after 20000 rounding steps)."""
    loss: LossReduction = LossReduction.SUM
    """How a block's squared output error is reduced per image: ``sum`` over every element
    (channels x height x width), or ``spatial_mean``, summed over channels and averaged over
    positions, as BRECQ's, QDrop's and Genie's code reduce it. The choice sets the balance
    with the rounding regularizer (whose weight is per weight): on a 112 x 112 feature map
    ``sum`` weighs the error 12,544 times more than ``spatial_mean`` does."""
    block_inputs: BlockInputCache = BlockInputCache.AUTO
    """Where the quantized prefix's output (the block's input) is kept while a block learns:
    ``memory``, ``disk`` (a memory-mapped temporary file), ``auto`` (memory up to 1 GiB per
    block, disk above: block_inputs.AUTO_MEMORY_LIMIT) or ``off`` (the prefix runs on every
    step, as a plain BRECQ loop does). The FP targets of the block are kept the same way
    (``off``: as ``auto``). Caching changes no result, only time and memory: BRECQ's and
    QDrop's code cache block inputs the same way."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "block_inputs", BlockInputCache(self.block_inputs))
        except ValueError:
            raise ValueError(
                f"block_inputs must be 'auto', 'memory', 'disk' or 'off', got {self.block_inputs!r}"
            ) from None
        try:
            object.__setattr__(self, "schedule", Schedule(self.schedule))
        except ValueError:
            raise ValueError(
                f"schedule must be 'joint' or 'two_stage', got {self.schedule!r}"
            ) from None
        if not 0 < self.act_stage_fraction <= 1:
            raise ValueError(
                f"act_stage_fraction must be in (0, 1], got {self.act_stage_fraction!r}"
            )
        try:
            object.__setattr__(self, "loss", LossReduction(self.loss))
        except ValueError:
            raise ValueError(f"loss must be 'sum' or 'spatial_mean', got {self.loss!r}") from None
        try:
            object.__setattr__(self, "granularity", Granularity(self.granularity))
        except ValueError:
            raise ValueError(
                f"granularity must be 'block' or 'layer', got {self.granularity!r}"
            ) from None
        for field in ("iterations", "batch_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        for field in ("rounding_lr", "beta_start", "beta_end", "zeta"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be > 0, got {getattr(self, field)!r}")
        for field in ("weight_scale_lr", "act_scale_lr", "rounding_weight"):
            if not getattr(self, field) >= 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup!r}")
        if not 0 <= self.drop_probability < 1:
            raise ValueError(f"drop_probability must be in [0, 1), got {self.drop_probability!r}")
        if not self.gamma < 0 < 1 < self.zeta:
            raise ValueError("the rectified sigmoid needs gamma < 0 and zeta > 1")

    def replace(self, **overrides: Any) -> ReconstructionConfig:
        return checked_replace(self, "reconstruction", **overrides)

    def to_dict(self) -> dict[str, Any]:
        return to_json_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReconstructionConfig:
        return cls().replace(**data)
