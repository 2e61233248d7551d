"""The README's main command, timed: ``zsq demo`` as a user first runs it.

    python benchmarks/demo.py                # a few minutes; leave the machine idle
    python benchmarks/demo.py --repeats 3    # the median of three runs

Each run is ``zsq demo`` in a subprocess, into a new empty folder (so the zero-shot images are
generated, as on a fresh clone, not read from a cache), with torch's default threads (2 on the
2-core machines the target is set for). It records the wall time of the whole command
(start-up included), the peak RSS of the process, and the share of the machine's CPU time that
other processes used meanwhile (from /proc/stat): other work inflates the time, and that share
says how much there was.
Writes docs/results/demo.json and docs/results/demo.md, with the demo's own table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from zsq_plugins.reporting import environment_info, markdown_table, write_json, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DEMO_MINUTES = 5.0
"""The target: ``zsq demo`` within 5 minutes on 2 cores (``zsq demo --full`` has none)."""


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat, idle and iowait
    left out)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(threads: int | None) -> dict[str, Any]:
    """One ``zsq demo`` from an empty folder: time, memory, CPU others used, table."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "demo"
        command = [sys.executable, "-m", "zsq_plugins", "demo", "--out", str(out), "--no-progress"]
        if threads:
            command += ["--threads", str(threads)]
        busy_before, own_before = _busy_cpu_seconds(), _children_cpu_seconds()
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        own = _children_cpu_seconds() - own_before
        others = max(0.0, _busy_cpu_seconds() - busy_before - own)
        # ru_maxrss of the children waited for so far: the largest demo process (KiB on Linux)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        return {
            "seconds": round(seconds, 1),
            "minutes": seconds / 60,
            "peak_rss_mib": round(peak, 1),
            "demo_cpu_s": round(own, 1),
            "other_cpu_share": round(others / (seconds * (os.cpu_count() or 1)), 3),
            "table": (out / "results.md").read_text(),
            "results": json.loads((out / "results.json").read_text()),
        }


def _demoted(markdown: str) -> str:
    """The demo's own page, its headings one level down to sit under this page's."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.split("\n"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's own")
    args = parser.parse_args()
    runs = [run_once(args.threads) for _ in range(args.repeats)]
    median = statistics.median(r["minutes"] for r in runs)
    record = {
        "benchmark": "demo",
        "command": "zsq demo",
        "threads": args.threads or torch.get_num_threads(),
        "target_minutes": DEMO_MINUTES,
        "median_minutes": median,
        "met": median <= DEMO_MINUTES,
        "environment": environment_info(),
        "runs": [{k: v for k, v in r.items() if k != "table"} for r in runs],
    }
    write_json(RESULTS / "demo.json", record)
    rows = [
        {
            "run": i + 1,
            "minutes": r["minutes"],
            "peak_rss_mib": r["peak_rss_mib"],
            "other_cpu_share": r["other_cpu_share"],
        }
        for i, r in enumerate(runs)
    ]
    text = (
        "# `zsq demo`, timed (generated)\n\n"
        "The README's main command from an empty folder, as on a fresh clone: the zero-shot "
        f"images are generated, not reused. {record['threads']} torch threads; the wall time "
        "of the whole command, start-up included; `other_cpu_share` is the part of the "
        "machine's CPU time that other processes used meanwhile (0: the demo ran alone).\n\n"
        f"Median: **{median:.1f} min** (target {DEMO_MINUTES:.0f} min: "
        f"{'met' if record['met'] else 'missed'}).\n\n"
        + markdown_table(rows, list(rows[0]), digits=1)
        + "\n## The demo's table (last run)\n\n"
        + _demoted(runs[-1]["table"].split("\n", 1)[1].lstrip("\n"))
    )
    write_text_atomic(RESULTS / "demo.md", text)
    print(f"zsq demo: median {median:.1f} min over {len(runs)} run(s)")


if __name__ == "__main__":
    main()
