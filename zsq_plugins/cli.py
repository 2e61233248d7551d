"""The ``zsq`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from zsq_plugins.errors import ZSQError
from zsq_plugins.reporting import markdown_table


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


def _parse_overrides(pairs: Sequence[str]) -> dict[str, object]:
    """``["iterations=50", "flip=true"]`` -> ``{"iterations": 50, "flip": True}`` (JSON values;
    anything that is not valid JSON is kept as a string)."""
    overrides: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"zsq: error: --set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from zsq_plugins.synthesis import synthesize
    from zsq_plugins.zoo import load

    overrides = _parse_overrides(args.set)  # malformed options fail before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    data = synthesize(
        load(args.model),
        args.num_samples,
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


def _cmd_demo(args: argparse.Namespace) -> int:
    print("zsq demo: FP32 reference models of the zoo on their evaluation data\n")
    return _cmd_evaluate(argparse.Namespace(models=None, no_progress=args.no_progress, json=False))


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
    generate.add_argument("model", help="a zoo model name (see: zsq zoo)")
    generate.add_argument("--preset", default="genie", help="generator preset (default genie)")
    generate.add_argument("--num-samples", type=int, default=1024)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--budget", default="cpu", choices=["cpu", "paper"])
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

    demo = sub.add_parser("demo", help="run the demo on the embedded default")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
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
