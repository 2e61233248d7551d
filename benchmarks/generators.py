"""Generators benchmark: cost, BN-statistics fit, range realism and plain-calibration accuracy.

    python benchmarks/generators.py                      # full run (both models, all presets)
    python benchmarks/generators.py --paper-budget       # add genie's paper budget on 256 images
    python benchmarks/generators.py --models resnet20_fmnist --num-samples 256   # quicker

For each model and data source (noise, every BN preset, and 1024 real training images), it
quantizes with the reference simulator (zsq_plugins.quant.reference: BN folded, per-channel
weights, per-tensor activations, first/last layer 8-bit) at W8A8, W4A8, W4A4 and W3A3 with
min-max and with MSE-optimal activation ranges, and evaluates on the 10k test images.
Generated sets are cached (and resumed) under --cache-dir.

Each model's results go to docs/results/generators/<model>.json (so models can be run
separately and re-run alone); docs/results/generators.md is rendered from every JSON there,
with a PNG grid of samples per model (docs/results/generators_samples_<model>.png).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from setting import literature_spec
from synthetic_cache import cached_synthesize

from zsq_plugins import evaluate, zoo
from zsq_plugins.datasets import calibration_subset, fashion_mnist
from zsq_plugins.quant.reference import activation_ranges, reference_quantize
from zsq_plugins.reporting import (
    environment_footer,
    environment_info,
    markdown_table,
    peak_rss_mib,
    save_image_grid,
    write_json,
    write_text_atomic,
)
from zsq_plugins.synthesis.diagnostics import bn_statistics_loss

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
SPECS = ("W8A8", "W4A8", "W4A4", "W3A3")
RANGE_METHODS = ("minmax", "mse")
UPDATE_KEYS = ("environment", "wall_s", "peak_rss_mib")
log = logging.getLogger("benchmarks.generators")


def range_realism(
    ranges: dict[str, tuple[float, float]], real: dict[str, tuple[float, float]]
) -> dict[str, Any]:
    """Per layer, log2 of (calibrated range width / real-data range width)."""
    logs = {
        name: math.log2(max(high - low, 1e-12) / max(real[name][1] - real[name][0], 1e-12))
        for name, (low, high) in ranges.items()
    }
    return {
        "per_layer_log2_ratio": logs,
        "mean_abs_log2_ratio": statistics.fmean(abs(v) for v in logs.values()),
        "median_ratio": 2 ** statistics.median(logs.values()),
        "max_ratio": 2 ** max(logs.values()),
    }


def generate(model_name: str, preset: str, args: argparse.Namespace, budget: str, n: int):
    started = time.perf_counter()
    data = cached_synthesize(
        args.cache_dir, model_name, preset, n, args.seed, budget, not args.no_progress
    )
    shards = data.manifest["shards"]
    seconds = sum(s.get("seconds", 0.0) for s in shards)
    losses = [s["final_loss"] for s in shards if s.get("final_loss") is not None]
    return data.images, {
        "preset": preset,
        "budget": budget,
        "num_samples": n,
        "generation_s": round(seconds, 2),
        "images_per_s": round(n / seconds, 2) if seconds > 0 else None,
        "final_loss": statistics.fmean(losses) if losses else None,
        "wall_s_this_run": round(time.perf_counter() - started, 2),
        "config": data.manifest["identity"]["config"],
    }


def accuracy_grid(model_name: str, images: torch.Tensor, test_set, progress: bool):
    model = zoo.load(model_name)
    cells = {}
    for label in SPECS:
        for method in RANGE_METHODS:
            quantized = reference_quantize(model, literature_spec(label), images, method)
            result = evaluate(quantized, test_set, progress=progress, description=label)
            cells[f"{label}/{method}"] = result.top1
    return cells


def run_model(
    model_name: str, args: argparse.Namespace, test_set, stored: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A model's rows: real data and every preset of ``args.presets``. With ``stored`` (a
    model's earlier result), only those presets' rows are measured and replace theirs; the
    other rows, and their rows of the picture, are kept."""
    model = zoo.load(model_name)
    real = calibration_subset(args.num_samples, seed=args.seed)
    real_ranges = activation_ranges(model, real)
    sources: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    if stored is None:  # an update keeps the stored real-data row
        sources["real"] = real
        rows.append({"source": "real", "bn_loss": bn_statistics_loss(model, real)})
    for preset in args.presets:
        log.info("%s: generating %d images with %s", model_name, args.num_samples, preset)
        images, info = generate(model_name, preset, args, args.budget, args.num_samples)
        sources[preset] = images
        info["source"] = preset
        info["bn_loss"] = bn_statistics_loss(model, images)
        rows.append(info)
    for row in rows:
        images = sources[row["source"]]
        realism = range_realism(activation_ranges(model, images), real_ranges)
        row["range_realism"] = realism
        row["range_mean_abs_log2"] = realism["mean_abs_log2_ratio"]
        row["range_median_ratio"] = realism["median_ratio"]
        row["range_max_ratio"] = realism["max_ratio"]
        row["accuracy"] = accuracy_grid(model_name, images, test_set, not args.no_progress)
        log.info("%s %s: %s", model_name, row["source"], row["accuracy"])
    picture = RESULTS / f"generators_samples_{model_name}.png"
    if stored is not None:
        order = [row["source"] for row in stored["rows"]]
        for name, images in sources.items():
            replace_picture_row(picture, order.index(name), images[:8])
        mine = {row["source"]: row for row in rows}
        rows = [mine.get(row["source"], row) for row in stored["rows"]]
    else:
        grid = torch.cat([sources[name][:8] for name in sources])
        save_image_grid(grid, picture, columns=PICTURE_COLUMNS, scale=PICTURE_SCALE)
    result = {"model": model_name, "fp32_top1": zoo.card(model_name).published_top1, "rows": rows}
    if args.paper_budget and "genie" in args.presets:
        result["budget_comparison"] = budget_comparison(model_name, args, test_set)
    elif stored is not None and "budget_comparison" in stored:
        result["budget_comparison"] = stored["budget_comparison"]
    return result


PICTURE_COLUMNS, PICTURE_SCALE = 8, 2
"""The sample picture: a row of PICTURE_COLUMNS images per source, each pixel PICTURE_SCALE
times (save_image_grid's layout: one-pixel white borders)."""


def replace_picture_row(path: Path, index: int, images: torch.Tensor) -> None:
    """Draws ``images`` over row ``index`` of the picture at ``path`` (the rows of the sources
    that an update leaves alone stay as they were)."""
    from PIL import Image

    if not path.is_file():
        raise SystemExit(f"{path} is missing: run the benchmark without --update first")
    strip_path = path.with_name(f".{path.name}.row.png")
    save_image_grid(images, strip_path, columns=PICTURE_COLUMNS, scale=PICTURE_SCALE)
    with Image.open(path) as stored, Image.open(strip_path) as strip:
        picture = stored.copy()
        if strip.width != picture.width or strip.mode != picture.mode:
            raise SystemExit(f"{path} has another layout than {PICTURE_COLUMNS} columns")
        picture.paste(strip, (0, index * (images.shape[2] + 1) * PICTURE_SCALE))
    strip_path.unlink()
    tmp = path.with_name(f".{path.name}.tmp.png")
    picture.save(tmp)
    tmp.replace(path)


def budget_comparison(model_name: str, args: argparse.Namespace, test_set) -> list[dict]:
    """Genie at the CPU and the paper budget on the same 256-image subset."""
    rows = []
    for budget in ("cpu", "paper"):
        images, info = generate(model_name, "genie", args, budget, args.paper_subset)
        cells = accuracy_grid(model_name, images, test_set, not args.no_progress)
        rows.append({**info, "accuracy": cells})
    return rows


def render(record: dict[str, Any]) -> str:
    out = ["# Generators benchmark (generated)\n"]
    out.append(
        f"{record['num_samples']} images per source, seed {record['seed']}, `{record['budget']}` "
        "budget; reference simulator (BN folded, per-channel symmetric weights, per-tensor "
        "asymmetric activations, first/last layer 8-bit); top-1 on the 10k test set.\n"
    )
    for model in record["models"]:
        name = model["model"]
        out.append(f"\n## {name} (FP32 {model['fp32_top1']:.2f}%)\n")
        out.append("\n### Cost and fit\n\n")
        out.append(
            markdown_table(
                model["rows"],
                {
                    "source": "source",
                    "generation_s": "generation (s)",
                    "images_per_s": "images/s",
                    "final_loss": "final objective",
                    "bn_loss": "BN-statistics loss",
                    "range_median_ratio": "median range ratio",
                    "range_max_ratio": "max range ratio",
                    "range_mean_abs_log2": "mean abs log2 range ratio",
                },
                digits=4,
            )
        )
        for method in RANGE_METHODS:
            out.append(f"\n### Top-1 (%) with {method} activation ranges\n\n")
            rows = [
                {"source": r["source"], **{s: r["accuracy"][f"{s}/{method}"] for s in SPECS}}
                for r in model["rows"]
            ]
            out.append(markdown_table(rows, ["source", *SPECS]))
        if "budget_comparison" in model:
            out.append("\n### genie: CPU budget vs paper budget (256 images)\n\n")
            rows = [
                {
                    "budget": r["budget"],
                    "iterations": r["config"]["iterations"],
                    "generation_s": r["generation_s"],
                    **{k: v for k, v in r["accuracy"].items()},
                }
                for r in model["budget_comparison"]
            ]
            grid = [f"{spec}/{method}" for method in RANGE_METHODS for spec in SPECS]
            out.append(markdown_table(rows, ["budget", "iterations", "generation_s", *grid]))
        out.append(
            f"\n![samples](generators_samples_{name}.png)\n\nRows of the picture: "
            f"{', '.join(r['source'] for r in model['rows'])}.\n"
        )
    out.append(
        "\nRange ratio: width of a layer's min-max input range on the source divided by its "
        "width on the real images (1 is perfect); BN-statistics loss: squared error of batch "
        "statistics against the BN running statistics, summed over layers, batches of 128.\n"
    )
    if record.get("updates"):
        done = "; ".join(f"{', '.join(u['presets'])} on {u['model']}" for u in record["updates"])
        out.append(
            f"\nRows measured again since the first run (`--update`): {done}; each row's "
            "synthesis configuration is in its JSON. An updated row's generation time is its "
            "cached set's, as that set was made (that run's code, threads and machine load): "
            "compare it with the other rows with care.\n"
        )
    out.append(environment_footer(record["environment"]))
    return "".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20_fmnist", "mobilenetv2_fmnist"])
    parser.add_argument("--presets", nargs="+", default=["noise", "zeroq", "dsg", "genie"])
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--budget", default="cpu", choices=["cpu", "paper"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paper-budget", action="store_true")
    parser.add_argument("--paper-subset", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "synthetic")
    parser.add_argument("--output", default="generators", help="results sub-folder name")
    parser.add_argument("--render-only", action="store_true", help="re-render the Markdown")
    parser.add_argument(
        "--update",
        action="store_true",
        help="measure only --presets again, replacing their rows (and picture rows) in each "
        "model's stored results; the real-data row and the other presets keep theirs",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.render_only:
        write_text_atomic(RESULTS / f"{args.output}.md", render_all(RESULTS / args.output))
        return
    started = time.perf_counter()
    test_set = fashion_mnist("test")
    for name in args.models:
        path = RESULTS / args.output / f"{name}.json"
        previous = json.loads(path.read_text()) if args.update and path.is_file() else None
        if args.update and previous is None:
            raise SystemExit(f"--update: {path} does not exist; run without --update first")
        if previous is not None:
            same = {k: previous[k] for k in ("num_samples", "budget", "seed")}
            if same != {"num_samples": args.num_samples, "budget": args.budget, "seed": args.seed}:
                raise SystemExit(f"--update: {path} was made with {same}; give the same")
            known = [row["source"] for row in previous["models"][0]["rows"]]
            if set(args.presets) - set(known):
                raise SystemExit(
                    f"--update replaces rows: {path} has {known}; a new preset needs a full run"
                )
        model = run_model(name, args, test_set, previous["models"][0] if previous else None)
        record = {
            "benchmark": "generators",
            "num_samples": args.num_samples,
            "budget": args.budget,
            "seed": args.seed,
            "environment": environment_info(),
            "wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "models": [model],
        }
        if previous is not None:  # the first run's record, and what each update measured again
            update = {"presets": list(args.presets), **{k: record[k] for k in UPDATE_KEYS}}
            record = {**previous, "models": [model]}
            record["updates"] = [*previous.get("updates", []), update]
        write_json(path, record)
    text = render_all(RESULTS / args.output)
    write_text_atomic(RESULTS / f"{args.output}.md", text)
    print(text)


def render_all(folder: Path) -> str:
    """The Markdown of every model's JSON in ``folder``."""
    records = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    if not records:
        raise SystemExit(f"no results in {folder}")
    merged = {**records[0], "models": [m for r in records for m in r["models"]]}
    merged["updates"] = [
        {**update, "model": r["models"][0]["model"]}
        for r in records
        for update in r.get("updates", [])
    ]
    return render(merged)


if __name__ == "__main__":
    main()
