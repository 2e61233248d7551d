"""The low-bit accuracy targets the ImageNet page evaluates: each one met, or missed by how much.

Every target compares the mean top-1 over seeds of a zero-shot cell (one data preset, one
toolkit, one spec, one reconstruction) with FP32 on the same evaluation images and, where it
says so, with real-data calibration through the same pipeline. Noise through the same
pipeline is shown beside each row: the baseline a generator has to beat.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """Zero-shot top-1 at most ``within_fp32`` below FP32 and, where set, at most
    ``within_real`` below real data with the same pipeline; agreement with FP32 at least
    ``min_agreement`` (%) where set. The pipeline is the cells' ``reconstruct`` preset after
    their ``calibration`` (``plain``, or a correction such as ``aac``)."""

    spec: str
    reconstruct: str
    within_fp32: float
    within_real: float | None = None
    min_agreement: float | None = None
    calibration: str = "plain"


TARGETS = (
    Target("W8A8", "none", within_fp32=0.5, min_agreement=97.0),
    # The same target after accurate activation clipping: a correction, not a reconstruction.
    Target("W8A8", "none", within_fp32=0.5, min_agreement=97.0, calibration="aac"),
    Target("W8A8", "none", within_fp32=0.5, min_agreement=97.0, calibration="aac+abn"),
    Target("W4A8", "genie-m", within_fp32=2.0, within_real=0.5),
    Target("W4A4", "genie-m", within_fp32=6.0, within_real=1.0),
)
TOOLKITS = ("fx", "pt2e", "nncf", "brevitas")
SEEDS = (0, 1)
SPREAD_SPEC = "W4A8"
MAX_TOOLKIT_SPREAD = 1.0
"""The zero-shot top-1 of the toolkits at SPREAD_SPEC (mean over seeds) lie within this."""


Key = tuple[str, str, str, str, str]


def _by_seed(cells: Iterable[Mapping[str, Any]]) -> dict[Key, dict]:
    """(data, spec, toolkit, reconstruct, calibration) -> {seed: cell}."""
    grouped: dict[Key, dict] = {}
    for cell in cells:
        pipeline = (cell["reconstruct"], cell.get("calibration", "plain"))
        key = (cell["data"], cell["spec"], cell["toolkit"], *pipeline)
        grouped.setdefault(key, {})[cell["seed"]] = cell
    return grouped


def _mean(runs: dict, field: str) -> float | None:
    values = [cell[field] for seed, cell in runs.items() if seed in SEEDS]
    return statistics.fmean(values) if values else None


def _verdict(shortfall: float, seeds: int) -> str:
    verdict = "met" if shortfall <= 0 else f"missed by {shortfall:.2f}"
    return verdict if seeds == len(SEEDS) else f"{verdict} ({seeds} of {len(SEEDS)} seeds)"


def target_rows(
    cells: Iterable[Mapping[str, Any]], fp32_top1: float, zero_shot: str
) -> list[dict[str, Any]]:
    """One row per target and toolkit. ``cells`` carry ``data``, ``spec``, ``toolkit``,
    ``reconstruct``, ``seed``, ``top1``, ``agreement`` and optionally ``calibration``
    (default ``plain``); ``zero_shot`` names the data
    preset under test. The spread row follows the per-toolkit rows."""
    grouped = _by_seed(cells)
    rows: list[dict[str, Any]] = []
    spread_means: dict[str, tuple[float, int]] = {}
    for target in TARGETS:
        for toolkit in TOOLKITS:
            pipeline = (target.reconstruct, target.calibration)
            runs = {
                data: grouped.get((data, target.spec, toolkit, *pipeline), {})
                for data in (zero_shot, "real", "noise")
            }
            zs = _mean(runs[zero_shot], "top1")
            real = _mean(runs["real"], "top1")
            row: dict[str, Any] = {
                "spec": target.spec,
                "reconstruct": target.reconstruct,
                "calibration": target.calibration,
                "toolkit": toolkit,
                zero_shot: zs,
                "spread": None,
                "real": real,
                "noise": _mean(runs["noise"], "top1"),
                "below FP32": None if zs is None else fp32_top1 - zs,
                "below real": None if zs is None or real is None else real - zs,
                "agreement": _mean(runs[zero_shot], "agreement"),
            }
            seeds = [s for s in runs[zero_shot] if s in SEEDS]
            if zs is None:
                row["verdict"] = "not measured"
                rows.append(row)
                continue
            top1s = [runs[zero_shot][s]["top1"] for s in seeds]
            row["spread"] = max(top1s) - min(top1s) if len(top1s) > 1 else None
            if target.spec == SPREAD_SPEC:
                spread_means[toolkit] = (zs, len(seeds))
            shortfalls = [row["below FP32"] - target.within_fp32]
            if target.within_real is not None:
                if real is None:
                    row["verdict"] = "real data not measured"
                    rows.append(row)
                    continue
                shortfalls.append(row["below real"] - target.within_real)
            if target.min_agreement is not None:
                shortfalls.append(target.min_agreement - row["agreement"])
            row["verdict"] = _verdict(max(shortfalls), len(seeds))
            rows.append(row)
    rows.append(_spread_row(spread_means))
    return rows


def _spread_row(means: dict[str, tuple[float, int]]) -> dict[str, Any]:
    """The toolkits' spread at SPREAD_SPEC: the largest minus the smallest zero-shot mean."""
    spread_target = next(t for t in TARGETS if t.spec == SPREAD_SPEC)
    row: dict[str, Any] = {
        "spec": SPREAD_SPEC,
        "reconstruct": spread_target.reconstruct,
        "calibration": spread_target.calibration,
        "toolkit": "spread over toolkits",
    }
    if not means:
        return {**row, "verdict": "not measured"}
    top1s = [top1 for top1, _ in means.values()]
    row["spread"] = max(top1s) - min(top1s)
    verdict = _verdict(row["spread"] - MAX_TOOLKIT_SPREAD, min(n for _, n in means.values()))
    missing = [t for t in TOOLKITS if t not in means]
    if missing:
        verdict += f", without {', '.join(missing)}"
    return {**row, "verdict": verdict}


def _pipeline(target: Target) -> str:
    """The target's pipeline in words: the calibration, then the reconstruction."""
    calibration = (
        "plain calibration"
        if target.calibration == "plain"
        else f"calibration + {target.calibration}"
    )
    if target.reconstruct == "none":
        return calibration
    return (
        target.reconstruct
        if target.calibration == "plain"
        else f"{calibration} + {target.reconstruct}"
    )


def describe() -> str:
    """The targets in words, for the page."""
    lines = []
    for target in TARGETS:
        pipeline = _pipeline(target)
        parts = [f"top-1 within {target.within_fp32} of FP32"]
        if target.within_real is not None:
            parts.append(f"within {target.within_real} of real data with the same pipeline")
        if target.min_agreement is not None:
            parts.append(f"agreement with FP32 at least {target.min_agreement}%")
        lines.append(f"- {target.spec}, {pipeline}: {', '.join(parts)}.\n")
    lines.append(
        f"- {SPREAD_SPEC}: the toolkits' zero-shot top-1 within {MAX_TOOLKIT_SPREAD} of each "
        "other.\n"
    )
    return "".join(lines)
