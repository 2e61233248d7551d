r"""Presets against their papers: the `dsg` preset's deviations from DSG, measured.

    python benchmarks/preset_ablation.py                    # every variant, 3 seeds (hours)
    python benchmarks/preset_ablation.py --render-only      # the page from finished grids

Two choices of the `dsg` preset against DSG's public code (docs/synthesis.md): where the slack
margin is taken off (``slack_per_channel``: each channel's deviation, as DSG's code does and
the preset does since this ablation measured it, or the distance over all channels, the
preset's choice before), and the decorrelation of the samples' features that the preset adds
(``decorrelation_weight``). Each variant below makes its own synthetic sets, with seeds 0, 1
and 2, for resnet20_fmnist and mobilenetv2_fmnist; each set calibrates fx at W4A4 and W2A4
(the literature's full 8-bit first and last layers), evaluated on the whole Fashion-MNIST
test set. Every (variant, seed) is a ``zsq compare`` grid under docs/results/ablation/dsg/,
resumable cell by cell; the page gives each variant's mean top-1 over the seeds and its
spread (max - min). Writes docs/results/ablation/dsg.json and docs/results/ablation/dsg.md.

Cost, as measured (each set's manifest records its batches' seconds): with two runs side by
side at ``--threads 1`` on 2 cores, a 1,024-image set (8 batches of 128, 200 steps each) took
11 to 18 minutes for resnet20_fmnist and 27 to 45 for mobilenetv2_fmnist, so the whole
ablation (4 variants x 3 seeds x 2 models) is about 5 hours of wall time that way. It resumes
where it stopped (batch by batch, cell by cell), and ``--variants``/``--seeds``/``--models``
run a part, e.g. two halves side by side:

    python benchmarks/preset_ablation.py --threads 1 --variants preset norm-margin
    python benchmarks/preset_ablation.py --threads 1 \
        --variants norm-margin-no-decorrelation dsg-code
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from zsq_plugins.compare import GridConfig, run_grid
from zsq_plugins.reporting import (
    environment_footer,
    environment_info,
    markdown_table,
    write_json,
    write_text_atomic,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "ablation"
DATA_DIR = ROOT / ".cache" / "synthetic"
PRESET = "dsg"
MODELS = ("resnet20_fmnist", "mobilenetv2_fmnist")
SPECS = ("W4A4", "W2A4")
TOOLKIT = "fx"
SEEDS = (0, 1, 2)

VARIANTS: dict[str, dict[str, Any]] = {
    "preset": {},
    "norm-margin": {"slack_per_channel": False},
    "norm-margin-no-decorrelation": {"slack_per_channel": False, "decorrelation_weight": 0.0},
    "dsg-code": {"decorrelation_weight": 0.0},
}
"""Variant name -> SynthesisConfig overrides of the preset. ``dsg-code`` is DSG's objective as
its public code has it (per-channel slack, no decorrelation), with the preset's margins."""
DESCRIPTIONS = {
    "preset": "the `dsg` preset: a margin on each channel's deviation (DSG's code), decorrelation",
    "norm-margin": "one margin on the norm over channels (the preset before this ablation), "
    "decorrelation",
    "norm-margin-no-decorrelation": "one margin on the norm over channels, no decorrelation",
    "dsg-code": "a margin on each channel's deviation, no decorrelation (DSG's code)",
}
log = logging.getLogger("benchmarks.preset_ablation")


def grid_config(
    variant: str, seed: int, models: tuple[str, ...], specs: tuple[str, ...], **fields: Any
) -> GridConfig:
    return GridConfig(
        models=models,
        toolkits=(TOOLKIT,),
        data=(PRESET,),
        specs=specs,
        seed=seed,
        synthesis=dict(VARIANTS[variant]),
        quant={"overflow_fix": False},
        **fields,
    )


def grid_folder(results: Path, variant: str, seed: int) -> Path:
    return results / PRESET / variant / f"seed{seed}"


def collect(results: Path) -> list[dict[str, Any]]:
    """Every finished cell of every (variant, seed) grid under ``results``."""
    rows = []
    for variant in VARIANTS:
        for path in sorted((results / PRESET / variant).glob("seed*/results.json")):
            record = json.loads(path.read_text())
            seed = record["config"]["seed"]
            for cell in record["cells"]:
                if cell.get("refused"):
                    continue
                rows.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "num_samples": record["config"]["num_samples"],
                        **cell,
                    }
                )
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, spec, variant): mean top-1 and agreement over the seeds, and the spread."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["spec"], row["variant"]), []).append(row)
    order = {name: i for i, name in enumerate(VARIANTS)}
    summary = []
    for (model, spec, variant), cells in sorted(
        groups.items(), key=lambda item: (item[0][0], item[0][1], order[item[0][2]])
    ):
        top1 = [c["top1"] for c in cells]
        summary.append(
            {
                "model": model,
                "spec": spec,
                "variant": variant,
                "seeds": len(cells),
                "top1_mean": round(statistics.fmean(top1), 2),
                "top1_spread": round(max(top1) - min(top1), 2),
                "agreement_mean": round(statistics.fmean(c["agreement"] for c in cells), 2),
                "fp32_top1": cells[0].get("fp32_top1"),
                "images": cells[0]["num_samples"],
                "test_images": cells[0].get("num_test"),
            }
        )
    return summary


EFFECTS = {
    "per-channel margin, with decorrelation": ("preset", "norm-margin"),
    "per-channel margin, without": ("dsg-code", "norm-margin-no-decorrelation"),
    "decorrelation, per-channel margin (preset against DSG's code)": ("preset", "dsg-code"),
    "decorrelation, norm margin": ("norm-margin", "norm-margin-no-decorrelation"),
}
"""Effect name -> (variant with the preset's choice, variant without it): each choice measured
with the other held both ways."""


def effects(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, spec) with every variant measured: each choice's effect on mean top-1
    (points; positive: the preset's choice is better), the largest seed spread among the variants,
    the scale below which an effect is noise; then the mean over (model, spec)."""
    by_setting: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in summary:
        by_setting.setdefault((row["model"], row["spec"]), {})[row["variant"]] = row
    table = []
    for (model, spec), variants in by_setting.items():
        if set(variants) != set(VARIANTS):
            continue
        mean = {name: row["top1_mean"] for name, row in variants.items()}
        entry: dict[str, Any] = {"model": model, "spec": spec}
        entry.update({name: mean[ours] - mean[theirs] for name, (ours, theirs) in EFFECTS.items()})
        entry["largest seed spread"] = max(row["top1_spread"] for row in variants.values())
        table.append(entry)
    if table:
        columns = [*EFFECTS, "largest seed spread"]
        average = {c: statistics.fmean(row[c] for row in table) for c in columns}
        table.append({"model": "mean", "spec": "", **average})
    return [
        {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()} for row in table
    ]


def render(summary: list[dict[str, Any]], environment: dict[str, Any] | None) -> str:
    out = [
        "# The `dsg` preset against DSG (generated)\n\n",
        "Generated by `python benchmarks/preset_ablation.py`. Each variant makes its own "
        f"synthetic sets ({PRESET} preset, cpu budget; `images` per set), one per seed "
        f"(`seeds` of them); each set calibrates {TOOLKIT} (plain calibration, full "
        "8-bit first and last layers); top-1 on `test_images` Fashion-MNIST test images, mean "
        "over the seeds, spread = max - min.\n\n",
        markdown_table(
            [{"variant": name, "what": text} for name, text in DESCRIPTIONS.items()],
            ["variant", "what"],
        ),
    ]
    if summary:
        out.append("\n## Top-1 (%) by variant\n\n")
        out.append(markdown_table(summary, list(summary[0])))
        table = effects(summary)
        if table:
            out.append(
                "\n## Each choice's effect (top-1 points)\n\n"
                "Mean top-1 of the variant with the preset's choice less the variant "
                "without it, the other choice held fixed (both ways); positive: the "
                "preset's choice is better. An effect smaller than the seed spread is not "
                "told apart from noise.\n\n"
            )
            out.append(markdown_table(table, list(table[0])))
    else:
        out.append("\nNo grid has finished yet.\n")
    if environment:
        out.append(environment_footer(environment))
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--specs", nargs="*", default=list(SPECS))
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--test-samples", type=int, default=None, help="default: all")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="results folder (default docs/results/ablation)"
    )
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render-only", action="store_true", help="only rebuild the page")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    for variant in args.variants:
        for seed in args.seeds:
            folder = grid_folder(args.out, variant, seed)
            if args.render_only and not folder.is_dir():
                continue
            config = grid_config(
                variant,
                seed,
                tuple(args.models),
                tuple(args.specs),
                num_samples=args.num_samples,
                test_samples=args.test_samples,
            )
            log.info("variant %s, seed %d", variant, seed)
            run_grid(
                config,
                folder,
                data_dir=args.data_dir,
                progress=args.progress,
                plots=False,
                render_only=args.render_only,  # each grid's own page, from its cells
            )
    summary = summarize(collect(args.out))
    stored = args.out / f"{PRESET}.json"
    environment = None
    if not args.render_only:
        environment = environment_info()
    elif stored.is_file():
        environment = json.loads(stored.read_text()).get("environment")
    write_json(stored, {"environment": environment, "summary": summary})
    write_text_atomic(args.out / f"{PRESET}.md", render(summary, environment))
    return 0


if __name__ == "__main__":
    sys.exit(main())
