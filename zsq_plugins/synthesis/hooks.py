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
class BNStatistics:
    """Statistics of one BatchNorm layer's input in the last forward pass."""

    batch_mean: torch.Tensor  # (C,)
    batch_std: torch.Tensor  # (C,)
    sample_mean: torch.Tensor  # (N, C)
    sample_std: torch.Tensor  # (N, C)
    positions: int  # H * W (1 for BatchNorm1d): values per channel per sample


@dataclasses.dataclass(frozen=True)
class BNTarget:
    name: str
    mean: torch.Tensor
    std: torch.Tensor


class BNStatisticsCapture:
    """Records, at every given BatchNorm, the per-channel mean and std of its input."""

    def __init__(self, layers: list[tuple[str, nn.modules.batchnorm._BatchNorm]]) -> None:
        self.layers = layers
        self.targets = [
            BNTarget(
                name,
                module.running_mean.detach().clone(),
                torch.sqrt(module.running_var.detach() + module.eps),
            )
            for name, module in layers
        ]
        self.stats: list[BNStatistics | None] = [None] * len(layers)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, index: int, eps: float):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            flat = x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)  # (N, C, P)
            sample_var, sample_mean = torch.var_mean(flat, dim=2, correction=0)
            batch_mean = sample_mean.mean(0)
            # Batch variance = mean within-sample variance + variance of the sample means.
            batch_var = sample_var.mean(0) + ((sample_mean - batch_mean) ** 2).mean(0)
            self.stats[index] = BNStatistics(
                batch_mean=batch_mean,
                batch_std=torch.sqrt(batch_var + eps),
                sample_mean=sample_mean,
                sample_std=torch.sqrt(sample_var + eps),
                positions=flat.shape[2],
            )

        return record

    def __enter__(self) -> BNStatisticsCapture:
        for index, (_, module) in enumerate(self.layers):
            self._handles.append(module.register_forward_pre_hook(self._hook(index, module.eps)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def collected(self) -> list[BNStatistics]:
        missing = [t.name for t, s in zip(self.targets, self.stats, strict=True) if s is None]
        if missing:
            raise RuntimeError(f"BatchNorm layers not reached by the forward pass: {missing}")
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
