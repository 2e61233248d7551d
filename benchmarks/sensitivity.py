"""Per-layer sensitivity of EfficientNet-Lite0 to low-bit quantization, through a toolkit's
handles: which quantizers, alone, take the model away from FP32.

    ZSQ_IMAGENET_DIR=<folder> python benchmarks/sensitivity.py            # fx, W4A4, real
    ZSQ_IMAGENET_DIR=<folder> python benchmarks/sensitivity.py --toolkit nncf --data genie
    ZSQ_IMAGENET_DIR=<folder> python benchmarks/sensitivity.py --spec W8A8 --eval-images 128

The model is quantized by ``apply(model, toolkit, spec, data=...)`` (the literature's setting:
8-bit first and last layers) and calibrated on the ImageNet folder's 256-image pool (or on a
synthetic set). Then every quantizer is switched on alone, all others off, and the model is
compared with FP32 on the first ``--eval-images`` evaluation images (top-1 agreement, KL);
also every weight quantizer together (activations float), every activation quantizer
together, everything, and every weight quantizer after the per-channel L_2.4 step search the
reconstruction starts from (zsq_plugins.quant.weight_clipping). Each weight row names the
layer's kind (stem, depthwise, expand/project 1x1, head) and the spread of its per-channel
ranges (largest channel max|w| over the median one), the quantity BN folding inflates.
Writes docs/results/imagenet/sensitivity.json and .md (sensitivity_<spec>.* for a spec other than
W4A4).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from setting import literature_spec
from torch import nn

from zsq_plugins import apply, synthesize, zoo
from zsq_plugins.adapter import QuantizedModel, QuantizerKind
from zsq_plugins.datasets.imagenet import ImageNetSamples, imagenet_split
from zsq_plugins.quant.fold import fold_batchnorm
from zsq_plugins.quant.weight_clipping import init_weight_steps
from zsq_plugins.reporting import (
    environment_footer,
    environment_info,
    markdown_table,
    write_json,
    write_text_atomic,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "imagenet"
MODEL = "efficientnet_lite0"
log = logging.getLogger("benchmarks.sensitivity")
DEFAULT_SPEC = "W4A4"
SEARCH_ALL = "every weight quantizer, L_2.4 step search"
SEARCH_DEPTHWISE = "every weight quantizer, L_2.4 step search on depthwise layers only"
SEARCH_OTHERS = "every weight quantizer, L_2.4 step search on all but depthwise layers"


def compare(model: nn.Module, images: torch.Tensor, fp_logits: torch.Tensor, labels) -> dict:
    """Top-1, top-1 agreement and mean KL of ``model`` against the FP32 logits."""
    with torch.no_grad():
        logits = torch.cat([model(chunk) for chunk in images.split(64)]).float()
    kl = F.kl_div(
        F.log_softmax(logits, 1), F.log_softmax(fp_logits, 1), reduction="sum", log_target=True
    )
    return {
        "top1": 100.0 * float((logits.argmax(1) == labels).float().mean()),
        "agreement": 100.0 * float((logits.argmax(1) == fp_logits.argmax(1)).float().mean()),
        "kl": float(kl) / len(images),
    }


def only(quantized: QuantizedModel, chosen: set[int]) -> None:
    """Switches on the handles whose index is in ``chosen``, the others off."""
    for index, handle in enumerate(quantized.handles):
        handle.set_enabled(index in chosen)


def layer_kind(name: str, module: nn.Module, first: str, last: str) -> str:
    if name == first:
        return "stem (8-bit)"
    if name == last:
        return "head linear (8-bit)"
    if isinstance(module, nn.Conv2d):
        if module.groups > 1 and module.groups == module.in_channels:
            return f"depthwise {module.kernel_size[0]}x{module.kernel_size[1]}"
        if module.kernel_size == (1, 1):
            return "project 1x1" if name.endswith("project.conv") else "expand 1x1"
    return type(module).__name__


def channel_spread(module: nn.Module) -> float:
    """Largest per-output-channel max|w| over the median one (BN folded)."""
    ranges = module.weight.detach().abs().flatten(1).amax(1)
    return float(ranges.max() / ranges.median().clamp_min(1e-12))


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = zoo.load(MODEL)
    size = zoo.card(MODEL).input_shape[-1]
    folder = ImageNetSamples(size=size)
    pool, evaluation = imagenet_split(folder)
    if args.data == "real":
        calibration = folder.tensors(pool)[0]
    else:
        calibration = synthesize(model, args.num_samples, args.data, progress=False).images
    images, labels = folder.tensors(evaluation[: args.eval_images])
    with torch.no_grad():
        fp_logits = torch.cat([model(chunk) for chunk in images.split(64)]).float()
    spec = literature_spec(args.spec)
    _, report = apply(model, args.toolkit, spec, data=calibration[: args.num_samples])
    quantized = report.quantized
    folded = dict(fold_batchnorm(model).named_modules())
    weights = [h.layer for h in quantized.weight_handles()]
    first, last = weights[0], weights[-1]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def measure(label: str, kind: str, chosen: set[int], **extra: Any) -> None:
        only(quantized, chosen)
        rows.append({"quantized": label, "kind": kind, **extra, **compare(
            quantized.model, images, fp_logits, labels)})  # fmt: skip
        log.info("%s", rows[-1])

    everything = {i for i, h in enumerate(quantized.handles) if h.enabled}
    weight_set = {i for i in everything if quantized.handles[i].kind is QuantizerKind.WEIGHT}
    measure("none (FP32 through the toolkit)", "-", set())
    measure("everything", "-", everything)
    measure("every weight quantizer", "-", weight_set)
    measure("every activation quantizer", "-", everything - weight_set)
    for index, handle in enumerate(quantized.handles):
        if handle.kind is QuantizerKind.WEIGHT:
            module = folded[handle.layer]
            measure(
                handle.layer,
                f"weight: {layer_kind(handle.layer, module, first, last)}",
                {index},
                bits=handle.bits,
                channel_spread=channel_spread(module),
            )
        elif index in everything:
            measure(handle.layer, "activation", {index}, bits=handle.bits)
    only(quantized, weight_set)
    handles = quantized.weight_handles()
    covering = [h.scale().clone() for h in handles]
    kinds = {h.layer: layer_kind(h.layer, folded[h.layer], first, last) for h in handles}
    depthwise = {layer for layer, kind in kinds.items() if kind.startswith("depthwise")}
    for label, searched in [
        (SEARCH_ALL, handles),
        (SEARCH_DEPTHWISE, [h for h in handles if h.layer in depthwise]),
        (SEARCH_OTHERS, [h for h in handles if h.layer not in depthwise]),
    ]:
        for handle, scale in zip(handles, covering, strict=True):
            handle.set_scale(scale)  # each search starts from the toolkit's covering steps
        init_weight_steps(quantized, calibration[:1], searched)
        measure(label, "-", weight_set)
    only(quantized, everything)
    return {
        "benchmark": "sensitivity",
        "model": MODEL,
        "toolkit": args.toolkit,
        "spec": args.spec,
        "data": args.data,
        "num_samples": args.num_samples,
        "eval_images": len(images),
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "environment": environment_info(),
    }


def render(record: dict[str, Any]) -> str:
    rows = record["rows"]
    summary = [r for r in rows if r["kind"] == "-"]
    weights = sorted((r for r in rows if r["kind"].startswith("weight")), key=lambda r: -r["kl"])
    acts = sorted((r for r in rows if r["kind"] == "activation"), key=lambda r: -r["kl"])
    by_kind: dict[str, list[float]] = {}
    for row in weights:
        by_kind.setdefault(row["kind"], []).append(row["kl"])
    kinds = [
        {"kind": kind, "layers": len(kls), "median KL": statistics.median(kls), "max KL": max(kls)}
        for kind, kls in sorted(by_kind.items(), key=lambda item: -max(item[1]))
    ]
    columns = ["quantized", "kind", "top1", "agreement", "kl"]
    by_name = {r["quantized"]: r for r in summary}
    ranked = sorted(kinds, key=lambda k: -k["median KL"])
    together = by_name["every weight quantizer"]
    searched = by_name[SEARCH_ALL]
    activations = by_name["every activation quantizer"]
    alone = weights[0]
    lead = (
        "No single quantizer explains the loss. "
        if alone["agreement"] - together["agreement"] > 10.0
        else ""
    )
    findings = (
        "## What it shows\n\n"
        f"- {lead}The most harmful weight quantizer alone ({alone['quantized']}, "
        f"{alone['kind'].removeprefix('weight: ')}) keeps {alone['agreement']:.1f}% "
        f"agreement; every weight quantizer together keeps {together['agreement']:.1f}%, "
        f"every activation quantizer together {activations['agreement']:.1f}% (KL "
        f"{activations['kl']:.3f}). The single-layer KLs add up to "
        f"{sum(r['kl'] for r in weights):.2f} against {together['kl']:.2f} together: the "
        "error of each quantized layer compounds through the ones after it.\n"
        f"- By kind, {ranked[0]['kind'].removeprefix('weight: ')} and "
        f"{ranked[1]['kind'].removeprefix('weight: ')} layers are the most sensitive (median "
        f"KL {ranked[0]['median KL']:.3f} and {ranked[1]['median KL']:.3f} a layer).\n"
        f"- The per-channel L_2.4 step search the reconstruction starts from moves the "
        f"all-weights agreement from {together['agreement']:.1f}% to "
        f"{searched['agreement']:.1f}% (KL {together['kl']:.2f} to {searched['kl']:.2f}): "
        "a better fit of each weight tensor is not a better fit of the outputs, which only "
        "rounding learned against the outputs (reconstruction) targets.\n"
    )
    if SEARCH_DEPTHWISE in by_name and SEARCH_OTHERS in by_name:
        parts = {"depthwise": by_name[SEARCH_DEPTHWISE], "other": by_name[SEARCH_OTHERS]}
        worse = [name for name, row in parts.items() if row["kl"] > together["kl"]]
        verdict = {
            2: "the search raises KL on either part alone, not only on depthwise kernels' "
            "few weights per channel",
            1: f"only the search on the {''.join(worse)} layers raises KL",
            0: "neither part alone raises KL",
        }[len(worse)]
        findings += (
            "- Searched on the depthwise layers only, agreement is "
            f"{parts['depthwise']['agreement']:.1f}% (KL {parts['depthwise']['kl']:.2f}); on "
            f"the other layers only, {parts['other']['agreement']:.1f}% (KL "
            f"{parts['other']['kl']:.2f}): {verdict}.\n"
        )
    return (
        "# Per-layer sensitivity, EfficientNet-Lite0 (generated by "
        "`python benchmarks/sensitivity.py`)\n\n"
        f"{record['toolkit']}, {record['spec']} in the literature's setting (8-bit first and "
        f"last layers), calibrated on {record['num_samples']} {record['data']} images; each "
        "row switches on the named quantizers only and compares the model with FP32 on "
        f"{record['eval_images']} ImageNet evaluation images (top-1 %, top-1 agreement %, "
        "mean KL). The summary rows that name the L_2.4 step search start the weight "
        "quantizers from the reconstruction routine's step search.\n\n"
        "## Summary\n\n"
        + markdown_table(summary, columns, digits=3)
        + "\n"
        + findings
        + "\n## Weight quantizers by layer kind\n\n"
        + markdown_table(kinds, ["kind", "layers", "median KL", "max KL"], digits=4)
        + "\n## Every weight quantizer alone, most harmful first\n\n"
        + markdown_table(weights, [*columns, "bits", "channel_spread"], digits=3)
        + "\n## Every activation quantizer alone, most harmful first\n\n"
        + markdown_table(acts, [*columns, "bits"], digits=3)
        + environment_footer(record["environment"])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toolkit", default="fx")
    parser.add_argument("--spec", default=DEFAULT_SPEC)
    parser.add_argument("--data", default="real", help="real, or a generator preset")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    path = result_path(args.spec)
    if not args.render_only:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        torch.set_num_threads(args.threads)
        write_json(path, run(args))
    record = json.loads(path.read_text())
    write_text_atomic(path.with_suffix(".md"), render(record))


def result_path(spec: str) -> Path:
    """sensitivity.json for the default W4A4, sensitivity_<spec>.json for another spec."""
    return RESULTS / ("sensitivity.json" if spec == DEFAULT_SPEC else f"sensitivity_{spec}.json")


if __name__ == "__main__":
    main()
