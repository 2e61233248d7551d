"""The block-reconstruction routine, run on a toolkit's own quantized model through handles.

For each block (blocks.py), in order:
1. targets: the BN-folded FP model's value where the block's output is consumed (the input of
   the first later block's first layer that reads it, blocks.output_points; the logits for
   the last block), on every calibration image;
2. the block's weight quantizers are overridden by AdaRound's soft rounding (with a learned
   step for Genie-M), its activation quantizers (those that run from its first layer to the
   next block's, assignment.py) by LSQ learned steps, with QDrop's random dropping of
   activation quantization while learning;
3. minibatches run through the *toolkit's* model, stopped right after the block's output point
   (the prefix is the already-reconstructed quantized model, as in BRECQ; its output is
   computed once per image and replayed, see graph/block_inputs.py), and the rounding and steps
   minimize the reconstruction error plus AdaRound's annealed regularizer;
4. results are written back on the toolkit's grid: each weight becomes its hard-rounded value
   (on the grid, so the toolkit's own rounding reproduces it), each learned step is set
   through its handle, and the overrides are removed.
Memory follows the block: only the current block's inputs and targets are held (the inputs
optionally on disk), and the block before's while the current block's are computed from them
(a replay of the block before, checked against a run from the image; where it does not match,
they are computed from the image).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from zsq_plugins.adapter import QuantizedModel, QuantizerHandle
from zsq_plugins.capture import capture_at, float_weights, plain_tensor, run_to
from zsq_plugins.graph.block_inputs import BlockInputCache, BlockRunner, cache_tensor
from zsq_plugins.graph.blocks import Block, find_blocks, output_points
from zsq_plugins.phases import PhaseMeter
from zsq_plugins.quant.clipping import clip_activations
from zsq_plugins.quant.fold import fold_batchnorm
from zsq_plugins.quant.weight_clipping import init_weight_steps
from zsq_plugins.reconstruction.assignment import activation_quantizers_by_block
from zsq_plugins.reconstruction.checkpoint import ReconstructionCheckpoint, checkpoint_identity
from zsq_plugins.reconstruction.config import LossReduction, ReconstructionConfig, Schedule
from zsq_plugins.reconstruction.rounding import AdaRoundWeight, LSQActivation, drop_mask

log = logging.getLogger(__name__)

ROUTINE_REVISION = 2
"""Bumped when the routine's results change with its configuration unchanged, so that results
recorded before count as stale (compare.reconstruction_config). 2: every toolkit learns the
same activation quantizers, assigned to blocks by execution order (before, by name, which
left out those named after modules: most ReLU outputs), and learned steps round as the
toolkit does. Not bumped when only the random draws change (QDrop's masks come from
rounding.drop_mask since ImageNet-scale steps needed a cheaper draw): the same method with
other draws, as a new torch release gives, moves a figure within its seed-to-seed spread.
Nor when block inputs and targets are replayed from the block before's: a replay is checked bit
for bit against the pass from the image (the FP targets, run in other batches, may move in
their last bits)."""


@dataclasses.dataclass
class BlockReport:
    name: str
    layers: int
    initial_loss: float
    final_loss: float
    seconds: float
    """Wall time of the whole block: its targets, cached inputs, steps and write-back."""
    fidelity: float
    """Max |routine's final output - toolkit-native output| at the block's output point."""
    hard_loss: float = math.nan
    """The reconstruction loss of the written-back block (hard rounding, no QDrop) on the
    first batch: compared with ``final_loss`` (soft rounding), the cost of rounding."""
    plain_loss: float = math.nan
    """The same loss on the same batch before the block was reconstructed (the toolkit's own
    rounding and steps): ``plain_loss - hard_loss`` is what reconstruction gained on it.
    (``initial_loss`` and ``final_loss`` are of the first and last steps' random batches,
    with the float weights at the start, so they do not compare like that.)"""
    cached_inputs: bool = False
    """Whether the steps ran the block on cached inputs (see graph/block_inputs.py) rather than
    recomputing the prefix."""
    iterations: int = 0
    step_seconds: float = math.nan
    """Wall time of the learning steps alone: ``iterations / step_seconds`` is the block's
    steps/s, what a budget buys, apart from the set-up that ``seconds`` includes."""
    peak_rss_mib: float | None = None
    """The process's peak resident memory while the block ran (phases.py)."""


@dataclasses.dataclass
class ReconstructionReport:
    blocks: list[BlockReport]
    seconds: float
    """Wall time; on a resumed run, this run's plus the restored blocks' recorded seconds."""
    config: dict
    """The configuration it ran with (``ReconstructionConfig.to_dict()``) and the routine's
    ``routine_revision``: what a stored result records to be recognized as current."""
    resumed_blocks: int = 0
    """How many blocks were restored from a checkpoint rather than reconstructed by this run."""

    def to_dict(self) -> dict:
        return {
            "blocks": [dataclasses.asdict(b) for b in self.blocks],
            "seconds": self.seconds,
            "config": self.config,
            "resumed_blocks": self.resumed_blocks,
        }


def _first_layer(block: Block) -> str | None:
    return block.layers[0] if block.layers else None


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The toolkit's own parameters are constants while a block learns: only the routine's
    rounding and step variables receive gradients."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


@contextmanager
def _prefix_without_autograd() -> Iterator[None]:
    """Runs a step's forward with autograd off until the block's first quantizer switches it
    on (every override does): the already-reconstructed prefix has nothing to learn, so it
    builds no graph, which saves its memory and half of every step's time on deep blocks.
    Leaving the context restores the caller's mode."""
    with torch.no_grad():
        yield


def _beta(config: ReconstructionConfig, step: int) -> float | None:
    """AdaRound's temperature: None during warm-up, then linear from beta_start to beta_end."""
    start = config.warmup * config.iterations
    if step < start:
        return None
    progress = (step - start) / max(1.0, config.iterations - start)
    return config.beta_start + (config.beta_end - config.beta_start) * progress


def block_loss(
    output: torch.Tensor, target: torch.Tensor, reduction: LossReduction
) -> torch.Tensor:
    """The squared error of a block's output per image (ReconstructionConfig.loss), averaged
    over the batch."""
    error = (output - target).pow(2)
    if reduction is LossReduction.SPATIAL_MEAN and error.dim() > 2:
        return error.sum(1).flatten(1).mean(1).mean()
    return error.flatten(1).sum(1).mean()


def reconstruct_block(
    quantized: QuantizedModel,
    block: Block,
    point: str | None,
    images: torch.Tensor,
    targets: torch.Tensor,
    config: ReconstructionConfig,
    generator: torch.Generator,
    act_handles: list[QuantizerHandle],
    bar: tqdm | None = None,
    learn_rounding: bool = True,
    inputs: torch.Tensor | None = None,
) -> tuple[BlockReport, torch.Tensor | None]:
    """Reconstructs one block; ``act_handles`` are the activation quantizers it learns
    (assignment.py). Without ``learn_rounding`` the weights keep their rounding (the second
    stage of BRECQ's schedule learns activation steps only). ``inputs``: the block's input for
    every image, already computed (None: the runner computes them from the images). Returns
    the report and the block inputs the steps replayed (None where they ran the prefix), from
    which the next block's are computed."""
    model = quantized.model
    weight_handles = [
        h for h in quantized.weight_handles() if learn_rounding and h.layer in block.layers
    ]
    started = time.perf_counter()
    floats = float_weights(model, weight_handles, images, point)
    first = _first_layer(block)
    runner = BlockRunner(
        model,
        first or "",
        point,
        images,
        config.batch_size,
        config.block_inputs if first is not None else BlockInputCache.OFF,
        block_quantizers=[h.module for h in weight_handles + act_handles],
        inputs=inputs,
    )
    # The probe batch runs through the runner too: a replay where it can (checked to be the
    # forward pass from the image), so that no probe costs the whole prefix.
    probe = torch.arange(min(config.batch_size, len(images)), device=images.device)
    with torch.no_grad():
        plain_output = runner(probe)
    plain = block_loss(plain_output, targets[: len(probe)], config.loss)
    learn_scale = config.weight_scale_lr > 0
    roundings = [
        AdaRoundWeight(
            w.detach(),
            h.scale(),
            h.zero_point(),
            h.quant_min,
            h.quant_max,
            config.zeta,
            config.gamma,
            learn_scale,
        )
        for w, h in zip(floats, weight_handles, strict=True)
    ]
    steps = [
        LSQActivation(h.scale(), h.zero_point(), h.quant_min, h.quant_max) for h in act_handles
    ]
    step_shapes = [h.scale().shape for h in act_handles]
    training = {"on": True}

    def write_steps() -> None:
        """Puts the learned steps in the toolkit's quantizers, as the write-back will: each
        LSQActivation takes its forward value from the toolkit's output (rounding.py)."""
        with torch.no_grad():
            for handle, lsq, shape in zip(act_handles, steps, step_shapes, strict=True):
                handle.set_scale(lsq.scale.detach().reshape(shape))

    def activation(lsq: LSQActivation):
        def quantize(x: torch.Tensor, toolkit_output: torch.Tensor) -> torch.Tensor:
            torch.set_grad_enabled(True)
            keep_float = None
            if training["on"] and config.drop_probability > 0:  # QDrop
                keep_float = drop_mask(x.shape, config.drop_probability, generator).to(x.device)
            # the toolkit's value, LSQ's gradient
            return lsq(x, plain_tensor(toolkit_output), keep_float)

        return quantize

    def weight(rounding: AdaRoundWeight):
        def quantize(_: torch.Tensor) -> torch.Tensor:
            torch.set_grad_enabled(True)  # see _prefix_without_autograd
            return rounding(hard=not training["on"])

        return quantize

    removers = [h.override(weight(r)) for h, r in zip(weight_handles, roundings, strict=True)]
    if config.learn_act_scales:
        removers += [
            h.override(activation(s), with_output=True)
            for h, s in zip(act_handles, steps, strict=True)
        ]
    groups = [{"params": [r.rounding for r in roundings], "lr": config.rounding_lr}]
    groups = [g for g in groups if g["params"]]
    scale_groups = []
    if learn_scale:
        scale_groups.append({"params": [r.scale for r in roundings], "lr": config.weight_scale_lr})
    if config.learn_act_scales and steps and config.act_scale_lr > 0:
        scale_groups.append({"params": [s.scale for s in steps], "lr": config.act_scale_lr})
    optimizer = torch.optim.Adam(groups + scale_groups) if groups + scale_groups else None
    scale_params = [p for g in scale_groups for p in g["params"]]
    initial = final = math.nan
    steps_started = time.perf_counter()
    try:
        with _frozen(model):
            for step in range(config.iterations):
                index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
                index = index.to(images.device)
                with _prefix_without_autograd():
                    output = runner(index)
                loss = block_loss(output, targets[index], config.loss)
                reconstruction = float(loss.detach())
                beta = _beta(config, step)
                if beta is not None and roundings:
                    loss = loss + config.rounding_weight * sum(
                        r.regularizer(beta) for r in roundings
                    )
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                for parameter in scale_params:  # a step size must stay positive
                    parameter.data.clamp_(min=1e-8)
                if config.learn_act_scales:
                    write_steps()
                if step == 0:
                    initial = reconstruction
                final = reconstruction
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(block=block.name, loss=f"{reconstruction:.4g}", refresh=False)
    finally:
        training["on"] = False
        step_seconds = time.perf_counter() - steps_started
        cached_inputs = runner.replays
        held = runner.inputs
    try:
        with torch.no_grad():
            routine_output = runner(probe).detach().clone()  # hard, no QDrop
    finally:
        for remover in removers:
            remover.remove()
    with torch.no_grad():  # write back on the toolkit's own grid
        for weight, handle, rounding in zip(floats, weight_handles, roundings, strict=True):
            handle.set_scale(rounding.scale.detach().flatten())
            weight.copy_(rounding(hard=True).reshape(weight.shape).to(weight))
        if config.learn_act_scales:
            write_steps()
        native_output = runner(probe)
    runner.close()
    fidelity = float((native_output - routine_output).abs().max())
    hard = block_loss(native_output, targets[: len(probe)], config.loss)
    report = BlockReport(
        block.name,
        len(block.layers),
        initial,
        final,
        round(time.perf_counter() - started, 3),
        fidelity,
        hard_loss=float(hard),
        plain_loss=float(plain),
        cached_inputs=cached_inputs,
        iterations=config.iterations,
        step_seconds=round(step_seconds, 3),
    )
    return report, held


def _next_values(
    model: nn.Module,
    first: str | None,
    inputs: torch.Tensor | None,
    point: str | None,
    images: torch.Tensor,
    config: ReconstructionConfig,
) -> torch.Tensor | None:
    """``model``'s value at ``point`` for every image, replayed from ``inputs`` (its value at
    ``first``) rather than run from the image; None where that is not possible (no inputs, no
    point, or a replay that does not match a forward pass from the image)."""
    if inputs is None or first is None or point is None:
        return None
    runner = BlockRunner(model, first, point, images, config.batch_size, config.block_inputs,
                         inputs=inputs)  # fmt: skip
    values = runner.values(config.batch_size) if runner.replays else None
    runner.close()
    return values


def _targets(
    folded: nn.Module, point: str | None, images: torch.Tensor, cache: BlockInputCache
) -> torch.Tensor:
    """The FP model's value at ``point`` for every image, run from the image, kept where block
    inputs are (a 224 px model's early targets for 1,024 images hold gigabytes)."""
    chunk = 256
    with torch.no_grad(), capture_at(folded, point) as store:
        first = run_to(folded, images[:chunk], store).detach()
        if cache is BlockInputCache.OFF:
            cache = BlockInputCache.AUTO  # targets are needed on every step either way
        targets = cache_tensor((len(images), *first.shape[1:]), first.dtype, cache)
        targets[: len(first)] = first.cpu()
        for start in range(chunk, len(images), chunk):
            value = run_to(folded, images[start : start + chunk], store).detach()
            targets[start : start + len(value)] = value.cpu()
    return targets.to(images.device)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pass over every block: its configuration, whether it learns the rounding, and
    whether activations stay float during it; ``label`` prefixes its block names."""

    label: str
    config: ReconstructionConfig
    learn_rounding: bool = True
    float_activations: bool = False


def schedule_stages(config: ReconstructionConfig) -> list[Stage]:
    """``joint``: one pass learning rounding and activation steps together. ``two_stage``
    (BRECQ): the rounding of every block with activations float, then the activation steps of
    every block with the rounding fixed, ``act_stage_fraction`` as many steps."""
    if config.schedule is Schedule.JOINT:
        return [Stage("", config)]
    rounding = Stage("rounding:", config.replace(learn_act_scales=False), float_activations=True)
    if not config.learn_act_scales:
        return [rounding]
    steps = max(1, round(config.iterations * config.act_stage_fraction))
    return [rounding, Stage("activations:", config.replace(iterations=steps), learn_rounding=False)]


@contextmanager
def _activations_off(handles: list[QuantizerHandle]) -> Iterator[None]:
    """Activation quantizers switched off while a stage learns with float activations."""
    for handle in handles:
        handle.set_enabled(False)
    try:
        yield
    finally:
        for handle in handles:
            handle.set_enabled(True)


def reconstruct(
    quantized: QuantizedModel,
    fp_model: nn.Module,
    images: torch.Tensor,
    config: ReconstructionConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> ReconstructionReport:
    """Reconstructs ``quantized`` (a toolkit's model from an adapter) block by block so that it
    reproduces ``fp_model`` on ``images`` (real or synthetic calibration images).

    With ``checkpoint_dir``, the state after every block is saved there, and a run that finds
    a checkpoint of the same reconstruction (configuration, seed, images, toolkit model
    layout) resumes after its last finished block (checkpoint.py)."""
    device = next((p.device for p in quantized.model.parameters()), torch.device("cpu"))
    images = images.to(device)  # runs where the toolkit's model lives (CPU or a GPU)
    folded = fold_batchnorm(fp_model).to(device)
    blocks = find_blocks(folded, config.granularity)
    points = output_points(folded, blocks)
    generator = torch.Generator().manual_seed(seed)
    quantized.model.eval()
    started = time.perf_counter()
    recorded = {**config.to_dict(), "routine_revision": ROUTINE_REVISION}
    stages = schedule_stages(config)
    steps = [(stage, block) for stage in stages for block in blocks]
    # Switched on now, before a checkpoint's state (saved while a stage held them off) loads.
    activations = [h for h in quantized.activation_handles() if h.enabled]
    checkpoint = None
    restored: list[BlockReport] = []
    if checkpoint_dir is not None:
        names = [stage.label + block.name for stage, block in steps]
        identity = checkpoint_identity(recorded, seed, images, names, quantized.model)
        checkpoint = ReconstructionCheckpoint(checkpoint_dir, identity)
        restored = [BlockReport(**r) for r in checkpoint.restore(quantized.model, generator)]
    for handle in activations:
        handle.set_enabled(True)
    # A restored state already holds the initialized (and learned) steps.
    if config.init_act_ranges and not restored:
        changed = clip_activations(quantized, images, seed=seed)
        log.info("activation ranges initialized by MSE search: %d changed", len(changed))
    if config.init_weight_steps and not restored:
        searched = init_weight_steps(quantized, images[:1])
        log.info(
            "weight steps initialized by L_p search: %d of %d channels changed",
            sum(r.changed for r in searched),
            sum(r.channels for r in searched),
        )
    learned_activations = activation_quantizers_by_block(quantized, blocks, images[:1])
    reports = list(restored)
    meter = PhaseMeter()  # each block's time and peak memory, its targets included
    with tqdm(
        total=sum(stage.config.iterations for stage, _ in steps),
        initial=sum(stage.config.iterations for stage, _ in steps[: len(restored)]),
        desc="reconstruct",
        unit="step",
        disable=not progress,
    ) as bar:
        # The block before's inputs (toolkit model) and targets (FP model), from which this
        # block's are replayed when they can be: running every block's from the image costs
        # depth x depth (most of a 224 px block's set-up).
        before: tuple[str | None, torch.Tensor | None, str | None, torch.Tensor] | None = None
        for position, (stage, block) in enumerate(steps):
            if position < len(restored):
                continue
            index = position % len(blocks)
            point = points[index]
            first = _first_layer(block)
            name = stage.label + block.name
            if index == 0:  # a stage starts: activations may switch, nothing carries over
                before = None
            with (
                meter.phase(name),
                _activations_off(activations if stage.float_activations else []),
            ):
                inputs = targets = None
                if before is not None:
                    first_before, inputs_before, point_before, targets_before = before
                    before = None
                    model = quantized.model
                    inputs = _next_values(model, first_before, inputs_before, first, images,
                                          stage.config)  # fmt: skip
                    if point_before is not None and point_before == first:
                        targets = _next_values(folded, first, targets_before, point, images,
                                               stage.config)  # fmt: skip
                    del inputs_before, targets_before
                if targets is None:
                    targets = _targets(folded, point, images, config.block_inputs)
                else:
                    targets = targets.to(images.device)
                report, inputs = reconstruct_block(
                    quantized,
                    block,
                    point,
                    images,
                    targets,
                    stage.config,
                    generator,
                    [] if stage.float_activations else learned_activations[index],
                    bar,
                    learn_rounding=stage.learn_rounding,
                    inputs=inputs,
                )
                before = (first, inputs, point, targets)
                del inputs, targets
            report = dataclasses.replace(
                report,
                name=name,
                seconds=meter.seconds[name],
                peak_rss_mib=meter.peak_rss_mib.get(name),
            )
            log.info(
                "block %s: loss on the first batch %.4g -> %.4g (steps: first %.4g, last %.4g)",
                report.name,
                report.plain_loss,
                report.hard_loss,
                report.initial_loss,
                report.final_loss,
            )
            reports.append(report)
            if checkpoint is not None:
                checkpoint.save(quantized.model, generator, reports)
    seconds = time.perf_counter() - started + sum(r.seconds for r in restored)
    return ReconstructionReport(reports, round(seconds, 3), recorded, len(restored))
