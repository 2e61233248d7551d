"""Reference-models table: FP32 accuracy of every zoo model, measured with the evaluator.

    python benchmarks/reference_models.py

Writes docs/results/reference_models.json and .md, and the table in docs/reference-models.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from zsq_plugins.reporting import (
    environment_footer,
    environment_info,
    markdown_table,
    peak_rss_mib,
    replace_generated_section,
    write_json,
    write_text_atomic,
)
from zsq_plugins.zoo.report import COLUMNS, evaluate_zoo

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = evaluate_zoo(progress=not args.no_progress)
    env = environment_info()
    record = {
        "benchmark": "reference_models",
        "environment": env,
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "results": rows,
    }
    write_json(RESULTS / "reference_models.json", record)
    table = markdown_table(rows, COLUMNS)
    notes = (
        "\nFashion-MNIST models: the full 10k test set. efficientnet_lite0: the 20 labelled "
        "ImageNet images of the foolbox wheel; its published top-1 is the authors' ImageNet "
        "validation figure, cited, not measured here.\n"
    )
    footer = environment_footer(env)
    write_text_atomic(
        RESULTS / "reference_models.md",
        "# Reference models (generated)\n\n" + table + notes + footer,
    )
    replace_generated_section(ROOT / "docs" / "reference-models.md", "accuracy", table + footer)
    print(table)


if __name__ == "__main__":
    main()
