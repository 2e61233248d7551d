"""Running a grid: every unfinished cell quantized, calibrated (and reconstructed) and
evaluated, each written the moment it is done, then the results gathered and rendered."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from zsq_plugins.compare.data import (
    calibration_images,
    evaluation_data,
    external_digest,
    fp32_top1,
    plays_toolkit,
)
from zsq_plugins.compare.grid import CALIBRATIONS, NO_RECONSTRUCTION, Cell, GridConfig
from zsq_plugins.compare.render import render_markdown
from zsq_plugins.compare.store import GridResults, stored_record
from zsq_plugins.errors import CacheMismatchError, UnsupportedModelError, ZSQError
from zsq_plugins.reporting import (
    environment_info,
    peak_rss_mib,
    write_json,
    write_text_atomic,
)

log = logging.getLogger(__name__)


def run_cell(
    cell: Cell,
    config: GridConfig,
    images: torch.Tensor,
    test: Any,
    progress: bool,
    fp32: float | None = None,
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    """Quantizes, calibrates (and reconstructs) one cell and evaluates it against FP32. With
    ``checkpoint_dir``, the reconstruction saves its state there after every block and a run
    of the same cell resumes from it."""
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
        reconstruct_checkpoint=checkpoint_dir if reconstruct is not None else None,
        reconstruct_options=(config.reconstruction or None) if reconstruct is not None else None,
        progress=progress,
        toolkit_options=config.toolkit_options.get(cell.toolkit),
        **CALIBRATIONS[cell.calibration],
    )
    started = time.perf_counter()
    result = evaluate(quantized, test, fp_model, progress=progress, description=cell.key)
    published = None if config.user_model(cell.model) else zoo.card(cell.model).published_top1
    reconstruction = report.reconstruction
    external = config.external_data.get(cell.data)
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
        # A cell resumed from a checkpoint timed only its own blocks in "reconstruct"; these
        # say how many were restored and the whole reconstruction's seconds, theirs included.
        "resumed_blocks": reconstruction.resumed_blocks if reconstruction is not None else None,
        "reconstruction_seconds": (
            round(reconstruction.seconds, 3) if reconstruction is not None else None
        ),
        # per block: time (set-up and steps apart), peak memory and the loss it gained
        "reconstruction_blocks": (
            reconstruction.to_dict()["blocks"] if reconstruction is not None else None
        ),
        **({"external_sha256": external_digest(external)} if external is not None else {}),
    }


def refused(cell: Cell, refusal: UnsupportedModelError) -> dict[str, Any]:
    """A cell whose toolkit refuses the model (before any work, with the toolkit's reason): a
    finished cell, listed with its reason on the page rather than failing the grid."""
    return {**dataclasses.asdict(cell), "refused": str(refusal), "top1": None}


CHECKPOINTS = "checkpoints"
"""Folder under the grid's data folder where an unfinished cell's reconstruction keeps its
state after every block (an ImageNet cell reconstructs for hours): a run stopped part-way
resumes the cell after its last finished block. A finished cell's folder is removed."""


def _run_resumable(
    cell: Cell,
    config: GridConfig,
    images: torch.Tensor,
    test: Any,
    progress: bool,
    fp32: float | None,
    data_folder: Path,
) -> dict[str, Any]:
    folder = data_folder / CHECKPOINTS / cell.key
    try:
        result = run_cell(cell, config, images, test, progress, fp32, checkpoint_dir=folder)
    except CacheMismatchError as error:  # another run's state (older code or config)
        log.warning("%s: starting over (%s)", cell.key, error)
        shutil.rmtree(folder, ignore_errors=True)
        result = run_cell(cell, config, images, test, progress, fp32, checkpoint_dir=folder)
    shutil.rmtree(folder, ignore_errors=True)
    return result


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
    unfinished = [cell for cell in cells if results.finished(cell) is None]
    todo = [] if render_only else unfinished
    log.info(
        "%d cells, %d finished, %d to run",
        len(cells),
        len(cells) - len(unfinished),
        len(todo),
    )
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
            try:
                images_for[wanted] = calibration_images(
                    cell.model, cell.data, config, data_folder, progress, cell
                )
            except UnsupportedModelError as refusal:  # an adversarial set plays the toolkit
                results.record(cell, refused(cell, refusal))
                continue
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
        try:
            result = _run_resumable(cell, config, images, test, progress, fp32, data_folder)
        except UnsupportedModelError as refusal:
            result = refused(cell, refusal)
            log.warning("%s: refused (%s)", cell.key, refusal)
        results.record(cell, result)
        log.info(
            "%s: top-1 %s, agreement %s", cell.key, result.get("top1"), result.get("agreement")
        )
    rows = results.collected()
    folder = Path(out)
    # Several processes may fill one folder (run_grid's ``only``), and a later one may run
    # nothing (render-only, or every cell already done): it did not measure, so the record
    # keeps the stored environment (or none rather than its own) and the largest peak RSS.
    previous = stored_record(folder / "results.json")
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

        rows = [row for row in rows if not row.get("refused")]

        try:
            accuracy_vs_bits(rows, folder / "accuracy_vs_bits.png", config.toolkits)
            cost_bars(rows, folder / "cost.png", config.toolkits)
        except MissingPlotting as error:
            log.warning("%s", error)
    return rows
