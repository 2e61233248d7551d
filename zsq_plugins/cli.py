"""The ``zsq`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from zsq_plugins.configio import parse_key_values
from zsq_plugins.errors import ZSQError
from zsq_plugins.reporting import markdown_table

if TYPE_CHECKING:
    from zsq_plugins.compare import GridConfig


BUDGETS = ("auto", "cpu", "paper")
BUDGET_HELP = (
    "auto (default): the cpu budget, with fewer images and steps for models that cost more "
    "per image than the Fashion-MNIST zoo models; cpu; or paper (the papers' budgets)"
)
NUM_SAMPLES_HELP = "calibration images (default: 1024, fewer down to 128 for costly models)"


def _cmd_zoo(args: argparse.Namespace) -> int:
    from zsq_plugins.zoo import card, list_models

    rows = []
    for name in list_models(args.pattern):
        model_card = card(name)
        rows.append(
            {
                "name": name,
                "input": "x".join(map(str, model_card.input_shape)),
                "dataset": model_card.dataset,
                "batchnorm": "yes" if model_card.has_batchnorm else "no",
                "published_top1": model_card.published_top1,
                "description": model_card.description,
            }
        )
    print(markdown_table(rows, list(rows[0]) if rows else ["name"]), end="")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from zsq_plugins.zoo.report import COLUMNS, evaluate_zoo

    rows = evaluate_zoo(args.models or None, progress=not args.no_progress)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(markdown_table(rows, COLUMNS), end="")
    return 0 if rows else 1


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from zsq_plugins.budgets import auto_images
    from zsq_plugins.model_source import load_model
    from zsq_plugins.quantize_command import input_spec_from
    from zsq_plugins.synthesis import synthesize
    from zsq_plugins.synthesis.model_info import infer_input_shape

    overrides = parse_key_values(args.set, "--set")  # malformed options fail before any work
    if args.input_shape is not None:
        overrides["input_spec"] = input_spec_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, args.weights)
    shape = overrides["input_spec"].shape if "input_spec" in overrides else None
    data = synthesize(
        model,
        args.num_samples or auto_images(model, shape or infer_input_shape(model)),
        args.preset,
        args.seed,
        budget=args.budget,
        cache_dir=args.out,
        device=args.device,
        progress=not args.no_progress,
        **overrides,
    )
    manifest = data.manifest
    shards = manifest["shards"]
    seconds = sum(s.get("seconds", 0.0) for s in shards)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {
            "out": str(args.out),
            "images": len(data),
            "shards": len(shards),
            "generation_seconds": manifest.get("generation_seconds"),
            "batch_seconds_total": round(seconds, 3),
            "world_size": manifest.get("world_size", 1),
        }
        print(json.dumps(summary))
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from zsq_plugins.quantize_command import run_quantize

    return run_quantize(args)


def _run_grid_and_print(
    config: GridConfig,
    args: argparse.Namespace,
    plots: bool = True,
    only: dict[str, list[str]] | None = None,
    render_only: bool = False,
) -> int:
    """``zsq compare`` and ``zsq demo``: run the grid into ``args.out``, print its table."""
    import torch

    from zsq_plugins.compare import run_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    run_grid(
        config,
        args.out,
        data_dir=args.data_dir,
        progress=not args.no_progress,
        plots=plots,
        only=only,
        render_only=render_only,
    )
    print((Path(args.out) / "results.md").read_text(), end="")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from zsq_plugins.compare import GridConfig

    config = GridConfig.from_toml(args.config)
    if args.imagenet_dir is not None:
        from zsq_plugins.datasets.imagenet import ENV_VAR, imagenet_dir

        os.environ[ENV_VAR] = str(imagenet_dir(args.imagenet_dir).resolve())
    only = _parse_only(args.only)
    try:
        cells = config.select(only)
    except ValueError as error:
        raise ZSQError(f"--only: {error}") from None
    if args.dry_run:
        for cell in cells:
            print(cell.key)
        return 0
    return _run_grid_and_print(
        config, args, plots=not args.no_plots, only=only, render_only=args.render_only
    )


def _parse_only(options: Sequence[str]) -> dict[str, list[str]]:
    """``--only toolkits=fx,nncf --only specs=W4A4`` as {"toolkits": ["fx", "nncf"], ...}."""
    only: dict[str, list[str]] = {}
    for option in options:
        axis, sep, values = option.partition("=")
        names = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not axis.strip() or not names:
            raise ZSQError(
                f"--only takes AXIS=NAME[,NAME...], e.g. --only toolkits=fx,nncf; got {option!r}"
            )
        only.setdefault(axis.strip(), []).extend(names)
    return only


DEMO_MODEL = "resnet20_fmnist"


DEMO_IMAGES, DEMO_TEST_IMAGES = 256, 2000
"""The quick demo's calibration and evaluation images (``--full``: 1024 and the test set)."""


def demo_config(toolkits: Sequence[str], full: bool = False) -> GridConfig:
    """The demo: the embedded default model calibrated with noise, with zero-shot (genie)
    images and with real images, in every installed toolkit, at W4A4, where the data source
    matters (``full``: also W8A8 and W4A8, 1024 images, the whole test set)."""
    from zsq_plugins.compare import GridConfig

    return GridConfig(
        models=(DEMO_MODEL,),
        toolkits=tuple(toolkits),
        data=("noise", "genie", "real"),
        specs=("W8A8", "W4A8", "W4A4") if full else ("W4A4",),
        num_samples=1024 if full else DEMO_IMAGES,
        test_samples=None if full else DEMO_TEST_IMAGES,
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from zsq_plugins.adapter import installed_adapters

    toolkits = installed_adapters()
    config = demo_config(toolkits, full=args.full)
    print(
        f"zsq demo: {DEMO_MODEL} quantized at {', '.join(config.specs)} in "
        f"{', '.join(toolkits)}, calibrated with {config.num_samples} noise, zero-shot (genie) "
        f"and real images; results go to {args.out}/"
        + ("" if args.full else " (the full grid: zsq demo --full)")
        + "\n",
        flush=True,
    )
    return _run_grid_and_print(config, args)


def _model_options(parser: argparse.ArgumentParser) -> None:
    """The model a command works on: a zoo name or a user's factory, its weights and input."""
    parser.add_argument(
        "model",
        help="a zoo model name (see: zsq zoo), or yours: path/to/file.py:factory or "
        "package.module:factory",
    )
    parser.add_argument(
        "--weights", default=None, help="the model's state dict (safetensors, or .pt: no pickle)"
    )
    parser.add_argument(
        "--input-shape", default=None, metavar="C,H,W", help="your model's input (zoo: known)"
    )
    parser.add_argument(
        "--mean", default=None, metavar="M1,M2,M3", help="normalization outside your model"
    )
    parser.add_argument("--std", default=None, metavar="S1,S2,S3", help="(with --mean)")
    parser.add_argument(
        "--pixel-range", default=None, metavar="LOW,HIGH", help="valid pixels, e.g. 0,1"
    )


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zsq", description="Zero-shot post-training quantization for existing toolkits."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="list the reference models")
    zoo.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. '*fmnist'")
    zoo.set_defaults(run=_cmd_zoo)

    evaluate = sub.add_parser("evaluate", help="evaluate reference models in FP32")
    evaluate.add_argument("models", nargs="*", help="model names (default: all)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.add_argument("--no-progress", action="store_true", help="hide progress bars")
    evaluate.set_defaults(run=_cmd_evaluate)

    generate = sub.add_parser(
        "generate",
        help="synthesize calibration images for a zoo model (runs under torchrun too)",
        description="Synthesize calibration images into a folder (safetensors shards + JSON "
        "manifest); resumes an interrupted run. Under torchrun --nproc_per_node=N the ranks "
        "share the batches.",
    )
    _model_options(generate)
    generate.add_argument("--preset", default="genie", help="generator preset (default genie)")
    generate.add_argument("--num-samples", type=int, default=None, help=NUM_SAMPLES_HELP)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--budget", default="auto", choices=BUDGETS, help=BUDGET_HELP)
    generate.add_argument("--out", required=True, help="output folder (reused to resume)")
    generate.add_argument("--device", default=None, help="e.g. cpu, cuda (default: model's)")
    generate.add_argument("--threads", type=int, default=None, help="torch threads per process")
    generate.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a SynthesisConfig field, e.g. --set iterations=100",
    )
    generate.add_argument("--no-progress", action="store_true", help="hide progress bars")
    generate.set_defaults(run=_cmd_generate)

    quantize = sub.add_parser(
        "quantize",
        help="quantize a zoo model in one toolkit (zero-shot by default) and evaluate it",
        description="Calibrates (and optionally reconstructs) a zoo model inside a toolkit, "
        "evaluates it against FP32 and writes OUT/report.json (and an ONNX file with --onnx).",
    )
    _model_options(quantize)
    quantize.add_argument(
        "--eval-dir",
        default=None,
        help="labelled evaluation images, one folder per class (default for your model: "
        "agreement and KL to FP32 on held-out synthetic images)",
    )
    quantize.add_argument(
        "--eval-samples", type=int, default=256, help="held-out synthetic images (default 256)"
    )
    quantize.add_argument(
        "--save", default=None, metavar="DIR", help="save the toolkit's model (load_quantized)"
    )
    quantize.add_argument("--toolkit", default="fx", help="fx, pt2e, nncf, brevitas or a plugin's")
    quantize.add_argument("--spec", default="W8A8", help="e.g. W8A8, W4A4 (default W8A8)")
    quantize.add_argument(
        "--data", default="genie", help="a generator preset, or 'real' (default genie)"
    )
    quantize.add_argument("--num-samples", type=int, default=None, help=NUM_SAMPLES_HELP)
    quantize.add_argument("--reconstruct", default=None, help="e.g. genie-m, brecq, adaround")
    quantize.add_argument("--budget", default="auto", choices=BUDGETS, help=BUDGET_HELP)
    quantize.add_argument(
        "--aac", action="store_true", help="accurate activation clipping after calibration"
    )
    quantize.add_argument(
        "--abn", action="store_true", help="adaptive BN: correct layer statistics toward FP32"
    )
    quantize.add_argument("--seed", type=int, default=0)
    quantize.add_argument("--out", required=True, help="folder for data, report and ONNX")
    quantize.add_argument(
        "--onnx",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="also export QDQ ONNX (to FILE, default OUT/<model>-<toolkit>-<spec>.onnx)",
    )
    quantize.add_argument(
        "--toolkit-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the toolkit's own call (VALUE as JSON, else a string), e.g. "
        "--toolkit-option target_device=cpu or "
        '--toolkit-option \'ignored_scope={"types": ["linear"]}\' for nncf',
    )
    _run_options(quantize)
    quantize.set_defaults(run=_cmd_quantize)

    compare = sub.add_parser(
        "compare",
        help="run a comparison grid from a TOML config (resumable)",
        description="Runs every cell (model x toolkit x data x spec x reconstruction) of a "
        "TOML config into OUT: one JSON per finished cell (an interrupted run resumes), then "
        "results.json, results.md and plots. See docs/compare.md for the format.",
    )
    compare.add_argument("config", help="a TOML file with a [grid] table")
    compare.add_argument("--out", required=True, help="results folder (reused to resume)")
    compare.add_argument("--dry-run", action="store_true", help="list the cells and stop")
    compare.add_argument(
        "--render-only",
        action="store_true",
        help="write the tables and plots from the finished cells; run nothing",
    )
    compare.add_argument(
        "--data-dir", default=None, help="where synthetic sets are cached (default OUT/data)"
    )
    compare.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    compare.add_argument(
        "--imagenet-dir",
        default=None,
        help="labelled ImageNet images (<wnid>_<name>.JPEG) for a grid with imagenet_folder = "
        "true (default $ZSQ_IMAGENET_DIR)",
    )
    compare.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="AXIS=NAMES",
        help="run part of the grid, e.g. --only toolkits=nncf --only specs=W4A4,W3A3 "
        "(repeatable; processes with different parts can share OUT)",
    )
    _run_options(compare)
    compare.set_defaults(run=_cmd_compare)

    demo = sub.add_parser(
        "demo",
        help="zero-shot vs noise vs real calibration of the embedded default in every toolkit",
        description=f"Quantizes {DEMO_MODEL} in every installed toolkit at W4A4, calibrated "
        "with noise, with zero-shot (genie) images and with real images, and prints the "
        "comparison table, with how much of the noise-to-real gap zero-shot data recover; "
        "resumable like zsq compare. --full: also W8A8 and W4A8, 1024 images, the whole "
        "test set.",
    )
    demo.add_argument("--out", default="zsq-demo", help="results folder (default zsq-demo)")
    demo.add_argument(
        "--full",
        action="store_true",
        help="the full grid: three widths, 1024 images, all test images",
    )
    demo.add_argument(
        "--data-dir", default=None, help="where synthetic sets are cached (default OUT/data)"
    )
    _run_options(demo)
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        return args.run(args)
    except ZSQError as error:
        print(f"zsq: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
