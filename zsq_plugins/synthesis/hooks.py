"""Forward hooks used during synthesis: BN statistics capture, features, swing convolution.

Each is a context manager that removes its hooks in ``finally``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn


@dataclasses.dataclass
class ChannelStatistics:
    """Per-channel statistics of one captured tensor in the last forward pass."""

    batch_mean: torch.Tensor  # (C,)
    batch_std: torch.Tensor  # (C,)
    sample_mean: torch.Tensor  # (N, C)
    sample_std: torch.Tensor  # (N, C)
    positions: int  # H * W (1 for (N, C) tensors): values per channel per sample


@dataclasses.dataclass(frozen=True)
class StatisticsTarget:
    """Where statistics are read (a module's input or output) and what they should be."""

    name: str
    module: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    on_output: bool = False
    eps: float = 1e-5
    channel_axis: int = 1
    """Where the channels lie in the tensor read (the last axis for a linear layer applied to
    tokens or channel-last maps)."""


def batchnorm_targets(
    layers: list[tuple[str, nn.modules.batchnorm._BatchNorm]],
) -> list[StatisticsTarget]:
    """Each BatchNorm's input should have its running mean and std (ZeroQ, DSG, Genie)."""
    return [
        StatisticsTarget(
            name,
            module,
            module.running_mean.detach().clone(),
            torch.sqrt(module.running_var.detach() + module.eps),
            on_output=False,
            eps=module.eps,
        )
        for name, module in layers
    ]


class StatisticsCapture:
    """Records, at every target's module input or output, the per-channel mean and std."""

    def __init__(self, targets: list[StatisticsTarget]) -> None:
        self.targets = targets
        self.stats: list[ChannelStatistics | None] = [None] * len(targets)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _record(self, index: int, x: torch.Tensor, eps: float) -> None:
        axis = self.targets[index].channel_axis % x.dim()
        if axis != 1:
            x = x.movedim(axis, 1)
        flat = x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)  # (N, C, P)
        # E[y^2] - E[y]^2 of the values less their own mean, held constant: the values and
        # gradients of torch.var_mean (the formula is shift-invariant, and the shift leaves
        # nothing to cancel) at about two thirds of its cost on CPU, where var_mean's
        # Welford pass was a third of a BN-statistics synthesis step.
        sample_mean = flat.mean(2)
        shifted = flat - sample_mean.detach()[..., None]
        shifted_mean = shifted.mean(2)
        sample_var = (shifted * shifted).mean(2).sub(shifted_mean * shifted_mean).clamp_min(0)
        batch_mean = sample_mean.mean(0)
        # Batch variance = mean within-sample variance + variance of the sample means.
        batch_var = sample_var.mean(0) + ((sample_mean - batch_mean) ** 2).mean(0)
        self.stats[index] = ChannelStatistics(
            batch_mean=batch_mean,
            batch_std=torch.sqrt(batch_var + eps),
            sample_mean=sample_mean,
            sample_std=torch.sqrt(sample_var + eps),
            positions=flat.shape[2],
        )

    def __enter__(self) -> StatisticsCapture:
        for index, target in enumerate(self.targets):
            if target.on_output:
                hook = target.module.register_forward_hook(
                    lambda _, args, out, i=index, e=target.eps: self._record(i, out, e)
                )
            else:
                hook = target.module.register_forward_pre_hook(
                    lambda _, args, i=index, e=target.eps: self._record(i, args[0], e)
                )
            self._handles.append(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def collected(self) -> list[ChannelStatistics]:
        missing = [t.name for t, s in zip(self.targets, self.stats, strict=True) if s is None]
        if missing:
            raise RuntimeError(f"layers not reached by the forward pass: {missing}")
        return [s for s in self.stats if s is not None]


def last_linear(model: nn.Module) -> nn.Linear | None:
    """The last ``nn.Linear`` in module order: the classifier, whose input are the features."""
    found = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            found = module
    return found


@contextlib.contextmanager
def capture_input(module: nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """Yields a list that holds ``module``'s input of the latest forward pass."""
    store: list[torch.Tensor] = []
    if module is None:
        yield store
        return

    def record(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        store[:] = [inputs[0]]

    handle = module.register_forward_pre_hook(record)
    try:
        yield store
    finally:
        handle.remove()


@contextlib.contextmanager
def swing_convolution(model: nn.Module, jitter: int, generator: torch.Generator) -> Iterator[None]:
    """Genie's swing convolution on every strided conv of ``model``, for the ``with`` body.

    The input of a strided convolution is reflect-padded by ``jitter`` pixels and cropped back
    to its size at a random offset, so that the stride grid lands on different pixels at each
    step (Genie, Sec. 3.2). Implemented as forward pre-hooks; the model is not modified.
    """
    if jitter <= 0:
        yield
        return

    def shift(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = inputs[0]
        height, width = x.shape[-2:]
        if min(height, width) <= jitter:  # reflect padding needs more pixels than the pad
            return inputs
        dy, dx = torch.randint(0, 2 * jitter + 1, (2,), generator=generator).tolist()
        padded = nn.functional.pad(x, [jitter] * 4, mode="reflect")
        return (padded[..., dy : dy + height, dx : dx + width], *inputs[1:])

    handles = [
        module.register_forward_pre_hook(shift)
        for module in model.modules()
        if isinstance(module, nn.Conv2d) and max(module.stride) > 1
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode with no parameter gradients; both restored on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(was_training)
