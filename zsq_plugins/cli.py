"""The ``zsq`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
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
