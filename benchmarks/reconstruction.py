"""Reconstruction benchmark: plain calibration vs each reconstruction preset, per toolkit.

    python benchmarks/reconstruction.py                       # the whole grid (hours on CPU)
    python benchmarks/reconstruction.py --models resnet20_fmnist --specs W4A4 \
        --toolkits fx --sources real genie --methods none genie-m
    python benchmarks/reconstruction.py --render-only

Every cell (model, spec, toolkit, data source, method, budget) is written as its own JSON under
docs/results/reconstruction/cells/ as soon as it finishes, and skipped when the grid runs
again, so a long grid resumes after an interruption; a cell stopped part-way resumes after its
last reconstructed block (.cache/reconstruction/). docs/results/reconstruction.md is rendered
from all cells present. Each cell records top-1 on the 10k test set, the time of each step and
the peak RSS of a fresh process (cells run in subprocesses so that memory is per cell).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from setting import literature_spec
from synthetic_cache import cached_synthesize

from zsq_plugins import apply, evaluate, zoo
from zsq_plugins.compare import reconstruction_config, same_reconstruction
from zsq_plugins.datasets import calibration_subset, fashion_mnist
from zsq_plugins.grid_order import spec_order
from zsq_plugins.reporting import (
    environment_footer,
    environment_info,
    markdown_table,
    peak_rss_mib,
    write_json,
    write_text_atomic,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
CELLS = RESULTS / "reconstruction" / "cells"
CHECKPOINTS = ROOT / ".cache" / "reconstruction"
"""A cell's reconstruction saves its state here after every block, so that a cell stopped
part-way (a paper-budget cell runs for hours) resumes; removed once the cell is stored."""
log = logging.getLogger("benchmarks.reconstruction")


def cell_name(model: str, spec: str, toolkit: str, source: str, method: str, budget: str) -> str:
    return f"{model}__{spec}__{toolkit}__{source}__{method}__{budget}"


def run_cell(args: argparse.Namespace) -> dict[str, Any]:
    """One cell, in this process (called through --cell in a subprocess)."""
    torch.set_num_threads(args.threads)
    model = zoo.load(args.models[0])
    started = time.perf_counter()
    if args.sources[0] == "real":
        images = calibration_subset(args.num_samples, seed=args.seed)
    else:
        images = cached_synthesize(
            args.cache_dir,
            args.models[0],
            args.sources[0],
            args.num_samples,
            args.seed,
            "cpu",
            False,
        ).images
    data_s = time.perf_counter() - started
    method = args.methods[0]
    name = cell_name(
        args.models[0], args.specs[0], args.toolkits[0], args.sources[0], method, args.budget
    )
    quantized, report = apply(
        model,
        args.toolkits[0],
        literature_spec(args.specs[0]),
        data=images,
        reconstruct=None if method == "none" else method,
        reconstruct_budget=args.budget,
        reconstruct_checkpoint=None if method == "none" else CHECKPOINTS / name,
        seed=args.seed,
        progress=not args.no_progress,
    )
    top1 = evaluate(quantized, fashion_mnist("test"), progress=False).top1
    reconstruction = report.reconstruction
    blocks = reconstruction.blocks if reconstruction else []
    timings = dict(report.timings_s)
    if reconstruction and reconstruction.resumed_blocks:
        # this process ran only the blocks after the checkpoint; the routine's time adds the
        # restored blocks' recorded seconds
        timings["reconstruct"] = reconstruction.seconds
    return {
        "model": args.models[0],
        "spec": args.specs[0],
        "toolkit": args.toolkits[0],
        "source": args.sources[0],
        "method": method,
        "budget": args.budget,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "top1": top1,
        "fp32_top1": zoo.card(args.models[0]).published_top1,
        "data_s": round(data_s, 2),
        "timings_s": timings,
        "resumed_blocks": reconstruction.resumed_blocks if reconstruction else 0,
        "max_fidelity": max((b.fidelity for b in blocks), default=None),
        "reconstruction_config": reconstruction.config if reconstruction else None,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "environment": environment_info(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20_fmnist", "mobilenetv2_fmnist"])
    parser.add_argument("--specs", nargs="+", default=["W4A4", "W3A3", "W2A4"])
    parser.add_argument("--toolkits", nargs="+", default=["fx", "nncf", "brevitas"])
    parser.add_argument("--sources", nargs="+", default=["real", "genie"])
    parser.add_argument(
        "--methods", nargs="+", default=["none", "adaround", "brecq", "qdrop", "genie-m"]
    )
    parser.add_argument("--budget", default="cpu", choices=["cpu", "paper"])
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "synthetic")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cell:
        print(json.dumps(run_cell(args)))
        return
    if not args.render_only:
        for model in args.models:
            for spec in args.specs:
                for source in args.sources:
                    for toolkit in args.toolkits:
                        for method in args.methods:
                            run_grid_cell(args, model, spec, toolkit, source, method)
    write_text_atomic(RESULTS / "reconstruction.md", render())


def run_grid_cell(args, model, spec, toolkit, source, method) -> None:
    name = cell_name(model, spec, toolkit, source, method, args.budget)
    path = CELLS / f"{name}.json"
    if path.is_file():
        stored = json.loads(path.read_text()).get("reconstruction_config")
        if same_reconstruction(stored, reconstruction_config(method, args.budget)):
            log.info("skip %s (done)", name)
            return
        log.info("%s was run with another reconstruction config: running it again", name)
    command = [
        sys.executable,
        __file__,
        "--cell",
        "--models",
        model,
        "--specs",
        spec,
        "--toolkits",
        toolkit,
        "--sources",
        source,
        "--methods",
        method,
        "--budget",
        args.budget,
        "--num-samples",
        str(args.num_samples),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--cache-dir",
        str(args.cache_dir),
        "--no-progress",
    ]
    log.info("run %s", name)
    # The cell's log (one line per reconstructed block) streams through: a paper-budget cell
    # runs for hours, and its progress is only visible there.
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        log.error("%s failed with exit status %d (its log is above)", name, done.returncode)
        return
    write_json(path, json.loads(done.stdout.strip().splitlines()[-1]))
    shutil.rmtree(CHECKPOINTS / name, ignore_errors=True)


def is_current(cell: dict[str, Any]) -> bool:
    """Whether ``cell`` was run with its preset's configuration of today."""
    return same_reconstruction(
        cell.get("reconstruction_config"), reconstruction_config(cell["method"], cell["budget"])
    )


def render() -> str:
    cells: list[dict[str, Any]] = []
    stale: list[dict[str, Any]] = []
    for path in sorted(CELLS.glob("*.json")):
        cell = json.loads(path.read_text())
        (cells if is_current(cell) else stale).append(cell)
    out = ["# Reconstruction benchmark (generated)\n\n"]
    if stale:
        names = ", ".join(
            cell_name(c["model"], c["spec"], c["toolkit"], c["source"], c["method"], c["budget"])
            for c in stale
        )
        out.append(
            f"Left out: {len(stale)} cell(s) run with an older configuration of their preset "
            f"or an older revision of the routine, to be run again ({names}).\n\n"
        )
    if not cells:
        return "".join(out) + "No cell has been run yet.\n"
    out.append(
        "Top-1 (%) on the 10k Fashion-MNIST test set after calibration (`none`) and "
        "after each reconstruction preset, per toolkit; 1024 calibration images.\n"
    )
    order = ["none", "adaround", "brecq", "qdrop", "genie-m"]
    methods = sorted(
        {c["method"] for c in cells},
        key=lambda m: (m not in order, order.index(m) if m in order else 0, m),
    )
    for model in dict.fromkeys(c["model"] for c in cells):
        mine = [c for c in cells if c["model"] == model]
        out.append(f"\n## {model} (FP32 {mine[0]['fp32_top1']:.2f}%)\n\n")
        rows = []
        keys = dict.fromkeys((c["spec"], c["source"], c["toolkit"], c["budget"]) for c in mine)
        for key in sorted(keys, key=lambda k: (spec_order(k[0]), k[1] != "real", k[1:])):
            row = dict(zip(("spec", "data", "toolkit", "budget"), key, strict=True))
            for c in mine:
                if (c["spec"], c["source"], c["toolkit"], c["budget"]) == key:
                    row[c["method"]] = c["top1"]
            rows.append(row)
        out.append(markdown_table(rows, ["spec", "data", "toolkit", "budget", *methods]))
        costs = [
            {
                "toolkit": c["toolkit"],
                "spec": c["spec"],
                "data": c["source"],
                "method": c["method"],
                "threads": c["environment"]["torch_threads"],
                "reconstruct_s": c["timings_s"]["reconstruct"],
                "peak_rss_mib": c["peak_rss_mib"],
                "max_fidelity": c["max_fidelity"],
            }
            for c in mine
            if c["method"] != "none"
        ]
        if costs:
            out.append(
                "\n### Cost\n\n"
                "Times are indicative: most cells ran beside other work on the 2-core machine "
                "(the 1-thread cells two grids at a time)."
                + (
                    " The 2-thread cells, which the pipeline target uses, ran alone."
                    if any(c["threads"] == 2 for c in costs)
                    else ""
                )
                + "\n\n"
                + markdown_table(costs, list(costs[0]), digits=3)
            )
        pipelines = pipeline_rows(mine)
        if pipelines:
            out.append(
                "\n### Zero-shot pipeline: generate 1024 images + reconstruct\n\n"
                "Generation seconds come from the generators benchmark "
                "(docs/results/generators/), on the same machine and threads.\n\n"
                + markdown_table(pipelines, list(pipelines[0]), digits=1)
            )
    targets = target_rows(cells)
    if targets:
        out.append(
            "\n## Targets (issue: block reconstruction)\n\n"
            "Each row is computed from the cells above; a target with missing cells is left "
            "out.\n\n"
            + markdown_table(targets, list(targets[0]), digits=2)
            + "\nThe toolkit spread compares each toolkit's own quantized model, and the toolkits "
            "do not quantize the same tensors (docs/adapters.md): torch.ao FX, NNCF and ONNX "
            "Runtime also quantize each residual branch before its addition, Brevitas only the "
            "inputs of conv and linear layers, so its residual sums stay float. A spread row "
            "needs the three PyTorch toolkits' cells and includes onnxruntime's where it was "
            "measured.\n"
        )
        if placement_is_current():
            out.append(
                "The [placement ablation](reconstruction/placement.md) reconstructs fx and "
                "NNCF with only the tensors Brevitas quantizes, which separates the graph's "
                "share of a spread from the routine's; its rows above compare the three "
                "toolkits under one placement.\n"
            )
    plot = RESULTS / "reconstruction_accuracy_vs_bits.png"
    if write_plot(cells, plot):
        out.append(f"\n![accuracy vs bits]({plot.relative_to(RESULTS).as_posix()})\n")
    out.append(environment_footer(cells[0]["environment"]))
    return "".join(out)


def is_current_placement(result: dict[str, Any]) -> bool:
    """Whether a result of benchmarks/placement.py (fx, genie-m, cpu budget) was made with
    today's routine and configuration."""
    return is_current({**result, "method": "genie-m", "budget": "cpu"})


PLACEMENTS = {
    "": "conv/linear inputs only",
    "-float-skips": "Brevitas's placement",
}
"""benchmarks/placement.py's variants (suffix of fx and nncf) and what they match."""


PLACEMENT_RESULTS = RESULTS / "reconstruction" / "placement.json"
"""benchmarks/placement.py's results: a JSON list, one entry per model, spec, data and toolkit."""


def stored_placement_results() -> list[dict[str, Any]]:
    """Every result of benchmarks/placement.py, current or not (empty before its first run)."""
    if not PLACEMENT_RESULTS.is_file():
        return []
    return json.loads(PLACEMENT_RESULTS.read_text())


def matched_placements() -> dict[tuple[str, str, str, str], dict[str, float]]:
    """fx and NNCF top-1 from the placement ablation (current results only), by model, spec,
    data and placement matched to Brevitas's."""
    found: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for result in stored_placement_results():
        if not is_current_placement(result):
            continue
        toolkit, _, suffix = result.get("toolkit", "fx").partition("-")
        placement = PLACEMENTS[f"-{suffix}" if suffix else ""]
        key = (result.get("model", "resnet20_fmnist"), result["spec"], result["source"], placement)
        found.setdefault(key, {})[toolkit] = result["top1"]
    return found


def placement_is_current() -> bool:
    """Whether benchmarks/placement.py has a current result."""
    return any(is_current_placement(r) for r in stored_placement_results())


def generation_seconds(model: str, preset: str) -> float | None:
    """Seconds the generators benchmark took for 1024 images of ``preset`` on ``model``."""
    path = RESULTS / "generators" / f"{model}.json"
    if not path.is_file():
        return None
    for entry in json.loads(path.read_text())["models"]:
        for row in entry["rows"]:
            if row["source"] == preset and row.get("num_samples") == 1024:
                return row["generation_s"]
    return None


def pipeline_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for c in cells:
        if c["source"] == "real" or c["method"] == "none" or c["num_samples"] != 1024:
            continue
        generation = generation_seconds(c["model"], c["source"])
        if generation is None:
            continue
        reconstruct_s = c["timings_s"]["reconstruct"]
        rows.append(
            {
                "toolkit": c["toolkit"],
                "spec": c["spec"],
                "data": c["source"],
                "method": c["method"],
                "budget": c["budget"],
                "threads": c["environment"]["torch_threads"],
                "generate_s": generation,
                "reconstruct_s": reconstruct_s,
                "pipeline_min": (generation + reconstruct_s) / 60,
                "top1": c["top1"],
            }
        )
    return rows


FP32_GAP = {"W4A4": 0.5, "W3A3": 1.5, "W2A4": 5.0}
"""Real data + genie-m: most points below FP32, per spec (resnet20_fmnist)."""
ZERO_SHOT_GAP = {
    ("resnet20_fmnist", "W4A4"): 0.3,
    ("resnet20_fmnist", "W3A3"): 1.0,
    ("resnet20_fmnist", "W2A4"): 2.0,
    ("mobilenetv2_fmnist", "W4A4"): 1.0,
}
"""Best zero-shot preset + genie-m: most points below real data + genie-m."""
TOOLKIT_SPREAD = 0.5
SPREAD_TOOLKITS = frozenset({"brevitas", "fx", "nncf"})
PIPELINE_MINUTES = 15.0
"""Generate 1024 images + reconstruct resnet20_fmnist at W4A4 with the cpu budget, 2 threads."""


def target_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each checked against the cells that measure it (cpu budget)."""
    top1 = {
        (c["model"], c["spec"], c["toolkit"], c["source"], c["method"]): c["top1"]
        for c in cells
        if c["budget"] == "cpu"
    }
    fp32 = {c["model"]: c["fp32_top1"] for c in cells}
    keys = sorted({(m, s, t) for m, s, t, _, _ in top1}, key=lambda k: (k[0], k[1], k[2]))
    rows: list[dict[str, Any]] = []

    def add(target: str, where: str, value: float, limit: float) -> None:
        rows.append(
            {"target": target, "cell": where, "value": value, "limit": limit, "met": value <= limit}
        )

    for model, spec, toolkit in keys:
        real = top1.get((model, spec, toolkit, "real", "genie-m"))
        if model == "resnet20_fmnist" and spec in FP32_GAP and real is not None:
            add("FP32 - real genie-m", f"{model} {spec} {toolkit}", fp32[model] - real,
                FP32_GAP[spec])  # fmt: skip
        zero_shot = [
            value
            for (m, s, t, source, method), value in top1.items()
            if (m, s, t, method) == (model, spec, toolkit, "genie-m") and source != "real"
        ]
        if (model, spec) in ZERO_SHOT_GAP and real is not None and zero_shot:
            add("real - best zero-shot (genie-m)", f"{model} {spec} {toolkit}",
                real - max(zero_shot), ZERO_SHOT_GAP[(model, spec)])  # fmt: skip

    def add_spread(target: str, where: str, by_toolkit: dict[str, float]) -> None:
        low, high = min(by_toolkit, key=by_toolkit.get), max(by_toolkit, key=by_toolkit.get)
        add(target, f"{where} ({low} to {high})", by_toolkit[high] - by_toolkit[low],
            TOOLKIT_SPREAD)  # fmt: skip

    for model, spec, source in sorted({(m, s, src) for m, s, _, src, _ in top1}):
        by_toolkit = {
            t: value
            for (m, s, t, src, method), value in top1.items()
            if (m, s, src, method) == (model, spec, source, "genie-m")
        }
        # A spread over some toolkits only would look smaller than it is.
        if by_toolkit.keys() >= SPREAD_TOOLKITS:
            add_spread("toolkit spread after genie-m", f"{model} {spec} {source}", by_toolkit)
    for (model, spec, source, placement), by_toolkit in matched_placements().items():
        brevitas = top1.get((model, spec, "brevitas", source, "genie-m"))
        if brevitas is not None and len(by_toolkit) == 2:
            by_toolkit = {**by_toolkit, "brevitas": brevitas}
            target = f"toolkit spread after genie-m, {placement}"
            add_spread(target, f"{model} {spec} {source}", by_toolkit)
    for c in cells:
        cpu = top1.get((c["model"], c["spec"], c["toolkit"], c["source"], c["method"]))
        if c["budget"] == "paper" and c["method"] == "genie-m" and cpu is not None:
            add("paper budget - cpu budget", f"{c['model']} {c['spec']} {c['toolkit']} "
                f"{c['source']}", c["top1"] - cpu, 0.3)  # fmt: skip
    resnet = [c for c in cells if (c["budget"], c["model"]) == ("cpu", "resnet20_fmnist")]
    for row in pipeline_rows(resnet):
        # The target is stated for 2 threads (cells run with fewer are slower by design) and
        # for a generator's pipeline: noise, the baseline, generates nothing.
        generated = row["data"] != "noise"
        if generated and (row["spec"], row["method"], row["threads"]) == ("W4A4", "genie-m", 2):
            add("zero-shot pipeline minutes", f"resnet20_fmnist {row['toolkit']} {row['data']}",
                row["pipeline_min"], PIPELINE_MINUTES)  # fmt: skip
    return rows


def write_plot(cells: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy against bits per toolkit (zsq_plugins.plots); False without matplotlib."""
    from zsq_plugins.plots import MissingPlotting, accuracy_vs_bits

    rows = [
        {
            "model": c["model"],
            "toolkit": c["toolkit"],
            "spec": c["spec"],
            "data": c["source"] if c["budget"] == "cpu" else f"{c['source']} ({c['budget']})",
            "reconstruct": c["method"],
            "top1": c["top1"],
            "fp32_top1": c["fp32_top1"],
        }
        for c in cells
    ]
    try:
        accuracy_vs_bits(rows, path)
    except MissingPlotting as error:
        log.warning("%s", error)
        return False
    return True


if __name__ == "__main__":
    main()
