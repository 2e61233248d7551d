"""Generation throughput: 1 vs 2 processes under torchrun on the CPU, and a GPU when present.

    python benchmarks/throughput.py
    python benchmarks/throughput.py --model resnet20_fmnist --preset genie --num-samples 256

Each configuration runs ``zsq generate`` (under ``torchrun --standalone`` for N > 1) into a
fresh folder, one torch thread per process, and takes the median images/s of --repeats runs.
Writes docs/results/throughput.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from zsq_plugins.reporting import (
    environment_footer,
    environment_info,
    markdown_table,
    write_json,
    write_text_atomic,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


def run_once(args: argparse.Namespace, processes: int, device: str) -> float:
    """Images per second of one ``zsq generate`` run with ``processes`` ranks."""
    with tempfile.TemporaryDirectory() as folder:
        generate = [
            "-m",
            "zsq_plugins",
            "generate",
            args.model,
            "--preset",
            args.preset,
            "--num-samples",
            str(args.num_samples),
            "--out",
            folder,
            "--threads",
            "1",
            "--device",
            device,
            "--no-progress",
            "--set",
            f"iterations={args.iterations}",
            "--set",
            f"batch_size={args.batch_size}",
        ]
        if processes == 1:
            command = [sys.executable, *generate]
        else:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={processes}",
                *generate,
            ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env, capture_output=True, text=True)
        return args.num_samples / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20_fmnist")
    parser.add_argument("--preset", default="genie")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in every worker, so that the recorded environment says so
    configurations = [("cpu", 1), ("cpu", 2)]
    if torch.cuda.is_available():
        configurations.append(("cuda", 1))
    rows: list[dict[str, Any]] = []
    for device, processes in configurations:
        rates = [run_once(args, processes, device) for _ in range(args.repeats)]
        rows.append(
            {
                "device": device,
                "processes": processes,
                "threads_per_process": 1,
                "images_per_s": statistics.median(rates),
                "runs": rates,
            }
        )
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup"] = row["images_per_s"] / base
    record = {
        "benchmark": "throughput",
        "model": args.model,
        "preset": args.preset,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "iterations": args.iterations,
        "environment": environment_info(),
        "results": rows,
    }
    write_json(RESULTS / "throughput.json", record)
    text = (
        "# Generation throughput (generated)\n\n"
        f"`zsq generate {args.model} --preset {args.preset}`: {args.num_samples} images, batch "
        f"{args.batch_size}, {args.iterations} steps per batch; wall time of the whole command "
        f"(start-up included), median of {args.repeats} runs; one torch thread per process.\n\n"
        + markdown_table(
            rows,
            {
                "device": "device",
                "processes": "processes",
                "images_per_s": "images/s",
                "speedup": "vs 1 process",
            },
        )
        + environment_footer(record["environment"])
    )
    write_text_atomic(RESULTS / "throughput.md", text)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
