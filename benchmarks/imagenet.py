"""The ImageNet benchmark: EfficientNet-Lite0 quantized in every toolkit, evaluated on labelled
ImageNet images.

    export ZSQ_IMAGENET_DIR=/path/to/imagenet-samples   # <wnid>_<name>.JPEG, one per class
    python benchmarks/imagenet.py                    # every unfinished part (hours on 2 CPUs)
    python benchmarks/imagenet.py --part grid        # no reconstruction
    python benchmarks/imagenet.py --part genie-m     # W4A8 followed by genie-m
    python benchmarks/imagenet.py --part w8a8-aac    # W8A8 with accurate activation clipping
    python benchmarks/imagenet.py --part w8a8-abn    # W8A8 with AAC and adaptive BN
    python benchmarks/imagenet.py --part generators  # the other BN presets, fx W4A8 genie-m
    python benchmarks/imagenet.py --part loss        # one experiment on the genie-m grid
    python benchmarks/imagenet.py --part default     # the default pipeline, timed (again)
    python benchmarks/imagenet.py --render-only      # the page from what is finished

The folder is a set of labelled ImageNet images such as the public "one image per ImageNet
class" set (1,000 images). A fixed pool of 256 of them (``imagenet_split``: the smallest
SHA-256 digests of the file names) is the real-data calibration set; the other 744 are the
evaluation set of every row, FP32 included. The grids are ``zsq compare`` grids
(benchmarks/configs/imagenet.toml, imagenet_genie_m.toml, imagenet_w8a8_*.toml), resumable
cell by cell; the default pipeline is ``apply(efficientnet_lite0, "fx", "W4A8", data="genie",
reconstruct="genie-m")`` with no other argument, timed phase by phase with its peak memory.
Writes docs/results/imagenet/ and docs/results/imagenet.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from imagenet_targets import describe as describe_targets
from imagenet_targets import target_rows

from zsq_plugins.compare import GridConfig, evaluation_data, run_grid
from zsq_plugins.datasets.imagenet import CALIBRATION_POOL, ENV_VAR, ImageNetSamples
from zsq_plugins.errors import ZSQError
from zsq_plugins.reporting import (
    environment_footer,
    environment_info,
    markdown_table,
    write_json,
    write_text_atomic,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "imagenet"
PAGE = ROOT / "docs" / "results" / "imagenet.md"
CONFIGS = ROOT / "benchmarks" / "configs"
GRIDS = {
    "grid": "imagenet",
    "genie-m": "imagenet_genie_m",
    "w8a8-aac": "imagenet_w8a8_aac",
    "w8a8-abn": "imagenet_w8a8_abn",
}
"""Part name -> its grid config, benchmarks/configs/<name>.toml."""


TITLES = {
    "grid": "No reconstruction",
    "genie-m": "W4A8, reconstructed with genie-m",
    "w8a8-aac": "W8A8, calibration + accurate activation clipping",
    "w8a8-abn": "W8A8, calibration + accurate activation clipping + adaptive BN",
}


GENERATORS = {"generators": "imagenet_generators"}
"""The BN presets other than genie through the genie-m pipeline (fx, W4A8): with the genie-m
grid's cells, the generator cost-accuracy table."""
GENERATOR_CELL = {"toolkit": "fx", "spec": "W4A8", "reconstruct": "genie-m"}
"""The cell each generator is judged by in the cost-accuracy table."""
EXPERIMENTS = {"loss": "imagenet_loss", "weight-init": "imagenet_weight_init"}
"""Single-factor experiments on the genie-m grid: part name -> its grid config, whose
``[grid.reconstruction]`` table is the one change; each cell is set beside the genie-m cell
of the same data, spec and toolkit (and kept out of the targets)."""
BASELINE = "genie-m"


def grid_folder(part: str) -> Path:
    """Where a part's grid writes its cells and pages."""
    return RESULTS / part.replace("-", "_")


DATA_DIR = ROOT / ".cache" / "imagenet-synthetic"
"""Synthetic sets shared by both grids (generated once per preset), outside docs/."""
MODEL = "efficientnet_lite0"
DEFAULT_PIPELINE = {"toolkit": "fx", "spec": "W4A8", "data": "genie", "reconstruct": "genie-m"}
TARGET_MINUTES = 45.0
"""The default pipeline's target on 2 CPU threads."""
ZERO_SHOT = "genie"
"""The data preset the accuracy targets are evaluated for."""

log = logging.getLogger("imagenet")


def run_default_pipeline(out: Path, progress: bool) -> dict[str, Any]:
    """``apply`` with the defaults only, timed and measured per phase, then evaluated."""
    from zsq_plugins import apply, evaluate, zoo

    model = zoo.load(MODEL)
    started = time.perf_counter()
    quantized, report = apply(
        model,
        DEFAULT_PIPELINE["toolkit"],
        DEFAULT_PIPELINE["spec"],
        data=DEFAULT_PIPELINE["data"],
        reconstruct=DEFAULT_PIPELINE["reconstruct"],
        progress=progress,
    )
    wall = time.perf_counter() - started
    test = evaluation_data(MODEL, None, imagenet_folder=True)
    result = evaluate(quantized, test, zoo.load(MODEL), progress=progress)
    reconstruction = report.reconstruction
    assert reconstruction is not None and report.synthesis is not None
    steps = reconstruction.config["iterations"] * len(reconstruction.blocks)
    record = {
        "call": DEFAULT_PIPELINE,
        "minutes": round(wall / 60, 2),
        "target_minutes": TARGET_MINUTES,
        "num_samples": report.num_samples,
        "generation": {
            "iterations": report.synthesis["config"]["iterations"],
            "batch_size": report.synthesis["config"]["batch_size"],
            "images_per_s": round(report.num_samples / report.timings_s["data"], 3),
        },
        "reconstruction": {
            "iterations_per_block": reconstruction.config["iterations"],
            "blocks": len(reconstruction.blocks),
            "batch_size": reconstruction.config["batch_size"],
            "steps_per_s": round(steps / report.timings_s["reconstruct"], 3),
        },
        "timings_s": report.timings_s,
        "peak_rss_mib": report.peak_rss_mib,
        "top1": result.top1,
        "agreement": result.agreement,
        "kl": result.kl,
        "num_test": result.num_samples,
        "environment": environment_info(),
    }
    write_json(out / "default_pipeline.json", record)
    return record


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


PHASES = ("data", "quantize_and_calibrate", "clip", "abn", "reconstruct", "evaluate")


def _cost_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for cell in cells:
        timings, memory = cell.get("timings_s", {}), cell.get("peak_rss_mib") or {}
        row: dict[str, Any] = {
            "data": cell["data"],
            "spec": cell["spec"],
            "toolkit": cell["toolkit"],
            "reconstruct": cell["reconstruct"],
        }
        for phase in PHASES:
            row[f"{phase} s"] = timings.get(phase)
        row["reconstruct s"] = _reconstruct_seconds(cell)
        row["peak RSS MiB"] = max(memory.values(), default=None)
        rows.append(row)
    return rows


def _resumed_notes(cells: list[dict[str, Any]]) -> str:
    """What the time of a cell resumed from a reconstruction checkpoint covers."""
    notes = []
    for cell in cells:
        restored = cell.get("resumed_blocks")
        if not restored:
            continue
        covered = (
            "adds their recorded seconds to this run's"
            if cell.get("reconstruction_seconds") is not None
            else "times only the blocks the resuming run reconstructed (this record predates "
            "storing the restored blocks' seconds)"
        )
        notes.append(
            f"- {cell['data']} {cell['spec']} {cell['toolkit']}: resumed after a stop with "
            f"{restored} blocks restored from its checkpoint; `reconstruct s` {covered}.\n"
        )
    return "\n" + "".join(notes) if notes else ""


def _block_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per reconstructed block, medians over the cells that recorded blocks (records from
    before blocks were recorded have none)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        for block in cell.get("reconstruction_blocks") or []:
            if block.get("step_seconds") is not None and block.get("iterations"):
                by_name.setdefault(block["name"], []).append(block)
    rows = []
    for name, blocks in by_name.items():
        rows.append(
            {
                "block": name,
                "cells": len(blocks),
                "layers": blocks[0]["layers"],
                "steps": statistics.median(b["iterations"] for b in blocks),
                "set-up s": statistics.median(b["seconds"] - b["step_seconds"] for b in blocks),
                "steps/s": statistics.median(b["iterations"] / b["step_seconds"] for b in blocks),
                "peak RSS MiB": statistics.median(b["peak_rss_mib"] or 0.0 for b in blocks),
            }
        )
    return rows


def _update_generation(data_dir: Path) -> None:
    """generation.json with every set in ``data_dir`` not recorded yet; a recorded set keeps
    its time (a set generated again, say on a fresh checkout beside other work, would replace
    an idle measurement with a loaded one: delete its row to measure it again), and the sets
    no longer cached here are kept (the page is built from the JSON, not the cache)."""
    key = ("preset", "budget", "images", "iterations", "batch")
    recorded = (_load(RESULTS / "generation.json") or {}).get("sets", [])
    rows = {tuple(r[k] for k in key): r for r in _generation_rows(data_dir)}
    rows.update({tuple(r[k] for k in key): r for r in recorded})
    write_json(RESULTS / "generation.json", {"sets": list(rows.values())})


def _generation_rows(data_dir: Path) -> list[dict[str, Any]]:
    """Each synthetic set the grids generated: its budget and throughput."""
    rows = []
    for manifest_path in sorted(data_dir.glob(f"{MODEL}/*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        identity, seconds = manifest["identity"], manifest.get("generation_seconds")
        if not seconds:
            continue
        rows.append(
            {
                "preset": identity["preset"],
                "budget": identity["budget"],
                "images": identity["num_samples"],
                "iterations": identity["config"]["iterations"],
                "batch": identity["config"]["batch_size"],
                "minutes": seconds / 60,
                "images/s": identity["num_samples"] / seconds,
            }
        )
    return rows


def generator_rows(
    generation: list[dict[str, Any]], cells: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per generated set, its cost and the GENERATOR_CELL cell calibrated on it; noise and
    real data (no generation) first."""
    judged = {c["data"]: c for c in cells if all(c.get(k) == v for k, v in GENERATOR_CELL.items())}

    def row(data: str, minutes: float | None, images_per_s: float | None) -> dict[str, Any]:
        cell = judged.get(data, {})
        return {
            "data": data,
            "generation minutes": minutes,
            "images/s": images_per_s,
            "top1": cell.get("top1"),
            "agreement": cell.get("agreement"),
            "kl": cell.get("kl"),
        }

    generated = [
        row(entry["preset"], entry["minutes"], entry["images/s"])
        for entry in generation
        if entry["preset"] in judged
    ]
    if not generated:
        return []
    return [row(data, None, None) for data in ("noise", "real") if data in judged] + generated


def _fp32_top1(cells: list[dict[str, Any]]) -> float | None:
    """FP32 top-1 on the evaluation images, as the cells recorded it."""
    return next((c["fp32_top1"] for c in cells if c.get("fp32_top1") is not None), None)


def _experiment_rows(
    baseline: list[dict[str, Any]], variant: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each variant cell beside the baseline cell of the same data, spec and toolkit."""
    index = {(c["data"], c["spec"], c["toolkit"]): c for c in baseline}
    rows = []
    for cell in variant:
        base = index.get((cell["data"], cell["spec"], cell["toolkit"]))
        row = {
            "data": cell["data"],
            "spec": cell["spec"],
            "toolkit": cell["toolkit"],
            "baseline top1": None if base is None else base["top1"],
            "top1": cell["top1"],
            "change": None if base is None else cell["top1"] - base["top1"],
            "baseline agreement": None if base is None else base["agreement"],
            "agreement": cell["agreement"],
            "baseline reconstruct s": None if base is None else _reconstruct_seconds(base),
            "reconstruct s": _reconstruct_seconds(cell),
        }
        rows.append(row)
    return rows


def _reconstruct_seconds(cell: dict[str, Any]) -> float | None:
    """The cell's reconstruction time, restored blocks included where recorded."""
    if cell.get("reconstruction_seconds") is not None:
        return cell["reconstruction_seconds"]
    return cell.get("timings_s", {}).get("reconstruct")


def _experiments_section(baseline: dict[str, Any] | None) -> str:
    """The single-factor experiments, each against the genie-m grid."""
    if baseline is None:
        return ""
    out = []
    for part, name in EXPERIMENTS.items():
        record = _load(grid_folder(part) / "results.json")
        if record is None:
            continue
        config = GridConfig.from_toml(CONFIGS / f"{name}.toml")
        change = ", ".join(f"`{k} = {v!r}`" for k, v in sorted(config.reconstruction.items()))
        rows = _experiment_rows(baseline["cells"], record["cells"])
        out.append(
            f"\n### {part}: {change}\n\nThe {BASELINE} grid's pipeline with {change} "
            f"(benchmarks/configs/{name}.toml); `baseline` is the {BASELINE} grid's cell of "
            "the same data, spec and toolkit.\n\n"
        )
        out.append(markdown_table(rows, list(rows[0]), digits=2))
    if not out:
        return ""
    return "\n## Single-factor experiments\n" + "".join(out)


def _targets_section(records: list[dict[str, Any]]) -> str:
    """The accuracy targets over every grid's cells, each cell tagged with its grid's seed."""
    cells = [
        {**cell, "seed": record["config"]["seed"]} for record in records for cell in record["cells"]
    ]
    fp32 = _fp32_top1(cells)
    if fp32 is None:
        return ""
    rows = target_rows(cells, fp32, ZERO_SHOT)
    columns = ["spec", "calibration", "reconstruct", "toolkit", ZERO_SHOT, "spread", "real"]
    columns += ["noise", "below FP32", "below real", "agreement", "verdict"]
    return (
        "\n## Targets\n\n"
        f"Top-1 of {ZERO_SHOT} images, mean over seeds (spread: largest minus smallest seed), "
        "beside real data and noise through the same pipeline, in the four toolkits:\n\n"
        + describe_targets()
        + "\n"
        + markdown_table(rows, columns, digits=2)
    )


def render() -> str:
    from zsq_plugins.zoo import card

    published = card(MODEL).published_top1
    out = [
        "# ImageNet benchmark (generated by `python benchmarks/imagenet.py`)\n\n",
        f"EfficientNet-Lite0 (real ImageNet weights) on a folder of 1,000 labelled ImageNet "
        f"images, one per class: a fixed pool of {CALIBRATION_POOL} of them (the smallest "
        "SHA-256 digests of the file names, `zsq_plugins.datasets.imagenet_split`) is the "
        "real-data calibration set; every row is evaluated on the other "
        f"{1000 - CALIBRATION_POOL} (FP32 included). These sample images are easier than the "
        f"ImageNet validation set (the model's published top-1 there is {published}%): read "
        "top-1 against the FP32 row, and agreement and KL to FP32.\n\n"
        "Grids run the literature's setting (full 8-bit first and last layers, "
        "`overflow_fix = false`) with 256 calibration images and the `auto` budget "
        "(zsq_plugins.budgets); the default pipeline runs the library's defaults.\n",
    ]
    loaded = {part: _load(grid_folder(part) / "results.json") for part in (*GRIDS, *GENERATORS)}
    records = []
    for part in GRIDS:
        record = loaded[part]
        if record is None:
            out.append(f"\n## {TITLES[part]}\n\nNot measured yet: `python benchmarks/imagenet.py "
                       f"--part {part}`.\n")  # fmt: skip
            continue
        records.append(record)
        cells = record["cells"]
        fp32 = _fp32_top1(cells)
        link = f"imagenet/{grid_folder(part).name}/results.md"
        out.append(f"\n## {TITLES[part]}: [accuracy tables]({link})\n\n")
        if fp32 is not None:
            out.append(
                f"{len(cells)} cells finished; FP32 top-1 on the evaluation images: "
                f"{fp32:.2f}%.\n\n"
            )
        out.append("### Top-1 (%), agreement with FP32 (%) and KL to FP32 per cell\n\n")
        columns = ["data", "spec", "toolkit", "top1", "agreement", "kl"]
        reference = {"data": "FP32", "spec": "-", "toolkit": "-", "top1": fp32}
        rows = [reference] + [{k: c[k] for k in columns} for c in cells]
        out.append(markdown_table(rows, columns, digits=2))
        out.append("\n### Time (s) and peak memory per phase\n\n")
        out.append(
            "`data` is 0 where the calibration set came from the grid's cache (generation "
            "is timed once per set, below).\n\n"
        )
        cost = _cost_rows(cells)
        out.append(markdown_table(cost, list(cost[0]), digits=1))
        out.append(_resumed_notes(cells))
        blocks = _block_rows(cells)
        if blocks:
            out.append(
                "\n### Reconstruction per block\n\nMedians over the cells that recorded "
                "their blocks: the set-up (the block's FP targets and cached inputs for every "
                "image, the write-back) apart from the learning steps, and the process's peak "
                "resident memory while the block ran.\n\n"
            )
            out.append(markdown_table(blocks, list(blocks[0]), digits=2))
        if record.get("environment"):
            out.append(environment_footer(record["environment"]))
    out.append(_targets_section(records))
    out.append(_experiments_section(loaded[BASELINE]))
    tables = sorted(RESULTS.glob("sensitivity*.json"))
    if tables:
        links = []
        for path in tables:
            record = json.loads(path.read_text())
            links.append(
                f"- [{record['spec']}, {record['toolkit']}, {record['data']} calibration]"
                f"(imagenet/{path.stem}.md) (`python benchmarks/sensitivity.py --spec "
                f"{record['spec']}`)\n"
            )
        out.append(
            "\n## Per-layer sensitivity\n\nWhich quantizers alone take the model away from "
            "FP32:\n\n" + "".join(links)
        )
    generation = (_load(RESULTS / "generation.json") or {}).get("sets", [])
    if generation:
        out.append("\n## Generation\n\n")
        out.append(markdown_table(generation, list(generation[0]), digits=2))
        cells = [
            cell
            for part in (BASELINE, *GENERATORS)
            for cell in (loaded[part] or {}).get("cells", [])
        ]
        rows = generator_rows(generation, cells)
        if rows:
            where = ", ".join(f"{k} {v}" for k, v in GENERATOR_CELL.items())
            out.append(
                f"\n### Which generator, for which cost\n\nEach set's generation time beside "
                f"the top-1 it gives through the same pipeline ({where}); noise and real "
                "data through it for reference.\n\n"
            )
            out.append(markdown_table(rows, list(rows[0]), digits=2))
    default = _load(RESULTS / "default_pipeline.json")
    out.append("\n## The default pipeline\n\n")
    if default is None:
        out.append("Not measured yet: `python benchmarks/imagenet.py --part default`.\n")
    else:
        call = default["call"]
        verdict = "within" if default["minutes"] <= default["target_minutes"] else "OVER"
        out.append(
            f"`apply(efficientnet_lite0, {call['toolkit']!r}, {call['spec']!r}, "
            f"data={call['data']!r}, reconstruct={call['reconstruct']!r})`, no other "
            f"argument: **{default['minutes']:.1f} minutes**, {verdict} the "
            f"{default['target_minutes']:.0f}-minute target. The `auto` budget chose "
            f"{default['num_samples']} images, {default['generation']['iterations']} "
            f"generation steps per batch of {default['generation']['batch_size']} "
            f"({default['generation']['images_per_s']:.3f} images/s), and "
            f"{default['reconstruction']['iterations_per_block']} steps of batch "
            f"{default['reconstruction']['batch_size']} for each of "
            f"{default['reconstruction']['blocks']} blocks "
            f"({default['reconstruction']['steps_per_s']:.2f} steps/s, block set-up "
            "included).\n\n"
        )
        phases = [
            {
                "phase": phase,
                "seconds": seconds,
                "peak RSS MiB": default["peak_rss_mib"].get(phase),
            }
            for phase, seconds in default["timings_s"].items()
        ]
        out.append(markdown_table(phases, ["phase", "seconds", "peak RSS MiB"], digits=1))
        out.append(
            f"\nOn the {default['num_test']} evaluation images: top-1 {default['top1']:.2f}%, "
            f"agreement with FP32 {default['agreement']:.2f}%, KL {default['kl']:.4f}.\n"
        )
        out.append(environment_footer(default["environment"]))
    out.append(
        "\n## GPU\n\nNo GPU was available to the sessions that made this page: the papers' "
        "budgets (`paper`) on CUDA have not been measured.\n"
    )
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--imagenet-dir", default=None, help=f"the labelled image folder (default ${ENV_VAR})"
    )
    parser.add_argument(
        "--part",
        choices=["all", *GRIDS, *GENERATORS, *EXPERIMENTS, "default"],
        default="all",
        help="what to run (all: the grids and the default pipeline, not the experiments)",
    )
    parser.add_argument("--render-only", action="store_true", help="only rebuild the page")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.imagenet_dir:
        os.environ[ENV_VAR] = str(Path(args.imagenet_dir).resolve())
    if not args.render_only:
        try:
            folder = ImageNetSamples()
        except ZSQError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        log.info("%d labelled images in %s", len(folder), folder.root)
        torch.manual_seed(0)
        for part, name in {**GRIDS, **GENERATORS, **EXPERIMENTS}.items():
            if args.part == part or (args.part == "all" and part in GRIDS):
                config = GridConfig.from_toml(CONFIGS / f"{name}.toml")
                run_grid(config, grid_folder(part), data_dir=DATA_DIR, progress=args.progress)
        measured = (RESULTS / "default_pipeline.json").is_file()
        if args.part == "default" or (args.part == "all" and not measured):
            run_default_pipeline(RESULTS, args.progress)
    if DATA_DIR.is_dir():
        _update_generation(DATA_DIR)
    parts = {**GRIDS, **GENERATORS, **EXPERIMENTS}.items()
    for part, name in parts:  # the grids' own pages, from every finished cell
        if (grid_folder(part) / "cells").is_dir():
            config = GridConfig.from_toml(CONFIGS / f"{name}.toml")
            run_grid(config, grid_folder(part), data_dir=DATA_DIR, progress=False, render_only=True)
    write_text_atomic(PAGE, render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
