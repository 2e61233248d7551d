"""Comparison grids: models x toolkits x data x specs x reconstruction, resumable.

A grid is described by a ``GridConfig`` (usually read from a TOML file, see
docs/compare.md). ``run_grid`` runs every cell not finished yet, writing each as its own JSON
file the moment it is done, so an interrupted grid resumes where it stopped; the results are
gathered into ``results.json`` and rendered as Markdown and plots.

The parts: ``grid`` (the configuration and its cells), ``data`` (calibration and evaluation
data), ``store`` (the results folder), ``runner`` (running cells and grids) and ``render``
(the Markdown tables).
"""

from zsq_plugins.compare.data import (
    IMAGENET_EVAL_BATCH,
    calibration_images,
    evaluation_data,
    fp32_top1,
    plays_toolkit,
    synthetic_set_folder,
)
from zsq_plugins.compare.grid import (
    AXES,
    CALIBRATIONS,
    NO_RECONSTRUCTION,
    PLAIN,
    REAL,
    Cell,
    GridConfig,
)
from zsq_plugins.compare.render import METRICS, MIN_NOISE_GAP, render_markdown
from zsq_plugins.compare.runner import run_cell, run_grid
from zsq_plugins.compare.store import (
    GridResults,
    reconstruction_config,
    same_reconstruction,
    stored_record,
)

__all__ = [
    "AXES",
    "CALIBRATIONS",
    "IMAGENET_EVAL_BATCH",
    "METRICS",
    "MIN_NOISE_GAP",
    "NO_RECONSTRUCTION",
    "PLAIN",
    "REAL",
    "Cell",
    "GridConfig",
    "GridResults",
    "calibration_images",
    "evaluation_data",
    "fp32_top1",
    "plays_toolkit",
    "reconstruction_config",
    "render_markdown",
    "run_cell",
    "run_grid",
    "same_reconstruction",
    "stored_record",
    "synthetic_set_folder",
]
