"""Comparison grids: models x toolkits x data x specs x reconstruction, resumable.

A grid is described by a ``GridConfig`` (usually read from a TOML file, see
docs/compare.md). ``run_grid`` runs every cell not finished yet, writing each as its own JSON
file the moment it is done, so an interrupted grid resumes where it stopped; the results are
gathered into ``results.json`` and rendered as Markdown and plots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from zsq_plugins.budgets import auto_budget, model_macs
from zsq_plugins.configio import Budget, check_fields, to_json_dict
from zsq_plugins.errors import CacheMismatchError, ZSQError
from zsq_plugins.grid_order import in_grid_order, spec_order
from zsq_plugins.reconstruction.config import same_result_fields
from zsq_plugins.reconstruction.presets import RECONSTRUCTIONS
from zsq_plugins.reconstruction.routine import ROUTINE_REVISION
from zsq_plugins.reporting import (
    environment_footer,
    environment_info,
    markdown_table,
    peak_rss_mib,
    write_json,
    write_text_atomic,
)
from zsq_plugins.spec import QuantSpec
from zsq_plugins.user_models import UserModel

log = logging.getLogger(__name__)

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
    quant: dict[str, Any] = dataclasses.field(default_factory=dict)
    """QuantSpec fields for every label of ``specs``, e.g. ``{"overflow_fix": false}`` for
    the literature's full 8-bit first and last layers (a TOML table ``[grid.quant]``)."""
    toolkit_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Per toolkit, options for its own call (``apply(..., toolkit_options=...)``), e.g.
    ``{"nncf": {"target_device": "cpu"}}`` (a TOML table ``[grid.toolkit_options.nncf]``)."""
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
            **({"toolkit_options": self.toolkit_options} if self.toolkit_options else {}),
            **({"user_models": self.user_models} if self.user_models else {}),
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


IMAGENET_EVAL_BATCH = 50
"""Images per evaluation batch of a 224 px model: bounded activation memory."""


def evaluation_data(
    model_name: str, test_samples: int | None, imagenet_folder: bool = False
) -> Any:
    """The model's labelled evaluation data (Fashion-MNIST test set; for ImageNet models the
    evaluation part of the ImageNet folder with ``imagenet_folder``, else the 20 foolbox
    images), optionally its first ``test_samples`` items."""
    from zsq_plugins.datasets import fashion_mnist, labelled_samples
    from zsq_plugins.zoo import card

    model_card = card(model_name)
    if model_card.dataset == "fashion_mnist":
        test = fashion_mnist("test")
        if test_samples is not None and test_samples < len(test):
            test = torch.utils.data.Subset(test, range(test_samples))
        return test
    if model_card.dataset == "imagenet":
        if imagenet_folder:
            images, labels = _imagenet_part(model_card.input_shape[-1], calibration=False)
        else:
            images, labels = labelled_samples("imagenet", size=model_card.input_shape[-1])
        images, labels = images[:test_samples], labels[:test_samples]
        return [
            (images[i : i + IMAGENET_EVAL_BATCH], labels[i : i + IMAGENET_EVAL_BATCH])
            for i in range(0, len(images), IMAGENET_EVAL_BATCH)
        ]
    raise ValueError(f"no evaluation data known for dataset {model_card.dataset!r}")


def _imagenet_part(size: int, calibration: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration pool or the evaluation part of the ImageNet folder, decoded."""
    from zsq_plugins.datasets.imagenet import ImageNetSamples, imagenet_split

    dataset = ImageNetSamples(size=size)
    pool, evaluation = imagenet_split(dataset)
    return dataset.tensors(pool if calibration else evaluation)


def synthetic_set_folder(
    root: Path,
    model_name: str,
    preset: str,
    budget: str,
    num_samples: int,
    seed: int,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Where a synthetic set is cached under ``root``: one folder per model and exact
    configuration (its name carries a hash of the resolved SynthesisConfig), so a changed
    preset makes a new set instead of tripping over the old one."""
    from zsq_plugins.synthesis.presets import get_preset

    synthesis = get_preset(preset).config(budget).replace(**(overrides or {}))
    digest = hashlib.sha256(synthesis.to_json().encode()).hexdigest()[:10]
    return root / model_name / f"{preset}-{budget}-n{num_samples}-seed{seed}-{digest}"


def plays_toolkit(source: str, config: GridConfig) -> bool:
    """Whether the data source is made against each toolkit's quantized model (ZAQ-style
    ``adversarial``), so that its images belong to one (toolkit, spec) cell, not a model."""
    if source == REAL:
        return False
    from zsq_plugins.synthesis.presets import get_preset

    preset = get_preset(source).config(config.synthesis_budget).replace(**config.synthesis)
    return preset.needs_opponent


def calibration_images(
    model_name: str,
    source: str,
    config: GridConfig,
    data_dir: Path,
    progress: bool,
    cell: Cell | None = None,
) -> torch.Tensor:
    """Real training images, or a synthetic set (cached under ``data_dir``, shared by every
    cell of the same model and preset; an adversarial set by the cells of one toolkit and
    spec, ``cell``'s)."""
    from zsq_plugins import zoo
    from zsq_plugins.synthesis import synthesize
    from zsq_plugins.synthesis.adversarial import adversarial_synthesize

    user = config.user_model(model_name)
    if source == REAL:
        dataset = None if user is not None else zoo.card(model_name).dataset
        if dataset == "imagenet" and config.imagenet_folder:
            pool, _ = _imagenet_part(zoo.card(model_name).input_shape[-1], calibration=True)
            if config.num_samples > len(pool):
                raise ZSQError(
                    f"num_samples {config.num_samples} exceeds the ImageNet calibration pool "
                    f"({len(pool)} images)"
                )
            return pool[: config.num_samples]
        if dataset != "fashion_mnist":
            raise ZSQError(
                f"no real training images are available offline for {model_name}; use "
                "generator presets only for it"
            )
        from zsq_plugins.datasets import calibration_subset

        return calibration_subset(config.num_samples, seed=config.seed)
    folder = synthetic_set_folder(
        data_dir,
        model_name,
        source,
        config.synthesis_budget,
        config.num_samples,
        config.seed,
        config.synthesis,
    )
    synthesis = {**config.synthesis, **({"input_spec": user.input_spec} if user else {})}
    if plays_toolkit(source, config):
        if cell is None:
            raise ValueError(f"{source!r} data are made per toolkit and spec: pass the cell")
        spec = config.quant_spec(cell.spec)
        digest = hashlib.sha256(spec.to_json().encode()).hexdigest()[:10]
        data = adversarial_synthesize(
            config.load_model(model_name),
            cell.toolkit,
            spec,
            config.num_samples,
            source,
            config.seed,
            budget=config.synthesis_budget,
            cache_dir=folder / f"{cell.toolkit}-{cell.spec}-{digest}",
            progress=progress,
            **synthesis,
        )
        return data.images
    data = synthesize(
        config.load_model(model_name),
        config.num_samples,
        source,
        config.seed,
        budget=config.synthesis_budget,
        cache_dir=folder,
        progress=progress,
        **synthesis,
    )
    return data.images


def fp32_top1(model: nn.Module, test: Any) -> float | None:
    """The FP32 model's top-1 on exactly the grid's evaluation images (None: unlabelled)."""
    from zsq_plugins import evaluate

    return evaluate(model, test, progress=False).top1


def run_cell(
    cell: Cell,
    config: GridConfig,
    images: torch.Tensor,
    test: Any,
    progress: bool,
    fp32: float | None = None,
) -> dict[str, Any]:
    """Quantizes, calibrates (and reconstructs) one cell and evaluates it against FP32."""
    from zsq_plugins import apply, evaluate, zoo

    fp_model = config.load_model(cell.model)
    reconstruct = None if cell.reconstruct == NO_RECONSTRUCTION else cell.reconstruct
    quantized, report = apply(
        config.load_model(cell.model),
        cell.toolkit,
        config.quant_spec(cell.spec),
        data=images,
        reconstruct=reconstruct,
        seed=config.seed,
        reconstruct_budget=config.reconstruct_budget,
        progress=progress,
        toolkit_options=config.toolkit_options.get(cell.toolkit),
        **CALIBRATIONS[cell.calibration],
    )
    started = time.perf_counter()
    result = evaluate(quantized, test, fp_model, progress=progress, description=cell.key)
    published = None if config.user_model(cell.model) else zoo.card(cell.model).published_top1
    reconstruction = report.reconstruction
    return {
        **dataclasses.asdict(cell),
        "top1": result.top1,
        "agreement": result.agreement,
        "kl": result.kl,
        "num_test": result.num_samples,
        "fp32_top1": fp32 if fp32 is not None else published,
        "timings_s": {**report.timings_s, "evaluate": round(time.perf_counter() - started, 3)},
        "peak_rss_mib": report.peak_rss_mib,
        "reconstruction_fidelity": (
            max((b.fidelity for b in reconstruction.blocks), default=None)
            if reconstruction is not None
            else None
        ),
        "reconstruction_config": reconstruction.config if reconstruction is not None else None,
    }


def reconstruction_config(
    preset: str, budget: str, macs: int | None = None
) -> dict[str, Any] | None:
    """The configuration reconstruction ``preset`` (``none``: no reconstruction, None) runs
    with now at ``budget`` (``auto`` needs the model's ``macs`` per image), and the routine's
    revision; a result that recorded another one is stale (``same_reconstruction``)."""
    if preset == NO_RECONSTRUCTION:
        return None
    config = RECONSTRUCTIONS.get(preset).config(budget)
    if Budget.parse(budget) is Budget.AUTO:
        if macs is None:
            raise ValueError("the auto budget depends on the model: pass its macs")
        config = auto_budget(macs).scale_reconstruction(config)
    return {**config.to_dict(), "routine_revision": ROUTINE_REVISION}


def same_reconstruction(stored: dict[str, Any] | None, current: dict[str, Any] | None) -> bool:
    """Whether a recorded reconstruction configuration gives the results ``current`` gives:
    equal but for the fields that change only time and memory (where block inputs are
    kept)."""
    if stored is None or current is None:
        return stored is current
    return same_result_fields(stored) == same_result_fields(current)


class GridResults:
    """A results folder: ``cells/<key>.json`` per finished cell, one protocol per folder."""

    def __init__(self, folder: str | Path, config: GridConfig) -> None:
        self.folder = Path(folder)
        self.config = config
        self.cells_dir = self.folder / "cells"
        self._macs: dict[str, int] = {}

    def macs(self, model: str) -> int:
        """Forward MACs per image of a grid's model (what the ``auto`` budget scales by)."""
        if model not in self._macs:
            user = self.config.user_model(model)
            if user is not None:
                shape = user.input_shape
            else:
                from zsq_plugins.zoo import card

                shape = card(model).input_shape
            self._macs[model] = model_macs(self.config.load_model(model), shape)
        return self._macs[model]

    def check_protocol(self) -> None:
        path = self.folder / "protocol.json"
        if path.exists():
            stored = json.loads(path.read_text())
            if stored != self.config.protocol():
                raise CacheMismatchError(
                    f"{self.folder} holds results made with other options ({stored}; now "
                    f"{self.config.protocol()}). Use another output folder, or delete it."
                )
        else:
            write_json(path, self.config.protocol())

    def path(self, cell: Cell) -> Path:
        return self.cells_dir / f"{cell.key}.json"

    def finished(self, cell: Cell) -> dict[str, Any] | None:
        path = self.path(cell)
        if not path.exists():
            return None
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is damaged; the cell runs again", path)
            return None
        budget = self.config.reconstruct_budget
        macs = self.macs(cell.model) if Budget.parse(budget) is Budget.AUTO else None
        current = reconstruction_config(cell.reconstruct, budget, macs)
        if not same_reconstruction(result.get("reconstruction_config"), current):
            log.warning(
                "%s was reconstructed with another configuration of %r (its preset or a default "
                "changed since); the cell runs again",
                path,
                cell.reconstruct,
            )
            return None
        return result

    def record(self, cell: Cell, result: dict[str, Any]) -> None:
        write_json(self.path(cell), result)

    def collected(self) -> list[dict[str, Any]]:
        rows = [self.finished(cell) for cell in self.config.cells()]
        return [row for row in rows if row is not None]


def run_grid(
    config: GridConfig,
    out: str | Path,
    *,
    data_dir: str | Path | None = None,
    progress: bool = True,
    plots: bool = True,
    only: Mapping[str, Collection[str]] | None = None,
    render_only: bool = False,
) -> list[dict[str, Any]]:
    """Runs every unfinished cell of ``config`` (of ``config.select(only)`` with ``only``;
    none with ``render_only``) into ``out``; returns the results of all the grid's finished
    cells.

    Finished cells are skipped, so a run interrupted at any point resumes; each cell's JSON is
    written atomically the moment it is done. Synthetic sets are cached under ``data_dir``
    (default ``out/data``; share one folder between grids to generate each set once).
    Writes ``results.json``, ``results.md`` and (with matplotlib) ``accuracy_vs_bits.png``.
    """
    from tqdm.auto import tqdm

    from zsq_plugins.adapter import check_toolkit_options, get_adapter, installed_adapters

    cells = config.select(only) if only else list(config.cells())
    missing = sorted({cell.toolkit for cell in cells} - set(installed_adapters()))
    if missing:
        raise ZSQError(
            f"toolkit(s) {missing} are not installed here; installed: "
            f"{', '.join(installed_adapters())}. Install the extra named by the toolkit "
            "(e.g. pip install 'zsq-plugins[nncf]') or drop it from the grid."
        )
    for toolkit, options in config.toolkit_options.items():  # a wrong option fails first
        check_toolkit_options(get_adapter(toolkit), options)
    results = GridResults(out, config)
    results.check_protocol()
    todo = [] if render_only else [cell for cell in cells if results.finished(cell) is None]
    log.info("%d cells, %d finished, %d to run", len(cells), len(cells) - len(todo), len(todo))
    # One calibration set and one test set in memory at a time: the grid's order groups cells
    # by model and data source.
    # An adversarial source has a set per (toolkit, spec): those of the current model and
    # source stay in memory together (a few MiB each).
    images_for: dict[tuple[str, ...], torch.Tensor] = {}
    test_for: str | None = None
    data_folder = Path(data_dir or results.folder / "data")
    bar = tqdm(todo, desc="cells", unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.key, refresh=True)
        wanted: tuple[str, ...] = (cell.model, cell.data)
        if plays_toolkit(cell.data, config):
            wanted += (cell.toolkit, cell.spec)
        if wanted not in images_for:
            if any(key[:2] != wanted[:2] for key in images_for):
                images_for.clear()
            images_for[wanted] = calibration_images(
                cell.model, cell.data, config, data_folder, progress, cell
            )
        images = images_for[wanted]
        if test_for != cell.model:
            fp_model = config.load_model(cell.model)
            user = config.user_model(cell.model)
            if user is None:
                test = evaluation_data(cell.model, config.test_samples, config.imagenet_folder)
            else:
                test = user.evaluation_data(
                    fp_model, config.test_samples, data_folder / cell.model, config.seed,
                    config.synthesis_budget, progress,
                )  # fmt: skip
            fp32 = fp32_top1(fp_model, test)
            test_for = cell.model
        result = run_cell(cell, config, images, test, progress, fp32)
        results.record(cell, result)
        log.info(
            "%s: top-1 %s, agreement %s", cell.key, result.get("top1"), result.get("agreement")
        )
    rows = results.collected()
    folder = Path(out)
    # Several processes may fill one folder (run_grid's ``only``), and a later one may run
    # nothing (render-only, or every cell already done): it did not measure, so the record
    # keeps the stored environment (or none rather than its own) and the largest peak RSS.
    previous = _stored_record(folder / "results.json")
    peak = round(peak_rss_mib(), 1) if todo else None
    if previous.get("peak_rss_mib") is not None:
        peak = max(peak or 0.0, previous["peak_rss_mib"])
    record = {
        "config": config.to_dict(),
        "environment": environment_info() if todo else previous.get("environment"),
        "peak_rss_mib": peak,
        "cells": rows,
    }
    write_json(folder / "results.json", record)
    write_text_atomic(folder / "results.md", render_markdown(record))
    if plots:
        from zsq_plugins.plots import MissingPlotting, accuracy_vs_bits, cost_bars

        try:
            accuracy_vs_bits(rows, folder / "accuracy_vs_bits.png", config.toolkits)
            cost_bars(rows, folder / "cost.png", config.toolkits)
        except MissingPlotting as error:
            log.warning("%s", error)
    return rows


def _stored_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is damaged; it is written again", path)
        return {}


METRICS = {
    "top1": "Top-1 (%)",
    "agreement": "Top-1 agreement with FP32 (%)",
    "kl": "KL divergence to FP32",
}


def _fp32_label(top1: float | None) -> str:
    return f"FP32 {top1:.2f}%" if top1 is not None else "unlabelled: agreement and KL to FP32"


def render_markdown(record: dict[str, Any]) -> str:
    """Per model and reconstruction setting, a table per metric (top-1, agreement with FP32,
    KL to FP32): a row per (data, spec), a column per toolkit, and the spread between them."""
    rows = record["cells"]
    out = ["# Comparison (generated by `zsq compare`)\n"]
    protocol = {k: v for k, v in record["config"].items() if not isinstance(v, list | dict)}
    if protocol.get("test_samples") is None:
        protocol["test_samples"] = "all"
    if record["config"].get("synthesis"):
        protocol["synthesis overrides"] = json.dumps(record["config"]["synthesis"])
    if record["config"].get("quant"):
        protocol["QuantSpec fields"] = json.dumps(record["config"]["quant"])
    if record["config"].get("toolkit_options"):
        protocol["toolkit options"] = json.dumps(record["config"]["toolkit_options"])
    out.append("\n" + ", ".join(f"{k}: {v}" for k, v in protocol.items()) + ".\n")
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        fp32, count = _fp32_label(mine[0]["fp32_top1"]), mine[0]["num_test"]
        out.append(f"\n## {model} ({fp32}, {count} test images)\n")
        toolkits = in_grid_order((r["toolkit"] for r in mine), record["config"]["toolkits"])
        specs = sorted(dict.fromkeys(r["spec"] for r in mine), key=spec_order)
        settings = dict.fromkeys((r["reconstruct"], r.get("calibration", PLAIN)) for r in mine)
        for reconstruct, calibration in settings:
            title = "no reconstruction" if reconstruct == NO_RECONSTRUCTION else reconstruct
            if calibration != PLAIN:
                title = f"{calibration}, {title}"
            for metric, heading in METRICS.items():
                table = []
                for data in dict.fromkeys(r["data"] for r in mine):
                    for spec in specs:
                        cells = {
                            r["toolkit"]: r.get(metric)
                            for r in mine
                            if (r["data"], r["spec"], r["reconstruct"], r.get("calibration", PLAIN))
                            == (data, spec, reconstruct, calibration)
                        }
                        values = [v for v in cells.values() if v is not None]
                        if not values:
                            continue
                        spread = max(values) - min(values) if len(values) > 1 else None
                        table.append({"data": data, "spec": spec, **cells, "spread": spread})
                if table:
                    out.append(f"\n### {heading}, {title}\n\n")
                    digits = 4 if metric == "kl" else 2
                    out.append(markdown_table(table, ["data", "spec", *toolkits, "spread"], digits))
            out.extend(_against_real_data(mine, toolkits, specs, reconstruct, calibration, title))
        for reconstruct in dict.fromkeys(r for r, _ in settings):
            out.extend(_calibration_effects(mine, toolkits, specs, reconstruct))
    if record.get("environment"):
        out.append(environment_footer(record["environment"]))
    else:
        out.append(
            "\n_Rendered from finished cells; no run that measured them has recorded its "
            "environment yet._\n"
        )
    return "".join(out)


NOISE = "noise"
MIN_NOISE_GAP = 1.0
"""Top-1 points real data must lead noise by for a share of that gap to mean anything."""


def _top1_index(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], float]:
    return {
        (r["data"], r["spec"], r["toolkit"], r["reconstruct"], r.get("calibration", PLAIN)): r[
            "top1"
        ]
        for r in rows
        if r.get("top1") is not None
    }


def _against_real_data(
    rows: list[dict[str, Any]],
    toolkits: list[str],
    specs: list[str],
    reconstruct: str,
    calibration: str,
    title: str,
) -> list[str]:
    """Two derived tables for one setting when the grid has real data: each other source's
    top-1 below real data, and (with noise in the grid) the share of the noise-to-real gap each
    source recovers, the measure of range realism that zero-shot data is judged by."""
    top1 = _top1_index(rows)
    sources = [d for d in dict.fromkeys(r["data"] for r in rows) if d != REAL]
    if not sources or not any(k[0] == REAL for k in top1):
        return []

    def value(data: str, spec: str, toolkit: str) -> float | None:
        return top1.get((data, spec, toolkit, reconstruct, calibration))

    below, recovered = [], []
    for data in sources:
        for spec in specs:
            gaps, shares = {}, {}
            for toolkit in toolkits:
                real, mine, noise = (value(d, spec, toolkit) for d in (REAL, data, NOISE))
                if real is None or mine is None:
                    continue
                gaps[toolkit] = real - mine
                if data != NOISE and noise is not None and real - noise >= MIN_NOISE_GAP:
                    shares[toolkit] = 100 * (mine - noise) / (real - noise)
            if gaps:
                below.append({"data": data, "spec": spec, **gaps})
            if shares:
                recovered.append({"data": data, "spec": spec, **shares})
    out = []
    if below:
        out.append(f"\n### Top-1 below real data (points), {title}\n\n")
        out.append(markdown_table(below, ["data", "spec", *toolkits]))
    if recovered:
        out.append(
            f"\n### Noise-to-real top-1 gap recovered (%), {title}\n\n"
            "100 x (source - noise) / (real - noise), where real data leads noise by at least "
            f"{MIN_NOISE_GAP:g} point: 0 is no better than noise, 100 is as good as real data.\n\n"
        )
        out.append(markdown_table(recovered, ["data", "spec", *toolkits], digits=1))
    return out


def _calibration_effects(
    rows: list[dict[str, Any]], toolkits: list[str], specs: list[str], reconstruct: str
) -> list[str]:
    """Top-1 change from plain calibration of each other calibration option (same data, spec,
    toolkit and reconstruction): the ablation read directly."""
    top1 = _top1_index(rows)
    options = [
        c
        for c in dict.fromkeys(r.get("calibration", PLAIN) for r in rows)
        if c != PLAIN and any(k[3] == reconstruct and k[4] == c for k in top1)
    ]
    table = []
    for option in options:
        for data in dict.fromkeys(r["data"] for r in rows):
            for spec in specs:
                changes = {}
                for toolkit in toolkits:
                    base = top1.get((data, spec, toolkit, reconstruct, PLAIN))
                    mine = top1.get((data, spec, toolkit, reconstruct, option))
                    if base is not None and mine is not None:
                        changes[toolkit] = mine - base
                if changes:
                    table.append({"calibration": option, "data": data, "spec": spec, **changes})
    if not table:
        return []
    title = "no reconstruction" if reconstruct == NO_RECONSTRUCTION else reconstruct
    return [
        f"\n### Top-1 change from plain calibration (points), {title}\n\n",
        markdown_table(table, ["calibration", "data", "spec", *toolkits]),
    ]
