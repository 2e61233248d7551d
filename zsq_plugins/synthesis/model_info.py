"""What the engine needs to know about a model: input shape, input normalization, sanity."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from zsq_plugins.errors import UnsupportedModelError
from zsq_plugins.input_spec import InputSpec
from zsq_plugins.layers import Normalize


@dataclasses.dataclass(frozen=True)
class InputDomain:
    """How the model's inputs relate to the normalized space the generators work in.

    ``x = z * std + mean``: the engine optimizes ``z`` (zero mean, unit variance per channel
    for natural images) and feeds ``x`` to the model. ``low``/``high`` bound valid inputs.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    low: float | tuple[float, ...] | None = None
    """The lowest valid input, for all channels or per channel (None: unbounded)."""
    high: float | tuple[float, ...] | None = None

    def to_input(self, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (z.dim() - 2)
        mean = torch.tensor(self.mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(self.std, dtype=z.dtype, device=z.device).view(shape)
        return z * std + mean

    def clamp_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` limited to the normalized image of [low, high] (differentiable inside)."""
        if self.low is None or self.high is None:
            return z
        shape = (1, -1) + (1,) * (z.dim() - 2)
        mean, std, low, high = (
            torch.tensor(v, dtype=z.dtype, device=z.device).view(shape)
            for v in (self.mean, self.std, self.low, self.high)
        )
        return torch.maximum(torch.minimum(z, (high - mean) / std), (low - mean) / std)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """BatchNorm layers with running statistics, in module order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.track_running_stats
        and module.running_mean is not None
    ]


def input_domain(
    model: nn.Module,
    channels: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    spec: InputSpec | None = None,
) -> InputDomain:
    """The input domain: an ``InputSpec``'s, explicit ``mean``/``std``, else the model's own
    ``Normalize`` module (zoo models: inputs in [0, 1]), else inputs already normalized (mean
    0, std 1)."""
    if (mean is None) != (std is None):
        raise ValueError("give both input_mean and input_std, or neither")
    if spec is not None:
        return _spec_domain(model, spec)
    if mean is not None and std is not None:
        return InputDomain(_per_channel(mean, channels), _per_channel(std, channels))
    for module in model.modules():
        if isinstance(module, Normalize):
            return InputDomain(
                _per_channel(module.mean.flatten().tolist(), channels),
                _per_channel(module.std.flatten().tolist(), channels),
                low=0.0,
                high=1.0,
            )
    return InputDomain((0.0,) * channels, (1.0,) * channels)


def _spec_domain(model: nn.Module, spec: InputSpec) -> InputDomain:
    """Normalized outside the model: the model's input is the normalized image itself, and
    the pixel range maps to a range per channel. Otherwise the model takes pixels, normalized
    inside by its ``Normalize`` module if it has one."""
    channels = spec.shape[0]
    if spec.mean is not None and spec.std is not None:
        bounds: dict[str, Any] = {}
        if spec.low is not None and spec.high is not None:
            pairs = list(zip(spec.mean, spec.std, strict=True))
            bounds = {
                "low": tuple((spec.low - mean) / std for mean, std in pairs),
                "high": tuple((spec.high - mean) / std for mean, std in pairs),
            }
        return InputDomain((0.0,) * channels, (1.0,) * channels, **bounds)
    inside = input_domain(model, channels)
    if not spec.bounded:
        return inside
    return InputDomain(inside.mean, inside.std, low=spec.low, high=spec.high)


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"expected 1 or {channels} per-channel values, got {len(values)}")
    return values


def infer_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """``model.input_shape`` when the model declares it (the zoo's models do), else None."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return None
    return tuple(int(s) for s in shape)


def check_finite_weights(model: nn.Module) -> None:
    for name, tensor in _named_tensors(model):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise UnsupportedModelError(
                f"{name} holds {bad} NaN/Inf value(s); the model's weights are broken. "
                "Reload or repair the checkpoint before generating data from it."
            )


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's parameter and buffer names, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def check_input_shape(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> int:
    """Runs one dummy batch; returns the number of outputs, or explains a shape mismatch."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=device))
    except RuntimeError as error:
        raise UnsupportedModelError(
            f"the model rejects inputs of shape (N, {', '.join(map(str, input_shape))}): "
            f"{error}. Pass input_shape=(C, H, W) matching the model."
        ) from error
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UnsupportedModelError(
            "the model must return a (N, classes) tensor of logits; got "
            f"{type(out).__name__}{'' if not isinstance(out, torch.Tensor) else tuple(out.shape)}"
        )
    return out.shape[1]
