"""Placement ablation: is a toolkit gap after reconstruction the routine's or the graph's?

    python benchmarks/placement.py --models resnet20_fmnist mobilenetv2_fmnist --specs W3A3

The toolkits do not quantize the same tensors. Brevitas (layerwise) quantizes only the inputs
of conv and linear layers; torch.ao FX also quantizes each residual branch before its
addition, the input of global pooling and the logits. This runs the reconstruction
benchmark's fx genie-m cell again with fx's other activation quantizers switched off through
the handles (each one whose output reaches no conv or linear layer directly), so that fx
quantizes the tensors Brevitas does, and tabulates it beside the three toolkits' own cells
(docs/results/reconstruction/cells/). Writes docs/results/reconstruction/placement.json and
placement.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from typing import Any

import torch
from reconstruction import CELLS, RESULTS, ROOT, cell_name, is_current, is_current_placement
from synthetic_cache import cached_synthesize
from torch import nn

from zsq_plugins import QuantSpec, apply, evaluate, zoo
from zsq_plugins.adapter import QuantizedModel
from zsq_plugins.datasets import calibration_subset, fashion_mnist
from zsq_plugins.reconstruction import RECONSTRUCTIONS
from zsq_plugins.reconstruction.routine import reconstruct
from zsq_plugins.reporting import (
    environment_footer,
    environment_info,
    markdown_table,
    write_json,
    write_text_atomic,
)

# Results written before the script took --models were all made on this model.
DEFAULT_MODEL = "resnet20_fmnist"
OUT = RESULTS / "reconstruction" / "placement.json"
log = logging.getLogger("benchmarks.placement")


def quantizers_off_layer_inputs(quantized: QuantizedModel) -> list[str]:
    """Switches off every enabled activation quantizer of an fx model whose output feeds no
    conv or linear layer directly; returns their layers."""
    graph_module = quantized.model
    modules = dict(graph_module.named_modules())
    nodes = {n.target: n for n in graph_module.graph.nodes if n.op == "call_module"}
    switched = []
    for handle in quantized.activation_handles():
        name = next(k for k, m in modules.items() if m is handle.module)
        users = nodes[name].users
        feeds_layer = any(
            u.op == "call_module" and isinstance(modules[u.target], nn.Conv2d | nn.Linear)
            for u in users
        )
        if handle.enabled and not feeds_layer:
            handle.set_enabled(False)
            switched.append(handle.layer)
    return switched


def run(model_name: str, spec: str, source: str, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    if source == "real":
        images = calibration_subset(1024, seed=0)
    else:
        folder = ROOT / ".cache" / "synthetic"
        images = cached_synthesize(folder, model_name, source, 1024, 0, "cpu", False).images
    started = time.perf_counter()
    _, report = apply(
        zoo.load(model_name), "fx", QuantSpec.parse(spec), data=images, progress=False
    )
    switched = quantizers_off_layer_inputs(report.quantized)
    low_bit = [h for h in report.quantized.activation_handles() if h.enabled]
    config = RECONSTRUCTIONS.get("genie-m").config("cpu")
    recorded = reconstruct(
        report.quantized, zoo.load(model_name), images, config, progress=False
    ).config
    top1 = evaluate(report.quantized.model, fashion_mnist("test"), progress=False).top1
    return {
        "model": model_name,
        "spec": spec,
        "source": source,
        "switched_off": switched,
        "activation_quantizers": len(low_bit),
        "top1": top1,
        "seconds": round(time.perf_counter() - started, 1),
        "reconstruction_config": recorded,
        "environment": environment_info(),
    }


def model_of(result: dict[str, Any]) -> str:
    return result.get("model", DEFAULT_MODEL)


def toolkit_cell(model_name: str, spec: str, source: str, toolkit: str) -> float | None:
    path = CELLS / f"{cell_name(model_name, spec, toolkit, source, 'genie-m', 'cpu')}.json"
    if not path.is_file():
        return None
    cell = json.loads(path.read_text())
    return cell["top1"] if is_current(cell) else None


def render(results: list[dict[str, Any]], stale: list[dict[str, Any]]) -> str:
    left_out = ""
    if stale:
        names = ", ".join(f"{model_of(r)} {r['spec']} {r['source']}" for r in stale)
        left_out = (
            f"\nLeft out, made with an older reconstruction routine or configuration (run "
            f"the command again): {names}.\n"
        )
    if not results:
        return (
            "# Quantizer placement ablation (generated)\n\nNo current result. Command: "
            f"`python benchmarks/placement.py`.\n{left_out}"
        )
    rows = []
    for r in results:
        row = {"model": model_of(r), "spec": r["spec"], "data": r["source"]}
        for toolkit in ("fx", "nncf", "brevitas"):
            row[toolkit] = toolkit_cell(model_of(r), r["spec"], r["source"], toolkit)
        row["fx, conv/linear inputs only"] = r["top1"]
        row["quantizers switched off"] = len(r["switched_off"])
        rows.append(row)
    switched = "".join(
        f"\nSwitched off in {model} fx: {', '.join(names)}.\n"
        for model, names in {model_of(r): r["switched_off"] for r in results}.items()
    )
    return (
        "# Quantizer placement ablation (generated)\n\n"
        "genie-m (cpu budget), top-1 (%) on the 10k test set. The columns fx, nncf and "
        "brevitas are the reconstruction benchmark's cells, each toolkit quantizing the tensors "
        "it chooses; the next is fx with every activation quantizer whose output feeds no "
        "conv or linear layer switched off (residual branches before their addition, the "
        "input of global pooling, the logits), the tensors Brevitas quantizes. Command: "
        "`python benchmarks/placement.py --models resnet20_fmnist mobilenetv2_fmnist`.\n\n"
        + markdown_table(rows, list(rows[0]))
        + switched
        + left_out
        + environment_footer(results[0]["environment"])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[DEFAULT_MODEL])
    parser.add_argument("--specs", nargs="+", default=["W3A3"])
    parser.add_argument("--sources", nargs="+", default=["real", "genie"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stored = json.loads(OUT.read_text()) if OUT.is_file() else []
    results = {(model_of(r), r["spec"], r["source"]): r for r in stored}
    if not args.render_only:
        for key in itertools.product(args.models, args.specs, args.sources):
            if key in results and is_current_placement(results[key]):
                log.info("skip %s %s %s (done)", *key)
                continue
            log.info("run %s %s %s", *key)
            results[key] = run(*key, args.threads)
            write_json(OUT, list(results.values()))
    if results:
        current = [r for r in results.values() if is_current_placement(r)]
        text = render(current, [r for r in results.values() if not is_current_placement(r)])
        write_text_atomic(OUT.with_suffix(".md"), text)
        print(text)


if __name__ == "__main__":
    main()
