"""Adaptive BatchNorm (ABN): per-channel statistics of the quantized model's layer outputs
re-estimated on the calibration images and corrected toward the FP model's.

After the AAC+ABN paper's idea (re-estimating BatchNorm statistics of the quantized network on
synthetic data), expressed for models whose BN is folded into the convolutions, as every
adapter builds them. For each conv/linear layer, in execution order:

- ``y_q``: the layer's pre-activation output in the toolkit's quantized model, i.e. its
  quantized weight (the toolkit's scale, zero point and grid, through the handle) applied to
  the input the layer receives *inside the toolkit's model* (upstream quantizers and the
  corrections already made included); ``y_fp``: the BN-folded FP model's output of the same
  layer on the same images. The pre-activation is computed here from the captured input
  because toolkits fuse the activation into the layer (fx's ConvReLU2d), which hides it;
- per output channel c, with means m and standard deviations s over images and positions:
  ``alpha_c = s_fp / s_q`` and ``beta_c = m_fp - alpha_c * m_q``; the layer then computes
  ``alpha * y_q + beta``. ``alpha`` scales the float weight and the weight quantizer's
  per-channel scale together, so every integer level stays where it was (only possible with
  per-channel weight scales; a per-tensor quantized layer gets the mean correction only) and
  ``beta`` (folded with the old bias) becomes the layer's bias.

Layers are corrected one after another, each on inputs that already carry the corrections
upstream, so after the pass every layer's channel means and deviations equal the FP model's
on these images.

The pass walks the model block by block (graph/blocks.py, as reconstruction does): each
block's input in the quantized model is held once per image, its layers are reached from
there, and the next block's input is computed from it once the block is corrected
(graph/block_inputs.py checks each block's replay against a pass from the image on one batch,
and the pass runs from the image where they differ). Running from the image to every layer
costs depth x depth: on a 224 px EfficientNet-Lite0 with 256 images it did not finish in an
hour. The FP side needs no walk: its statistics do not change, so one forward pass collects
every layer's.

The mean term is the empirical bias correction of Nagel et al. (DFQ, 2019); the deviation
term is what re-estimating BN's variance adds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from zsq_plugins.adapter import QuantizedModel, QuantizerHandle
from zsq_plugins.capture import capture_at, float_weight, run_to
from zsq_plugins.errors import ZSQError
from zsq_plugins.graph.block_inputs import BlockInputCache, BlockRunner
from zsq_plugins.graph.blocks import find_blocks
from zsq_plugins.quant.fakequant import fake_quantize
from zsq_plugins.quant.fold import fold_batchnorm

log = logging.getLogger(__name__)

MAX_SCALE_CHANGE = 2.0
"""``alpha`` is kept within [1 / this, this]: a channel whose quantized output is (nearly)
constant would otherwise be blown up by a huge factor."""


@dataclasses.dataclass(frozen=True)
class BNCorrection:
    layer: str
    mean_gap_before: float
    """Mean over channels of |m_q - m_fp| / s_fp before the correction."""
    std_ratio_before: float
    """Median over channels of s_q / s_fp before the correction."""
    scaled: bool
    """Whether the deviations were corrected too (per-channel weight scales)."""


@dataclasses.dataclass
class _Moments:
    count: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def add(self, y: torch.Tensor) -> None:
        per_channel = y.detach().double().transpose(0, 1).flatten(1)
        total, squares = per_channel.sum(1), per_channel.pow(2).sum(1)
        self.count += per_channel.shape[1]
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.total is not None and self.squares is not None
        mean = self.total / self.count
        variance = (self.squares / self.count - mean.pow(2)).clamp_min(0)
        return mean, variance.sqrt()


def layer_moments(
    quantized: QuantizedModel,
    folded: nn.Module,
    handle: QuantizerHandle,
    images: torch.Tensor,
    batch_size: int = 128,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, std) of ``handle.layer``'s pre-activation output in the quantized and
    in the BN-folded FP model, on ``images``, each model run from the image to the layer (the
    reference that ``adapt_batchnorm``'s block walk reproduces)."""
    layer = folded.get_submodule(handle.layer)
    weight = _quantized_weight(quantized, handle, images[:1])
    quantized_moments, fp_moments = _Moments(), _Moments()
    with (
        torch.no_grad(),
        capture_at(quantized.model, handle.layer) as q_store,
        capture_at(folded, handle.layer) as fp_store,
    ):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            x_q = run_to(quantized.model, batch, q_store)
            quantized_moments.add(_apply(layer, x_q, weight.to(x_q)))
            fp_moments.add(layer.forward(run_to(folded, batch, fp_store)))  # not its hook
    return quantized_moments.mean_std(), fp_moments.mean_std()


def _apply(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer`` (a folded FP conv/linear) with ``weight`` in place of its own, no bias."""
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, weight)
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return layer._conv_forward(x, weight, None)
    raise ZSQError(f"adaptive BN handles conv and linear layers, not {type(layer).__name__}")


def _quantized_weight(
    quantized: QuantizedModel, handle: QuantizerHandle, probe: torch.Tensor
) -> torch.Tensor:
    weight = float_weight(quantized.model, handle, probe).detach()
    return fake_quantize(
        weight,
        handle.scale().to(weight),
        handle.zero_point().to(weight),
        handle.quant_min,
        handle.quant_max,
        handle.axis,
    )


TIE_MARGIN = 1e-4
"""Weights whose ``W / s`` lies this close to a rounding tie are snapped before scaling."""


def _scale_channels(weight: torch.Tensor, handle: QuantizerHandle, alpha: torch.Tensor) -> None:
    """Multiplies output channel c of the float ``weight`` and its quantizer's scale by
    ``alpha[c]``, keeping every integer level. In exact arithmetic ``alpha W / (alpha s)`` is
    ``W / s``; in floating point it moves by an ulp, which flips a level when ``W / s`` sits on
    a rounding tie. Min-max observers put the extreme weight of a channel exactly on the
    outer tie (``qmin - 0.5``: symmetric grids are one level longer on the negative side), so
    weights on or beyond the outer ties, or within TIE_MARGIN of an inner one, are first
    written as their grid value, which rounds to the same level in any arithmetic; the rest
    keep their float values (a later reconstruction learns their rounding)."""
    shape = [1] * weight.dim()
    shape[handle.axis] = -1
    scale = handle.scale().to(weight).reshape(shape)
    zero_point = handle.zero_point().to(weight).reshape(shape)
    factor = alpha.to(weight).reshape(shape)
    ratio = weight / scale
    levels = torch.clamp(torch.round(ratio) + zero_point, handle.quant_min, handle.quant_max)
    on_grid = (levels - zero_point) * scale
    outside = (ratio + zero_point <= handle.quant_min - 0.5 + TIE_MARGIN) | (
        ratio + zero_point >= handle.quant_max + 0.5 - TIE_MARGIN
    )
    near_tie = ((ratio - torch.floor(ratio)) - 0.5).abs() < TIE_MARGIN
    weight.copy_(torch.where(outside | near_tie, on_grid, weight) * factor)
    old_scale = handle.scale()
    handle.set_scale(old_scale * alpha.reshape(old_scale.shape).to(old_scale))


def _bias(model: nn.Module, layer: str, channels: int, like: torch.Tensor) -> torch.Tensor:
    module = model.get_submodule(layer)
    if not hasattr(module, "bias"):
        raise ZSQError(
            f"adaptive BN writes the bias of {layer!r}, but the toolkit's module "
            f"{type(module).__name__} has no bias attribute"
        )
    if module.bias is None:  # a bias-free layer gains one (zeros: the same function)
        module.bias = nn.Parameter(torch.zeros(channels, dtype=like.dtype, device=like.device))
    return module.bias


def _execution_order(folded: nn.Module, layers: list[str], probe: torch.Tensor) -> list[str]:
    order: list[str] = []
    hooks = [
        folded.get_submodule(name).register_forward_pre_hook(
            lambda *_, name=name: order.append(name) if name not in order else None
        )
        for name in layers
    ]
    try:
        with torch.no_grad():
            folded(probe)
    finally:
        for hook in hooks:
            hook.remove()
    return order + [name for name in layers if name not in order]


def _fp_moments(
    folded: nn.Module, layers: list[str], images: torch.Tensor, batch_size: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, std) of every layer's output in the folded FP model, in one pass (a
    module called twice counts its first call, as ``capture_at`` stops at it)."""
    moments = {name: _Moments() for name in layers}
    seen: set[str] = set()

    def record(name: str, output: torch.Tensor) -> None:
        if name not in seen:
            seen.add(name)
            moments[name].add(output)

    hooks = [
        folded.get_submodule(name).register_forward_hook(
            lambda _, __, output, name=name: record(name, output)
        )
        for name in layers
    ]
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                seen.clear()
                folded(images[start : start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
    return {name: m.mean_std() for name, m in moments.items()}


def _groups(folded: torch.fx.GraphModule, order: list[str]) -> list[list[str]]:
    """``order`` (the corrected layers, in execution order) cut into the model's blocks; a
    layer outside every block is a group of its own."""
    position = {name: index for index, name in enumerate(order)}
    groups = [[name for name in block.layers if name in position] for block in find_blocks(folded)]
    groups = [group for group in groups if group]
    grouped = {name for group in groups for name in group}
    groups += [[name] for name in order if name not in grouped]
    for group in groups:
        group.sort(key=position.__getitem__)
    return sorted(groups, key=lambda group: position[group[0]])


def _quantized_inputs(
    quantized: QuantizedModel,
    folded: torch.fx.GraphModule,
    order: list[str],
    images: torch.Tensor,
    batch_size: int,
) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
    """Yields each layer of ``order`` with the quantized model's inputs to it, batch by batch,
    walking block by block (module docstring). The caller corrects a layer before asking for
    the next: every later input is computed with the corrections made so far."""
    model = quantized.model
    groups = _groups(folded, order)
    inputs: torch.Tensor | None = None  # the current block's input for every image

    def runner(first: str, point: str | None, verify: bool = True) -> BlockRunner:
        # Without held inputs every call runs from the image: the quadratic cost, only where
        # a block's replay failed its check.
        cache = BlockInputCache.OFF if inputs is None else BlockInputCache.AUTO
        return BlockRunner(model, first, point, images, batch_size, cache, inputs=inputs,
                           verify=verify)  # fmt: skip

    def batches(run: BlockRunner) -> Iterator[torch.Tensor]:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                index = torch.arange(start, min(start + batch_size, len(images)))
                yield run(index.to(images.device))

    for position, group in enumerate(groups):
        first = group[0]
        following = groups[position + 1][0] if position + 1 < len(groups) else None
        if inputs is None:  # the first block, or one after a block that could not be replayed
            start = BlockRunner(model, first, first, images, batch_size, BlockInputCache.AUTO)
            inputs = start.inputs
        # One check per block, through the whole block, before its layers change: a replay
        # that reaches the block's end as a pass from the image does reaches its layers so.
        whole = runner(first, following)
        if not whole.replays:
            inputs = None
        for name in group:
            yield name, batches(runner(first, name, verify=False))
        if following is not None:
            inputs = whole.values(batch_size) if whole.replays else None


def adapt_batchnorm(
    quantized: QuantizedModel,
    fp_model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 32,
    variance: bool = True,
    max_scale_change: float = MAX_SCALE_CHANGE,
    progress: bool = False,
) -> list[BNCorrection]:
    """Corrects every conv/linear layer of ``quantized`` (a toolkit's model from an adapter) so
    that its pre-activation channel means (and, with ``variance`` and per-channel weight
    scales, deviations) on ``images`` equal ``fp_model``'s; see the module docstring. Each
    channel's scale factor is kept within [1 / max_scale_change, max_scale_change]. Writes
    through the handles and the layers' biases; returns the gaps it found, per layer.
    ``batch_size`` images run at a time, and each block's replay is checked on one such
    batch run from the image: a larger one costs more there and saves little elsewhere.
    ``progress`` shows a bar over the layers."""
    if not max_scale_change >= 1:
        raise ValueError(f"max_scale_change must be >= 1, got {max_scale_change!r}")
    if len(images) < 2:
        raise ValueError("adaptive BN estimates statistics: give it at least 2 images")
    device = next((p.device for p in quantized.model.parameters()), torch.device("cpu"))
    images = images.to(device)
    folded = fold_batchnorm(fp_model).to(device).eval()
    quantized.model.eval()
    handles = {h.layer: h for h in quantized.weight_handles()}
    known = dict(folded.named_modules())
    unknown = sorted(name for name in handles if name not in known)
    if unknown:
        raise ZSQError(
            f"weight handles {unknown} name no module of the FP model: an adapter must name "
            "each weight quantizer after the FP model's conv/linear module"
        )
    order = _execution_order(folded, list(handles), images[:1])
    fp_moments = _fp_moments(folded, order, images, batch_size)
    corrections = []
    walk = _quantized_inputs(quantized, folded, order, images, batch_size)
    for name, inputs in tqdm(walk, total=len(order), desc="adaptive BN", unit="layer",
                             disable=not progress):  # fmt: skip
        handle = handles[name]
        layer = folded.get_submodule(name)
        weight = _quantized_weight(quantized, handle, images[:1])
        moments = _Moments()
        for x in inputs:
            moments.add(_apply(layer, x, weight.to(x)))
        (mean_q, std_q), (mean_fp, std_fp) = moments.mean_std(), fp_moments[name]
        scaled = variance and handle.axis is not None
        alpha = torch.ones_like(std_q)
        if scaled:
            usable = (std_q > 1e-12) & (std_fp > 1e-12)
            ratio = (std_fp / std_q.clamp_min(1e-12)).clamp(1 / max_scale_change, max_scale_change)
            alpha = torch.where(usable, ratio, alpha)
        bias = _bias(quantized.model, name, len(mean_q), handle.scale())
        gap = (mean_q + bias.detach().double() - mean_fp).abs() / std_fp.clamp_min(1e-12)
        corrections.append(
            BNCorrection(
                name,
                float(gap.mean()),
                float((std_q / std_fp.clamp_min(1e-12)).median()),
                scaled,
            )
        )
        with torch.no_grad():
            if scaled:
                _scale_channels(float_weight(quantized.model, handle, images[:1]), handle, alpha)
            # m_q was computed without a bias: the new bias carries the whole shift.
            bias.copy_((mean_fp - alpha * mean_q).to(bias))
    log.info("adaptive BN corrected %d layers", len(corrections))
    return corrections
