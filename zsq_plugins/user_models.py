"""A user's own model where a zoo name would go: its source, weights, input shape and the
images it is evaluated on. ``zsq quantize`` builds one from its options; a comparison grid
from a ``[grid.user_models.<name>]`` table, and then names it in ``models`` like a zoo model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsq_plugins.configio import check_fields, to_json_dict
from zsq_plugins.input_spec import InputSpec

IMAGE_MODES = {1: "L", 3: "RGB"}
"""PIL's mode for the images of an evaluation folder, by the model's input channels."""
HELD_OUT_SEED_OFFSET = 1
"""Without an evaluation folder, a model is compared with its FP32 self on synthetic images
made with ``seed + 1``: images that calibration (``seed``) did not use."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserModel:
    """A model of the user's, named by ``source``: ``path/to/file.py:factory`` or
    ``package.module:factory`` (a zoo name works too)."""

    source: str
    weights: str | None = None
    """Its state dict: safetensors, or a PyTorch checkpoint read without unpickling."""
    input_shape: tuple[int, ...]
    """(C, H, W) of one input image."""
    mean: tuple[float, ...] | None = None
    """The normalization outside the model (``InputSpec.mean``), if it has one."""
    std: tuple[float, ...] | None = None
    low: float | None = None
    """The valid pixel range (``InputSpec.low``/``high``): synthetic images stay inside."""
    high: float | None = None
    eval_dir: str | None = None
    """Labelled evaluation images, one sub-folder per class (top-1 then means something)."""
    eval_preset: str = "genie"
    """Without ``eval_dir``: the generator of the held-out images (agreement and KL only)."""
    eval_samples: int = 256
    """Without ``eval_dir``: how many held-out images."""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"source must name a model factory, got {self.source!r}")
        spec = InputSpec(
            shape=self.input_shape, mean=self.mean, std=self.std, low=self.low, high=self.high
        )  # checks them all
        shape = spec.shape
        object.__setattr__(self, "input_shape", shape)
        for name in ("mean", "std", "low", "high"):  # as the spec holds them (per channel)
            object.__setattr__(self, name, getattr(spec, name))
        if self.eval_dir is not None and shape[0] not in IMAGE_MODES:
            raise ValueError(f"an eval_dir holds images: 1 or 3 channels, not {shape[0]}")
        if isinstance(self.eval_samples, bool) or not (
            isinstance(self.eval_samples, int) and self.eval_samples > 0
        ):
            raise ValueError(f"eval_samples must be a positive integer, got {self.eval_samples!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UserModel:
        check_fields(cls, data, "user model field")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return to_json_dict(self)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(
            shape=self.input_shape, mean=self.mean, std=self.std, low=self.low, high=self.high
        )

    def load(self) -> nn.Module:
        from zsq_plugins.model_source import load_model

        return load_model(self.source, self.weights)

    def evaluation_data(
        self,
        model: nn.Module,
        test_samples: int | None,
        data_dir: Path,
        seed: int,
        budget: str,
        progress: bool,
    ) -> Any:
        """The ``eval_dir`` images (the first ``test_samples``), or held-out synthetic ones
        (cached under ``data_dir``)."""
        if self.eval_dir is not None:
            from zsq_plugins.datasets import ImageFolder

            mode = IMAGE_MODES[self.input_shape[0]]
            folder = ImageFolder(self.eval_dir, size=self.input_shape[-1], mode=mode)
            images = _AsModelInputs(folder, self.input_spec)
            if test_samples is not None and test_samples < len(images):
                return torch.utils.data.Subset(images, range(test_samples))
            return images
        from zsq_plugins.synthesis import synthesize

        held_out = seed + HELD_OUT_SEED_OFFSET
        name = f"held-out-{self.eval_preset}-{budget}-n{self.eval_samples}-seed{held_out}"
        return synthesize(
            model, self.eval_samples, self.eval_preset, held_out, budget=budget,
            input_spec=self.input_spec, progress=progress, cache_dir=data_dir / name,
        ).images  # fmt: skip


class _AsModelInputs(torch.utils.data.Dataset):
    """An image folder's (image in [0, 1], label) pairs as the model receives them: scaled to
    the spec's pixel range, then normalized as the spec says."""

    def __init__(self, folder: Any, spec: InputSpec) -> None:
        self.folder, self.spec = folder, spec

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.folder[index]
        if self.spec.low is not None and self.spec.high is not None:
            image = self.spec.low + (self.spec.high - self.spec.low) * image
        return self.spec.normalize(image.unsqueeze(0))[0], label
