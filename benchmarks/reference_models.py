"""Reference-models table: FP32 accuracy of every zoo model, measured with the evaluator.

    python benchmarks/reference_models.py

Writes docs/results/reference_models.json and .md, and the tables in docs/reference-models.md:
FP32 accuracy, and each trained model's recipe and training time read from its
``zsq_plugins/zoo/weights/NAME.train.json`` (what scripts/train_zoo.py recorded).
"""

from __future__ import annotations

import argparse
import json
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
from zsq_plugins.zoo.registry import WEIGHTS_DIR
from zsq_plugins.zoo.report import COLUMNS, evaluate_zoo

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


TRAINING_COLUMNS = {
    "model": "model",
    "optimizer": "optimizer",
    "lr_max": "peak lr",
    "weight_decay": "weight decay",
    "epochs": "epochs",
    "threads": "threads",
    "train_min": "training (min)",
    "test_top1": "final test top-1 (%)",
}


def training_rows() -> list[dict[str, object]]:
    """Each trained model's recipe and wall time, from its training record."""
    rows = []
    for path in sorted(WEIGHTS_DIR.glob("*.train.json")):
        record = json.loads(path.read_text())
        recipe = record["recipe"]
        rows.append(
            {
                "model": record["model"],
                "optimizer": recipe["optimizer"],
                "lr_max": f"{recipe['lr_max']:g}",
                "weight_decay": f"{recipe['weight_decay']:g}",
                "epochs": recipe["epochs"],
                "threads": recipe["threads"],
                "train_min": round(record["history"][-1]["elapsed_s"] / 60, 1),
                "test_top1": record["test_top1"],
            }
        )
    return rows


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
    training = training_rows()
    record["training"] = training
    write_json(RESULTS / "reference_models.json", record)
    table = markdown_table(rows, COLUMNS)
    training_table = markdown_table(training, TRAINING_COLUMNS)
    notes = (
        "\nFashion-MNIST models: the full 10k test set. efficientnet_lite0: the 20 labelled "
        "ImageNet images of the foolbox wheel; its published top-1 is the authors' ImageNet "
        "validation figure, cited, not measured here.\n"
    )
    footer = environment_footer(env)
    write_text_atomic(
        RESULTS / "reference_models.md",
        "# Reference models (generated)\n\n"
        + table
        + notes
        + "\n## Training\n\n"
        + training_table
        + footer,
    )
    replace_generated_section(ROOT / "docs" / "reference-models.md", "accuracy", table + footer)
    replace_generated_section(ROOT / "docs" / "reference-models.md", "training", training_table)
    print(table)


if __name__ == "__main__":
    main()
