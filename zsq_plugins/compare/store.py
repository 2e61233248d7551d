"""A grid's results folder: one JSON file per finished cell, one protocol per folder, and
what makes a stored cell stale."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from zsq_plugins.budgets import auto_budget, model_macs
from zsq_plugins.compare.data import external_digest
from zsq_plugins.compare.grid import NO_RECONSTRUCTION, Cell, GridConfig
from zsq_plugins.configio import Budget
from zsq_plugins.errors import CacheMismatchError
from zsq_plugins.reconstruction.config import same_result_fields
from zsq_plugins.reconstruction.presets import RECONSTRUCTIONS
from zsq_plugins.reconstruction.routine import ROUTINE_REVISION
from zsq_plugins.reporting import (
    write_json,
)

log = logging.getLogger(__name__)


def reconstruction_config(
    preset: str, budget: str, macs: int | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The configuration reconstruction ``preset`` (``none``: no reconstruction, None) runs
    with now at ``budget`` (``auto`` needs the model's ``macs`` per image), and the routine's
    revision; a result that recorded another one is stale (``same_reconstruction``)."""
    if preset == NO_RECONSTRUCTION:
        return None
    # In zsq_plugins.reconstruct's order: the overrides, then the auto budget's steps.
    config = RECONSTRUCTIONS.get(preset).config(budget).replace(**(overrides or {}))
    if Budget.parse(budget) is Budget.AUTO:
        if macs is None:
            raise ValueError("the auto budget depends on the model: pass its macs")
        config = auto_budget(macs).scale_reconstruction(config, fixed=overrides or {})
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
            shape = self.config.input_shape(model)
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
        current = reconstruction_config(cell.reconstruct, budget, macs, self.config.reconstruction)
        if not same_reconstruction(result.get("reconstruction_config"), current):
            log.warning(
                "%s was reconstructed with another configuration of %r (its preset or a default "
                "changed since); the cell runs again",
                path,
                cell.reconstruct,
            )
            return None
        external = self.config.external_data.get(cell.data)
        digest = external_digest(external) if external is not None else None
        if digest is not None and result.get("external_sha256") != digest:
            log.warning("%s was calibrated on another version of %s; the cell runs again",
                        path, external)  # fmt: skip
            return None
        return result

    def record(self, cell: Cell, result: dict[str, Any]) -> None:
        write_json(self.path(cell), result)

    def collected(self) -> list[dict[str, Any]]:
        rows = [self.finished(cell) for cell in self.config.cells()]
        return [row for row in rows if row is not None]


def stored_record(path: Path) -> dict[str, Any]:
    """A results.json written before (empty when there is none or it is damaged)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is damaged; it is written again", path)
        return {}
