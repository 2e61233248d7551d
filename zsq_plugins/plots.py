"""Plots of comparison results (matplotlib, the ``plots`` extra).

Every function takes the cell rows that ``zsq_plugins.compare.run_grid`` produces (or reads
from ``results.json``) and writes a PNG; nothing here computes results.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zsq_plugins.errors import MissingDependencyError
from zsq_plugins.grid_order import in_grid_order, spec_order


class MissingPlotting(MissingDependencyError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window, works headless in CI
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingPlotting("plots need matplotlib: pip install 'zsq-plugins[plots]'") from None
    return plt


def _setting(row: dict[str, Any]) -> tuple[str, str, str]:
    """What one line of a panel holds: data source, calibration corrections, reconstruction."""
    return row["data"], row.get("calibration", "plain"), row["reconstruct"]


def _label(setting: tuple[str, str, str]) -> str:
    return " + ".join(part for part in setting if part not in ("none", "plain"))


def accuracy_vs_bits(
    rows: Sequence[dict[str, Any]], path: str | Path, toolkits: Sequence[str] = ()
) -> Path:
    """One panel per toolkit (per model; in the order of ``toolkits``, the grid's, where
    given): top-1 against the spec, fewest bits to the right, a line per (data, calibration,
    reconstruction), and FP32 as a dashed line."""
    plt = _pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    toolkits = in_grid_order((r["toolkit"] for r in rows), toolkits)
    figure, axes = plt.subplots(
        len(models),
        len(toolkits),
        figsize=(4.2 * len(toolkits), 3.4 * len(models) + 0.8),
        squeeze=False,
        sharey="row",
        layout="constrained",
    )
    # One colour per line across every panel, so that a line missing from one panel does not
    # shift the colours of the others.
    colours = {
        setting: f"C{k % 10}" for k, setting in enumerate(dict.fromkeys(map(_setting, rows)))
    }
    for i, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        specs = sorted(dict.fromkeys(r["spec"] for r in mine), key=spec_order)
        for j, toolkit in enumerate(toolkits):
            axis = axes[i][j]
            for setting in dict.fromkeys(_setting(r) for r in mine):
                points = {
                    r["spec"]: r["top1"]
                    for r in mine
                    if r["toolkit"] == toolkit and _setting(r) == setting
                }
                xs = [k for k, spec in enumerate(specs) if spec in points]
                if not xs:
                    continue
                values = [points[specs[k]] for k in xs]
                axis.plot(xs, values, marker="o", color=colours[setting])
            axis.axhline(mine[0]["fp32_top1"], color="grey", linestyle="--")
            axis.set_xticks(range(len(specs)), specs)
            axis.set_title(f"{model}: {toolkit}", fontsize=10)
            axis.grid(alpha=0.3)
            if j == 0:
                axis.set_ylabel("top-1 (%)")
    lines = [
        plt.Line2D([], [], color=colour, marker="o", label=_label(setting))
        for setting, colour in colours.items()
    ]
    lines.append(plt.Line2D([], [], color="grey", linestyle="--", label="FP32"))
    figure.legend(handles=lines, loc="outside lower center", ncol=min(len(lines), 4), fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def cost_bars(
    rows: Sequence[dict[str, Any]], path: str | Path, toolkits: Sequence[str] = ()
) -> Path:
    """Median seconds of each pipeline step per toolkit (data, calibrate, the corrections
    after it, reconstruct), toolkits in the order of ``toolkits`` where given."""
    import statistics

    plt = _pyplot()
    toolkits = in_grid_order((r["toolkit"] for r in rows), toolkits)
    steps = {
        "data": "data",
        "quantize_and_calibrate": "calibrate",
        "abn": "adaptive BN",
        "clip": "AAC",
        "reconstruct": "reconstruct",
    }
    figure, axis = plt.subplots(figsize=(1.8 + 1.6 * len(toolkits), 3.4))
    bottoms = [0.0] * len(toolkits)
    for key, label in steps.items():
        heights = [
            statistics.median(r["timings_s"].get(key, 0.0) for r in rows if r["toolkit"] == t)
            for t in toolkits
        ]
        axis.bar(toolkits, heights, bottom=bottoms, label=label)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    axis.set_ylabel("median seconds per cell")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
