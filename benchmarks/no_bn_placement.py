"""Why fx and onnxruntime collapse at W4A4 on the BN-free models: where each toolkit puts its
activation quantizers.

    python benchmarks/no_bn_placement.py

Each toolkit quantizes convnext_fmnist and vit_fmnist at W4A4 (the literature's setting: 8-bit
first and last layers) calibrated on 1,024 real training images, as the no_bn_modern grid's
real cells are. The page counts the activation quantizers each toolkit places, by the kind of
op whose output they quantize, and gives top-1 on the 10k test set with every quantizer on,
with the weight quantizers only, and, in fx, with each kind of activation quantizer switched
off alone, with every quantizer whose output feeds no conv or linear layer switched off
(the tensors Brevitas quantizes) and with Brevitas's placement exactly (skip paths read the
float tensor; benchmarks/placement.py). Writes docs/results/compare/no_bn_modern_placement.json
and .md.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch
from placement import fx_layer_inputs_only
from setting import literature_spec

from zsq_plugins import apply, evaluate, zoo
from zsq_plugins.adapter import QuantizedModel
from zsq_plugins.datasets import calibration_subset, fashion_mnist
from zsq_plugins.reporting import (
    environment_footer,
    environment_info,
    markdown_table,
    write_json,
    write_text_atomic,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "compare" / "no_bn_modern_placement.json"
MODELS = ("convnext_fmnist", "vit_fmnist")
TOOLKITS = ("fx", "pt2e", "nncf", "brevitas", "onnxruntime")
SPEC = "W4A4"
log = logging.getLogger("benchmarks.no_bn_placement")


def op_kind(layer: str) -> str:
    """The op an activation quantizer sits after, from its handle's layer name: the last
    component of a module path, an FX node name without its counter or an ONNX node name,
    lower-cased (``add_3`` -> ``add``, ``stages.0.1.norm`` -> ``norm``, ``stages_0_0_gamma``
    -> ``gamma``, ``/stages/stages.0/act/Erf`` -> ``erf``). Applying it again changes
    nothing, so stored counts can be merged by it."""
    last = re.split(r"[./_]", re.sub(r"_\d+$", "", layer))[-1].lower()
    return "block" if last.isdigit() else last


def counts_by_kind(result: dict[str, Any]) -> dict[str, int]:
    merged: dict[str, int] = collections.Counter()
    for kind, count in result["by_kind"].items():
        merged[op_kind(kind)] += count
    return dict(merged)


def top1(quantized: QuantizedModel) -> float:
    return evaluate(quantized.model, fashion_mnist("test"), progress=False).top1


def low_bit(quantized: QuantizedModel) -> list:
    """The enabled activation quantizers below 8 bits (the 8-bit ones are the input's and
    the last layer's, the literature's setting)."""
    return [h for h in quantized.activation_handles() if h.enabled and h.bits < 8]


def measure(model_name: str, toolkit: str, images: torch.Tensor) -> dict[str, Any]:
    started = time.perf_counter()

    def quantize() -> QuantizedModel:
        spec = literature_spec(SPEC)
        return apply(zoo.load(model_name), toolkit, spec, data=images, progress=False)[1].quantized

    quantized = quantize()
    handles = low_bit(quantized)
    result: dict[str, Any] = {
        "model": model_name,
        "toolkit": toolkit,
        "activation_quantizers": len(handles),
        "by_kind": dict(collections.Counter(op_kind(h.layer) for h in handles)),
        "top1": top1(quantized),
    }
    for handle in handles:
        handle.set_enabled(False)
    result["top1_weights_only"] = top1(quantized)
    for handle in handles:
        handle.set_enabled(True)
    if toolkit == "fx":
        kind_off = {}
        for kind in result["by_kind"]:
            for handle in handles:
                handle.set_enabled(op_kind(handle.layer) != kind)
            kind_off[kind] = top1(quantized)
        for handle in handles:
            handle.set_enabled(True)
        result["top1_kind_off"] = kind_off
        switched, _ = fx_layer_inputs_only(quantized, float_readers=False)
        result["layer_inputs_only"] = {"switched_off": len(switched), "top1": top1(quantized)}
        again = quantize()
        _, rewired = fx_layer_inputs_only(again, float_readers=True)
        result["brevitas_placement"] = {"rewired": rewired, "top1": top1(again)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    log.info("%s", {k: v for k, v in result.items() if k != "by_kind"})
    return result


def render(record: dict[str, Any]) -> str:
    results = record["results"]
    rows = [
        {
            "model": r["model"],
            "toolkit": r["toolkit"],
            "activation quantizers": r["activation_quantizers"],
            "top-1": r["top1"],
            "weights quantized only": r["top1_weights_only"],
        }
        for r in results
    ]
    text = (
        "# Quantizer placement on the BN-free models (generated by "
        "`python benchmarks/no_bn_placement.py`)\n\n"
        f"{record['spec']} in the literature's setting, calibrated on {record['num_samples']} "
        "real training images as the no_bn_modern grid's real cells are; top-1 (%) on the 10k "
        "test set. *activation quantizers* counts the low-bit ones (the input's and the last "
        "layer's are 8-bit). onnxruntime's rows measure its torch mirror of the quantized "
        "session (the model its handles act on), where the grid evaluates the session itself."
        "\n\n## Every toolkit\n\n" + markdown_table(rows, list(rows[0]))
    )
    for model in dict.fromkeys(r["model"] for r in results):
        mine = {r["toolkit"]: r for r in results if r["model"] == model}
        counts = {toolkit: counts_by_kind(r) for toolkit, r in mine.items()}
        kinds = list(dict.fromkeys(k for c in counts.values() for k in c))
        fx = mine.get("fx")
        table = []
        for kind in kinds:
            row: dict[str, Any] = {"op": kind}
            row.update({toolkit: c.get(kind, 0) for toolkit, c in counts.items()})
            if fx is not None:
                row["fx top-1, this kind off"] = fx["top1_kind_off"].get(kind)
            table.append(row)
        text += (
            f"\n## {model}: where each toolkit quantizes\n\n"
            "Low-bit activation quantizers by the op whose output they quantize (the last "
            "part of the layer, graph-node or ONNX node name, lower-cased: onnxruntime names "
            "ONNX ops, so a linear layer's bias is its own `add`), and fx's top-1 with that "
            "kind switched off alone, every other quantizer on.\n\n"
            + markdown_table(table, list(table[0]))
        )
        if fx is not None:
            placed = {
                "fx, own placement": fx["top1"],
                "fx, conv/linear inputs only": fx["layer_inputs_only"]["top1"],
                "fx, Brevitas's placement": fx["brevitas_placement"]["top1"],
                "brevitas": mine["brevitas"]["top1"] if "brevitas" in mine else None,
            }
            text += (
                f"\nfx with the {fx['layer_inputs_only']['switched_off']} quantizers whose "
                "output feeds no conv or linear layer switched off, then with Brevitas's "
                "placement exactly (a kept quantizer quantizes a layer's input for that layer "
                f"only: {fx['brevitas_placement']['rewired']} other readers, residual "
                "additions, read the float tensor; benchmarks/placement.py):\n\n"
                + markdown_table([placed], list(placed))
            )
    return text + environment_footer(record["environment"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--toolkits", nargs="+", default=list(TOOLKITS), choices=TOOLKITS)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if not args.render_only:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        torch.set_num_threads(args.threads)
        images = calibration_subset(args.num_samples, seed=0)
        results = [measure(m, t, images) for m in args.models for t in args.toolkits]
        record = {
            "benchmark": "no_bn_placement",
            "spec": SPEC,
            "num_samples": args.num_samples,
            "results": results,
            "environment": environment_info(),
        }
        write_json(RESULTS, record)
    record = json.loads(RESULTS.read_text())
    write_text_atomic(RESULTS.with_suffix(".md"), render(record))


if __name__ == "__main__":
    main()
