"""What a comparison grid is: its axes and options (``GridConfig``, usually read from a TOML
file, see docs/compare.md) and its cells."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from zsq_plugins.configio import Budget, check_fields, to_json_dict
from zsq_plugins.errors import ZSQError
from zsq_plugins.spec import QuantSpec
from zsq_plugins.user_models import UserModel

REAL = "real"
"""The data source name for real training images (the models' own data, where it exists)."""
NO_RECONSTRUCTION = "none"
PLAIN = "plain"
CALIBRATIONS: dict[str, dict[str, bool]] = {
    PLAIN: {},
    "aac": {"aac": True},
    "abn": {"abn": True},
    "aac+abn": {"aac": True, "abn": True},
}
"""What runs after the toolkit's own calibration: accurate activation clipping (``aac``),
adaptive BN (``abn``), both, or nothing (``plain``); apply's options of the same names."""


AXES = {
    "models": "model",
    "toolkits": "toolkit",
    "data": "data",
    "specs": "spec",
    "reconstruct": "reconstruct",
    "calibration": "calibration",
}
"""The grid's axes (config fields) and the Cell field each one sets."""


def _names(value: Any, field: str) -> tuple[str, ...]:
    values = (value,) if isinstance(value, str) else tuple(value)
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{field} must be a non-empty list of names, got {value!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{field} lists a name twice: {list(values)}")
    return values


@dataclasses.dataclass(frozen=True, kw_only=True)
class GridConfig:
    """One comparison: every combination of the five axes is a cell."""

    models: tuple[str, ...]
    """Zoo model names (``zsq zoo`` lists them)."""
    toolkits: tuple[str, ...]
    """Adapter names (``fx``, ``nncf``, ``brevitas`` or a plugin's)."""
    data: tuple[str, ...]
    """``real`` (the model's training images) and/or generator preset names."""
    specs: tuple[str, ...]
    """QuantSpec labels such as ``W4A4``."""
    reconstruct: tuple[str, ...] = (NO_RECONSTRUCTION,)
    """``none`` and/or reconstruction preset names (``adaround``, ``brecq``, ``qdrop``,
    ``genie-m``)."""
    calibration: tuple[str, ...] = (PLAIN,)
    """``plain``, ``aac``, ``abn`` and/or ``aac+abn``: corrections after the toolkit's
    calibration (accurate activation clipping, adaptive BN)."""
    num_samples: int = 1024
    """Calibration images per cell."""
    seed: int = 0
    synthesis_budget: str = "cpu"
    reconstruct_budget: str = "cpu"
    test_samples: int | None = None
    """Evaluate on the first N test images only (None: the whole evaluation set)."""
    imagenet_folder: bool = False
    """ImageNet models: evaluate on a folder of labelled ImageNet images (``$ZSQ_IMAGENET_DIR``,
    zsq_plugins.datasets.imagenet) instead of the 20 foolbox samples, and calibrate ``real``
    on its fixed pool (``imagenet_split``: 256 images, never evaluated on)."""
    synthesis: dict[str, Any] = dataclasses.field(default_factory=dict)
    """SynthesisConfig overrides for every generator preset of the grid, e.g.
    ``{"iterations": 50, "batch_size": 32}`` (a TOML table ``[grid.synthesis]``)."""
    reconstruction: dict[str, Any] = dataclasses.field(default_factory=dict)
    """ReconstructionConfig overrides for every reconstructed cell, after its preset and
    budget, e.g. ``{"loss": "spatial_mean"}`` (a TOML table ``[grid.reconstruction]``)."""
    quant: dict[str, Any] = dataclasses.field(default_factory=dict)
    """QuantSpec fields for every label of ``specs``, e.g. ``{"overflow_fix": false}`` for
    the literature's full 8-bit first and last layers (a TOML table ``[grid.quant]``)."""
    toolkit_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Per toolkit, options for its own call (``apply(..., toolkit_options=...)``), e.g.
    ``{"nncf": {"target_device": "cpu"}}`` (a TOML table ``[grid.toolkit_options.nncf]``)."""
    external_data: dict[str, str] = dataclasses.field(default_factory=dict)
    """Calibration sets made outside the library, by the name ``data`` gives them: the path
    of a safetensors file whose ``images`` tensor is in the model's input space, e.g. a peer
    toolkit's generator (a TOML table ``[grid.external_data]``, ``mct = "mct.safetensors"``)."""
    user_models: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Models of your own, by the name ``models`` gives them: UserModel fields, e.g.
    ``{"my_net": {"source": "nets/my_net.py:build", "input_shape": [3, 32, 32]}}`` (a TOML
    table ``[grid.user_models.my_net]``)."""

    def __post_init__(self) -> None:
        for field in ("models", "toolkits", "data", "specs", "reconstruct", "calibration"):
            object.__setattr__(self, field, _names(getattr(self, field), field))
        unknown = sorted(set(self.calibration) - set(CALIBRATIONS))
        if unknown:
            raise ValueError(
                f"unknown calibration(s) {unknown}; choose from {', '.join(CALIBRATIONS)}"
            )
        if not isinstance(self.quant, dict):
            raise ValueError(f"quant must be a table of QuantSpec fields, got {self.quant!r}")
        options = self.toolkit_options
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            raise ValueError(f"toolkit_options must be a table per toolkit, got {options!r}")
        strays = sorted(set(options) - set(self.toolkits))
        if strays:
            raise ValueError(f"toolkit_options for {strays}, which the grid's toolkits lack")
        self._check_external_data()
        if not isinstance(self.user_models, dict):
            raise ValueError(f"user_models must be a table per model, got {self.user_models!r}")
        for name, fields in self.user_models.items():
            if not isinstance(fields, dict):
                raise ValueError(f"user_models.{name} must be a table, got {fields!r}")
            UserModel.from_dict(fields)  # a wrong field fails before any work
        for label in self.specs:
            self.quant_spec(label)  # a malformed label or option fails before any work
        for field in ("synthesis_budget", "reconstruct_budget"):
            Budget.parse(getattr(self, field))
        for field in ("num_samples", "test_samples"):
            value = getattr(self, field)
            if value is None and field == "test_samples":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if not isinstance(self.imagenet_folder, bool):
            raise ValueError(f"imagenet_folder must be true or false, got {self.imagenet_folder!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.synthesis, dict):
            raise ValueError(
                f"synthesis must be a table of SynthesisConfig fields, got {self.synthesis!r}"
            )
        from zsq_plugins.synthesis import SynthesisConfig

        SynthesisConfig().replace(**self.synthesis)  # unknown or invalid fields fail now
        if not isinstance(self.reconstruction, dict):
            raise ValueError(
                "reconstruction must be a table of ReconstructionConfig fields, got "
                f"{self.reconstruction!r}"
            )
        from zsq_plugins.reconstruction.config import ReconstructionConfig

        ReconstructionConfig().replace(**self.reconstruction)  # fails now, not in a cell

    def _check_external_data(self) -> None:
        from zsq_plugins.synthesis.presets import GENERATORS

        external = self.external_data
        if not isinstance(external, dict) or not all(
            isinstance(v, str) and v for v in external.values()
        ):
            raise ValueError(f"external_data must be a table of file paths, got {external!r}")
        for name in external:
            if name not in self.data:
                raise ValueError(f"external_data names {name!r}, which the grid's data lack")
            if name == REAL or name in GENERATORS.names():
                raise ValueError(
                    f"external_data {name!r} would hide the data source of that name; "
                    "give the external set another name"
                )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridConfig:
        check_fields(cls, data, "grid option")
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | Path) -> GridConfig:
        """Reads ``[grid]`` (the axes and options) from a TOML file."""
        path = Path(path)
        try:
            document = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ZSQError(f"no comparison config at {path}") from None
        except tomllib.TOMLDecodeError as error:
            raise ZSQError(f"{path} is not valid TOML: {error}") from None
        if "grid" not in document:
            raise ZSQError(f"{path} has no [grid] table; see docs/compare.md for the format")
        try:
            return cls.from_dict(document["grid"])
        except (TypeError, ValueError) as error:
            raise ZSQError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return to_json_dict(self)

    def user_model(self, name: str) -> UserModel | None:
        """The grid's own model of that name (None: a zoo model)."""
        fields = self.user_models.get(name)
        return UserModel.from_dict(fields) if fields is not None else None

    def load_model(self, name: str) -> nn.Module:
        """The FP model a ``models`` name stands for: the grid's own, or the zoo's."""
        user = self.user_model(name)
        if user is not None:
            return user.load()
        from zsq_plugins import zoo

        return zoo.load(name)

    def input_shape(self, name: str) -> tuple[int, ...]:
        """The input shape (C, H, W) of the model a ``models`` name stands for."""
        user = self.user_model(name)
        if user is not None:
            return tuple(user.input_shape)
        from zsq_plugins import zoo

        return tuple(zoo.card(name).input_shape)

    def quant_spec(self, label: str) -> QuantSpec:
        """The QuantSpec of a ``specs`` label, with the grid's ``quant`` fields."""
        return QuantSpec.from_dict({**QuantSpec.parse(label).to_dict(), **self.quant})

    def cells(self) -> Iterator[Cell]:
        for model in self.models:
            for data in self.data:
                for reconstruct in self.reconstruct:
                    for calibration in self.calibration:
                        for spec in self.specs:
                            for toolkit in self.toolkits:
                                yield Cell(model, toolkit, data, spec, reconstruct, calibration)

    def select(self, only: Mapping[str, Collection[str]]) -> list[Cell]:
        """The cells whose value on each axis named in ``only`` (``toolkits``, ``specs``,
        ...) is one of those listed: part of the grid, e.g. one process per toolkit writing
        into the same results folder."""
        for axis, values in only.items():
            if axis not in AXES:
                raise ValueError(f"unknown axis {axis!r}; the axes are {', '.join(AXES)}")
            outside = sorted(set(values) - set(getattr(self, axis)))
            if outside:
                raise ValueError(
                    f"{axis} {outside} are not in the grid, whose {axis} are "
                    f"{list(getattr(self, axis))}"
                )
        return [
            cell
            for cell in self.cells()
            if all(getattr(cell, AXES[axis]) in values for axis, values in only.items())
        ]

    def protocol(self) -> dict[str, Any]:
        """The options every cell shares; a results folder holds one protocol only."""
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "synthesis_budget": self.synthesis_budget,
            "reconstruct_budget": self.reconstruct_budget,
            "test_samples": self.test_samples,
            "synthesis": self.synthesis,
            # Options that were left at their defaults stay out, so that a folder made before
            # an option existed keeps its protocol.
            **({"quant": self.quant} if self.quant else {}),
            **({"reconstruction": self.reconstruction} if self.reconstruction else {}),
            **({"toolkit_options": self.toolkit_options} if self.toolkit_options else {}),
            **({"user_models": self.user_models} if self.user_models else {}),
            **({"external_data": self.external_data} if self.external_data else {}),
            **({"imagenet_folder": True} if self.imagenet_folder else {}),
        }


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str
    toolkit: str
    data: str
    spec: str
    reconstruct: str = NO_RECONSTRUCTION
    calibration: str = PLAIN

    @property
    def key(self) -> str:
        parts = [self.model, self.toolkit, self.data, self.spec, self.reconstruct]
        if self.calibration != PLAIN:  # plain cells keep the keys they had before the axis
            parts.append(self.calibration)
        return "__".join(parts)
