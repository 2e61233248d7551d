"""The ``auto`` budget: defaults that scale with the model's cost per image.

The ``cpu`` budgets (1,024 images; 130 generation steps for Genie; 800 reconstruction steps a
block) were sized on the Fashion-MNIST zoo models, which cost at most ``REFERENCE_MACS``
multiply-accumulates per image. A 224 px ImageNet CNN costs 10 to 100 times more per image,
and the same budgets would take many hours on a CPU. ``auto`` keeps the ``cpu`` budget for
models up to the reference cost and, above it, bounds the compute of each phase:

- images: ``1024 x REFERENCE_MACS / macs``, between 128 and 1,024 (a multiple of 32);
- generation steps per batch: as many as ``GENERATION_MACS`` allows for those images
  (``GENERATION_MACS / (images x (macs + generator macs))``: Genie's generator costs three
  times EfficientNet-Lite0 at 224 px), between ``MIN_GENERATION_STEPS`` and the preset's
  ``cpu`` count;
- reconstruction steps per block: as many as ``RECONSTRUCTION_MACS`` allows at the preset's
  batch size (``RECONSTRUCTION_MACS / (batch x macs)``), between ``MIN_RECONSTRUCTION_STEPS``
  and the ``cpu`` count;
- generation batch: at most ``GENERATION_BATCH_MACS / macs`` images (a power of 2, at least
  16), so that a 224 px model's activations and gradients fit in a few GiB.

The cost is the forward multiply-accumulates of the model's convolutions and linear layers
on one image (``model_macs``). It is a proxy: a reconstruction step on a model with large
early activations (depthwise convolutions at 112 px) also spends much time on elementwise
fake quantization, which MACs do not count. The caps were measured to keep
``apply(efficientnet_lite0, "fx", "W4A8", data="genie", reconstruct="genie-m")`` within 45
minutes on 2 CPU threads (benchmarks/imagenet.py records each phase). The same cost gives
the same budget on every machine, so results do not depend on how fast the machine that made
them was; on a GPU, ask for ``paper``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Sequence
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from zsq_plugins.errors import UnsupportedModelError

REFERENCE_MACS = 32_000_000
"""Forward MACs per image up to which ``auto`` is the ``cpu`` budget (resnet20_fmnist: 31 M)."""
MAX_IMAGES, MIN_IMAGES = 1024, 128
GENERATION_MACS = 5.0e12
"""Forward MACs of the generation phase (images x steps x (model + generator macs)) above the
reference cost: about 15 minutes for EfficientNet-Lite0 on 2 CPU threads."""
RECONSTRUCTION_MACS = 1.6e12
"""Forward MACs of each block's steps (steps x batch x macs) above the reference cost: about
20 minutes of reconstruction for EfficientNet-Lite0 on 2 CPU threads."""
GENERATION_BATCH_MACS = 25.0e9
"""Forward MACs of one generation batch (batch x macs) above the reference cost."""
MIN_GENERATION_STEPS = 20
MIN_RECONSTRUCTION_STEPS = 50


def model_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward multiply-accumulates of ``model``'s convolutions and linear layers on one image
    of ``input_shape`` (C, H, W), counted by running it once."""
    total = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, nn.modules.conv._ConvNd):
            kernel = 1
            for size in module.kernel_size:
                kernel *= size
            per_output = module.in_channels // module.groups * kernel
            total += output[0].numel() * per_output
        elif isinstance(module, nn.Linear):
            total += output[0].numel() * module.in_features

    layers = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]
    hooks = [layer.register_forward_hook(count) for layer in layers]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    except RuntimeError as error:
        raise UnsupportedModelError(
            f"the model rejects inputs of shape (N, {', '.join(map(str, input_shape))}): "
            f"{error}. Give the shape it expects (input_spec=InputSpec(shape=...))."
        ) from error
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return total


class _Replaceable(Protocol):
    iterations: int
    batch_size: int

    def replace(self, **overrides: Any) -> Any: ...


Config = TypeVar("Config", bound=_Replaceable)


@dataclasses.dataclass(frozen=True)
class AutoBudget:
    """What ``auto`` gives a model of ``macs`` forward MACs per image."""

    macs: int
    images: int
    """Calibration images (``apply``'s ``num_samples`` when not given)."""
    scaled: bool
    """Whether the model costs more than the reference (False: the ``cpu`` budget)."""

    def generation_steps(
        self, cpu_steps: int, images: int | None = None, source_macs: int = 0
    ) -> int:
        """Steps per batch for generating ``images`` (default ``self.images``), each step
        running the model and an image source (Genie's generator) of ``source_macs``."""
        if not self.scaled:
            return cpu_steps
        affordable = int(GENERATION_MACS / ((images or self.images) * (self.macs + source_macs)))
        return max(MIN_GENERATION_STEPS, min(cpu_steps, affordable))

    def generation_batch(self, cpu_batch: int) -> int:
        if not self.scaled:
            return cpu_batch
        affordable = max(16, 2 ** int(math.log2(GENERATION_BATCH_MACS / self.macs)))
        return min(cpu_batch, affordable)

    def reconstruction_steps(self, cpu_steps: int, batch_size: int) -> int:
        if not self.scaled:
            return cpu_steps
        affordable = int(RECONSTRUCTION_MACS / (batch_size * self.macs))
        return max(MIN_RECONSTRUCTION_STEPS, min(cpu_steps, affordable))

    def scale_synthesis(
        self, config: Config, images: int, fixed: Collection[str] = (), source_macs: int = 0
    ) -> Config:
        """A generator's ``cpu`` configuration with the steps and batch of this budget for
        ``images`` images made with an image source of ``source_macs`` per image; the
        fields named in ``fixed`` (set by the caller) are kept."""
        changes = {
            "iterations": self.generation_steps(config.iterations, images, source_macs),
            "batch_size": self.generation_batch(config.batch_size),
        }
        return config.replace(**{k: v for k, v in changes.items() if k not in fixed})

    def scale_reconstruction(self, config: Config, fixed: Collection[str] = ()) -> Config:
        """A reconstruction's ``cpu`` configuration with this budget's steps per block; kept
        when ``fixed`` names ``iterations``."""
        if "iterations" in fixed:
            return config
        return config.replace(
            iterations=self.reconstruction_steps(config.iterations, config.batch_size)
        )


def auto_budget(macs: int) -> AutoBudget:
    """The ``auto`` budget of a model costing ``macs`` forward MACs per image."""
    if macs <= REFERENCE_MACS:
        return AutoBudget(macs=macs, images=MAX_IMAGES, scaled=False)
    images = int(MAX_IMAGES * REFERENCE_MACS / macs) // 32 * 32
    return AutoBudget(macs=macs, images=max(MIN_IMAGES, min(MAX_IMAGES, images)), scaled=True)


def auto_images(model: nn.Module, input_shape: Sequence[int] | None) -> int:
    """The number of calibration images ``auto`` gives ``model`` (``MAX_IMAGES`` when its
    input shape is unknown: the step that needs the shape then says so)."""
    if input_shape is None:
        return MAX_IMAGES
    return auto_budget(model_macs(model, input_shape)).images
