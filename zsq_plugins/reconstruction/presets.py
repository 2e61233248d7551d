"""Reconstruction presets: named configurations of the one routine."""

from __future__ import annotations

import dataclasses

from zsq_plugins.configio import Budget
from zsq_plugins.reconstruction.config import ReconstructionConfig
from zsq_plugins.registry import Registry

CPU_ITERATIONS = 800
"""Steps per block of the ``cpu`` budget (the papers' is 20000): chosen so that generating 1024
images and reconstructing resnet20_fmnist fit the project's 15-minute target on 2 threads;
its accuracy cost against ``paper`` is measured by benchmarks/reconstruction.py."""
CPU_ROUNDING_LR = 1e-2
"""Rounding learning rate of the ``cpu`` budget (the papers': 1e-3 over 20000 steps). Adam
moves a rounding variable by about one learning rate per step, and one rounding decision
needs a move of order 1 in V: 800 steps at 1e-3 leave almost every weight at its nearest
level, so the short budget takes larger steps."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReconstructionPreset:
    name: str
    description: str
    paper: ReconstructionConfig

    def config(self, budget: Budget | str = Budget.CPU) -> ReconstructionConfig:
        if Budget.parse(budget) is Budget.PAPER:
            return self.paper
        return self.paper.replace(iterations=CPU_ITERATIONS, rounding_lr=CPU_ROUNDING_LR)


RECONSTRUCTIONS: Registry[ReconstructionPreset] = Registry("reconstruction preset")
for _preset in (
    ReconstructionPreset(
        name="adaround",
        description="AdaRound (Nagel et al., 2020): learned rounding, layer by layer.",
        paper=ReconstructionConfig(granularity="layer", learn_act_scales=False),
    ),
    ReconstructionPreset(
        name="brecq",
        description="BRECQ (Li et al., 2021): learned rounding per block with float "
        "activations, then learned activation steps per block with the rounding fixed.",
        paper=ReconstructionConfig(granularity="block", schedule="two_stage"),
    ),
    ReconstructionPreset(
        name="qdrop",
        description="QDrop (Wei et al., 2022): BRECQ with activation quantization randomly "
        "dropped (probability 0.5) while learning.",
        paper=ReconstructionConfig(granularity="block", drop_probability=0.5),
    ),
    ReconstructionPreset(
        name="genie-m",
        description="Genie-M (Jeon et al., 2023): QDrop with weight step sizes learned jointly "
        "with the rounding (lr 1e-4).",
        paper=ReconstructionConfig(granularity="block", drop_probability=0.5, weight_scale_lr=1e-4),
    ),
):
    RECONSTRUCTIONS.register(_preset.name, _preset)
