"""Toolkits benchmark: the same data and spec through every installed toolkit adapter.

    python benchmarks/toolkits.py
    python benchmarks/toolkits.py --models resnet20_fmnist --specs W8A8 --sources real
    python benchmarks/toolkits.py --sources genie    # adds the genie cells to the tables

For resnet20_fmnist and mobilenetv2_fmnist at W8A8, W4A8 and W4A4, each toolkit is calibrated
(no reconstruction) with 1024 real training images, with Gaussian noise, and with the best
zero-shot preset (genie; any preset can be given to --sources); top-1 on the 10k test set,
time of each step, and the speed of the fx int8 model against FP32 (timed on runs that include
real data). Synthetic sets are cached under --cache-dir.

Each model's results go to docs/results/toolkits/<model>.json (models can run separately);
docs/results/toolkits.md is rendered from every JSON there.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from setting import literature_spec
from synthetic_cache import cached_synthesize

from zsq_plugins import QuantSpec, apply, evaluate, zoo
from zsq_plugins.adapter import get_adapter, installed_adapters
from zsq_plugins.datasets import calibration_subset, fashion_mnist
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
log = logging.getLogger("benchmarks.toolkits")


def calibration_images(model_name: str, source: str, args: argparse.Namespace) -> torch.Tensor:
    if source == "real":
        return calibration_subset(args.num_samples, seed=args.seed)
    data = cached_synthesize(
        args.cache_dir, model_name, source, args.num_samples, args.seed, "cpu", not args.no_progress
    )
    return data.images


def median_seconds(function, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def int8_speed(model_name: str, images: torch.Tensor) -> dict[str, Any]:
    """Median batch-256 inference time of the FP32 model and of fx's converted int8 model."""
    model = zoo.load(model_name)
    _, report = apply(model, "fx", QuantSpec.parse("W8A8"), data=images)
    int8 = get_adapter("fx").convert(report.quantized)
    batch = images[:256]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32_s = median_seconds(lambda: model(batch))
        int8_s = median_seconds(lambda: int8(batch))
        test = fashion_mnist("test")
        top1 = evaluate(int8, test, progress=False).top1
    return {
        "model": model_name,
        "batch": len(batch),
        "fp32_ms": fp32_s * 1e3,
        "int8_ms": int8_s * 1e3,
        "speedup": fp32_s / int8_s,
        "int8_top1": top1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20_fmnist", "mobilenetv2_fmnist"])
    parser.add_argument("--toolkits", nargs="+", default=None, help="default: all installed")
    parser.add_argument("--specs", nargs="+", default=["W8A8", "W4A8", "W4A4"])
    # genie: the best zero-shot preset of the generators benchmark (range realism at W3A3).
    parser.add_argument("--sources", nargs="+", default=["real", "noise", "genie"])
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "synthetic")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    toolkits = args.toolkits or installed_adapters()
    test_set = fashion_mnist("test")
    rows, speed = [], []
    started = time.perf_counter()
    for model_name in args.models:
        fp32 = zoo.card(model_name).published_top1
        for source in args.sources:
            images = calibration_images(model_name, source, args)
            for label in args.specs:
                for toolkit in toolkits:
                    spec = literature_spec(label)
                    quantized, report = apply(zoo.load(model_name), toolkit, spec, data=images)
                    t0 = time.perf_counter()
                    top1 = evaluate(quantized, test_set, progress=not args.no_progress).top1
                    rows.append(
                        {
                            "model": model_name,
                            "source": source,
                            "spec": label,
                            "toolkit": toolkit,
                            "top1": top1,
                            "fp32_top1": fp32,
                            "drop": fp32 - top1,
                            "quantize_s": report.timings_s["quantize_and_calibrate"],
                            "evaluate_s": round(time.perf_counter() - t0, 2),
                        }
                    )
                    log.info("%s", rows[-1])
        if "fx" in toolkits and "real" in args.sources:  # timed on a quiet run only
            speed.append(
                int8_speed(model_name, calibration_subset(args.num_samples, seed=args.seed))
            )
    env = environment_info()
    for model_name in args.models:
        path = RESULTS / "toolkits" / f"{model_name}.json"
        record = {
            "benchmark": "toolkits",
            "num_samples": args.num_samples,
            "seed": args.seed,
            "environment": env,
            "wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "results": [r for r in rows if r["model"] == model_name],
            "int8_speed": [r for r in speed if r["model"] == model_name],
        }
        write_json(path, merged_with_previous(record, path))
    text = render_all()
    write_text_atomic(RESULTS / "toolkits.md", text)
    print(text)


def merged_with_previous(record: dict[str, Any], path: Path) -> dict[str, Any]:
    """``record`` plus the cells of an earlier run at ``path`` that this run did not redo.

    A run over some sources (e.g. ``--sources genie``) adds its cells to the model's table
    instead of replacing it; each kept cell carries the environment of the run that made it.
    """
    if not path.exists():
        return record
    previous = json.loads(path.read_text())
    if (previous["num_samples"], previous["seed"]) != (record["num_samples"], record["seed"]):
        return record  # a different protocol: start the table afresh
    key = ("source", "spec", "toolkit")
    redone = {tuple(r[k] for k in key) for r in record["results"]}
    kept = [
        {"environment": previous["environment"], **r} if "environment" not in r else r
        for r in previous["results"]
        if tuple(r[k] for k in key) not in redone
    ]
    return {
        **record,
        "results": kept + record["results"],
        "int8_speed": record["int8_speed"] or previous["int8_speed"],
    }


def render_all() -> str:
    records = [json.loads(p.read_text()) for p in sorted((RESULTS / "toolkits").glob("*.json"))]
    merged = {
        **records[0],
        "results": [r for record in records for r in record["results"]],
        "int8_speed": [r for record in records for r in record["int8_speed"]],
    }
    return render(merged)


def render(record: dict[str, Any]) -> str:
    out = [
        "# Toolkits benchmark (generated)\n\n",
        f"Calibration only (no reconstruction), {record['num_samples']} images, seed "
        f"{record['seed']}; top-1 (%) on the 10k Fashion-MNIST test set.\n",
    ]
    results = record["results"]
    toolkits = sorted({r["toolkit"] for r in results})
    for model in dict.fromkeys(r["model"] for r in results):
        fp32 = next(r["fp32_top1"] for r in results if r["model"] == model)
        out.append(f"\n## {model} (FP32 {fp32:.2f}%)\n\n")
        table = []
        for source in dict.fromkeys(r["source"] for r in results if r["model"] == model):
            for spec in dict.fromkeys(r["spec"] for r in results if r["model"] == model):
                cells = {
                    r["toolkit"]: r["top1"]
                    for r in results
                    if r["model"] == model and r["source"] == source and r["spec"] == spec
                }
                values = list(cells.values())
                table.append(
                    {
                        "source": source,
                        "spec": spec,
                        **cells,
                        "spread": max(values) - min(values) if values else None,
                    }
                )
        out.append(markdown_table(table, ["source", "spec", *toolkits, "spread"]))
        times = [
            {
                "toolkit": t,
                "median quantize+calibrate (s)": statistics.median(
                    r["quantize_s"] for r in results if r["model"] == model and r["toolkit"] == t
                ),
            }
            for t in toolkits
        ]
        out.append("\n" + markdown_table(times, list(times[0])))
    if record["int8_speed"]:
        out.append("\n## fx: real int8 kernels (W8A8, convert_fx) vs FP32\n\n")
        out.append(
            markdown_table(
                record["int8_speed"],
                {
                    "model": "model",
                    "batch": "batch",
                    "fp32_ms": "FP32 (ms)",
                    "int8_ms": "int8 (ms)",
                    "speedup": "speed-up",
                    "int8_top1": "int8 top-1 (%)",
                },
            )
        )
    out.append(environment_footer(record["environment"]))
    return "".join(out)


if __name__ == "__main__":
    main()
