"""Placement ablation: is a toolkit gap after reconstruction the routine's or the graph's?

    python benchmarks/placement.py --models resnet20_fmnist mobilenetv2_fmnist --specs W3A3 \
        --toolkits fx nncf fx-float-skips nncf-float-skips

The toolkits do not quantize the same tensors. Brevitas (layerwise) quantizes only the inputs
of conv and linear layers; torch.ao FX and NNCF also quantize each residual branch before its
addition and the input of global pooling, and FX the logits too. This runs the
reconstruction benchmark's genie-m cell again in fx and in NNCF with their other activation
quantizers switched off through the handles (each one whose output reaches no conv or linear
layer), so that every toolkit quantizes the tensors Brevitas does, and in both once more with
the skip paths reading float tensors as Brevitas's do; it tabulates them beside
the three toolkits' own cells (docs/results/reconstruction/cells/) with the spread under each
placement. Writes docs/results/reconstruction/placement.json and placement.md.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import time
from typing import Any

import torch
from reconstruction import (
    CELLS,
    PLACEMENT_RESULTS,
    ROOT,
    cell_name,
    is_current,
    is_current_placement,
    stored_placement_results,
)
from setting import literature_spec
from synthetic_cache import cached_synthesize
from torch import nn

from zsq_plugins import apply, evaluate, zoo
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
log = logging.getLogger("benchmarks.placement")


TOOLKITS = ("fx", "nncf", "fx-float-skips", "nncf-float-skips")
"""The ablation's rows: fx and NNCF with the quantizers off conv/linear inputs switched off,
and both again with Brevitas's placement exactly (float skip paths too)."""
COLUMNS = {
    "fx": "fx, conv/linear inputs only",
    "nncf": "nncf, conv/linear inputs only",
    "fx-float-skips": "fx, Brevitas's placement",
    "nncf-float-skips": "nncf, Brevitas's placement",
}


def is_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d | nn.Linear)


def fx_layer_inputs_only(quantized: QuantizedModel, float_readers: bool) -> tuple[list[str], int]:
    """Gives an fx model Brevitas's placement: switches off each activation quantizer whose
    output feeds no conv or linear layer directly, and with ``float_readers`` lets every other
    reader of a kept quantizer (a residual addition reading a block's input) read the float
    tensor, since Brevitas quantizes a layer's input for that layer only. Returns the layers
    switched off and the number of edges rewired. (The reconstruction routine then cannot
    replay cached inputs where a skip reads the float tensor: it runs those blocks' prefix on
    every step, which is slower, not different.)"""
    graph_module = quantized.model
    modules = dict(graph_module.named_modules())
    nodes = {n.target: n for n in graph_module.graph.nodes if n.op == "call_module"}

    def reads_as_layer(user: torch.fx.Node) -> bool:
        return user.op == "call_module" and is_layer(modules[user.target])

    switched, rewired = [], 0
    for handle in quantized.activation_handles():
        if not handle.enabled:
            continue
        node = nodes[next(k for k, m in modules.items() if m is handle.module)]
        if not any(reads_as_layer(user) for user in node.users):
            handle.set_enabled(False)
            switched.append(handle.layer)
            continue
        for user in [u for u in node.users if float_readers and not reads_as_layer(u)]:
            user.replace_input_with(node, node.args[0])
            rewired += 1
    if rewired:
        graph_module.graph.lint()
        graph_module.recompile()
    return switched, rewired


def nncf_layer_inputs_only(quantized: QuantizedModel, float_readers: bool) -> tuple[list[str], int]:
    """Gives an NNCF model Brevitas's placement: switches off each activation quantizer whose
    output reaches no conv or linear layer (through unquantized pooling or flatten, as the
    adapter's handles record it), and with ``float_readers`` takes every kept one off the op
    that produces its tensor (NNCF's hook, which every reader sees) and runs it in a forward
    pre-hook of each layer it feeds instead, so that other readers read the float tensor.
    Returns the layers switched off and the number of quantizers moved."""
    from nncf.torch.function_hook.wrapper import get_hook_storage

    switched, kept = [], []
    for handle in quantized.activation_handles():
        if handle.enabled and not handle.feeds:
            handle.set_enabled(False)
            switched.append(handle.layer)
        elif handle.enabled:
            kept.append(handle)
    if not float_readers:
        return switched, 0
    storage = get_hook_storage(quantized.model)
    for handle in kept:
        for name, module in list(storage.named_hooks(remove_duplicate=False)):
            if module is handle.module:
                storage.set_submodule(name, nn.Identity())
        for layer in sorted(handle.feeds):
            quantized.model.get_submodule(layer).register_forward_pre_hook(
                functools.partial(quantize_input, handle.module)
            )
    return switched, len(kept)


def quantize_input(quantizer: nn.Module, _: nn.Module, args: tuple) -> tuple:
    return (quantizer(args[0]), *args[1:])


def quantizers_off_layer_inputs(quantized: QuantizedModel, variant: str) -> tuple[list[str], int]:
    """Brevitas's placement, or with ``variant`` fx or nncf only the quantizers off layer
    inputs switched off (a kept one still quantizes the tensor for every reader). Returns the
    layers switched off and the readers (fx) or quantizers (NNCF) moved."""
    float_readers = variant.endswith("-float-skips")
    if quantized.toolkit == "fx":
        return fx_layer_inputs_only(quantized, float_readers)
    if quantized.toolkit == "nncf":
        return nncf_layer_inputs_only(quantized, float_readers)
    raise ValueError(f"no placement switch for toolkit {quantized.toolkit!r}")


def run(model_name: str, spec: str, source: str, variant: str, threads: int) -> dict[str, Any]:
    toolkit = variant.removesuffix("-float-skips")
    torch.set_num_threads(threads)
    if source == "real":
        images = calibration_subset(1024, seed=0)
    else:
        folder = ROOT / ".cache" / "synthetic"
        images = cached_synthesize(folder, model_name, source, 1024, 0, "cpu", False).images
    started = time.perf_counter()
    _, report = apply(
        zoo.load(model_name), toolkit, literature_spec(spec), data=images, progress=False
    )
    switched, rewired = quantizers_off_layer_inputs(report.quantized, variant)
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
        "toolkit": variant,
        "switched_off": switched,
        "float_readers": rewired,  # fx: readers rewired; NNCF: quantizers moved
        "activation_quantizers": len(low_bit),
        "top1": top1,
        "seconds": round(time.perf_counter() - started, 1),
        "reconstruction_config": recorded,
        "environment": environment_info(),
    }


def model_of(result: dict[str, Any]) -> str:
    return result.get("model", DEFAULT_MODEL)


def toolkit_of(result: dict[str, Any]) -> str:
    """Results written before the script took --toolkits were all fx."""
    return result.get("toolkit", "fx")


def key_of(result: dict[str, Any]) -> tuple[str, str, str, str]:
    return model_of(result), result["spec"], result["source"], toolkit_of(result)


def spread(values: list[float | None]) -> float | None:
    """Largest minus smallest of the three toolkits; None unless all three are in."""
    if any(v is None for v in values):
        return None
    return round(max(values) - min(values), 2)


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
    matched = {key_of(r): r for r in results}
    rows = []
    for model, spec, source in dict.fromkeys(key_of(r)[:3] for r in results):
        row: dict[str, Any] = {"model": model, "spec": spec, "data": source}
        own = {t: toolkit_cell(model, spec, source, t) for t in ("fx", "nncf", "brevitas")}
        row.update(own)
        same = {}
        for toolkit in TOOLKITS:
            result = matched.get((model, spec, source, toolkit))
            same[toolkit] = None if result is None else result["top1"]
            row[COLUMNS[toolkit]] = same[toolkit]
        row["spread, own placement"] = spread(list(own.values()))
        row["spread, conv/linear inputs only"] = spread([same["fx"], same["nncf"], own["brevitas"]])
        row["spread, Brevitas's placement"] = spread(
            [same["fx-float-skips"], same["nncf-float-skips"], own["brevitas"]]
        )
        rows.append(row)
    switched = "".join(
        f"\nSwitched off in {model} {toolkit}: {', '.join(names)}{moved_note(toolkit, moved)}.\n"
        for (model, toolkit), (names, moved) in {
            (model_of(r), toolkit_of(r)): (r["switched_off"], r.get("float_readers", 0))
            for r in results
        }.items()
    )
    return (
        "# Quantizer placement ablation (generated)\n\n"
        "genie-m (cpu budget), top-1 (%) on the 10k test set. The columns fx, nncf and "
        "brevitas are the reconstruction benchmark's cells, each toolkit quantizing the tensors "
        "it chooses. The next two are fx and NNCF with every activation quantizer whose output "
        "feeds no conv or linear layer switched off (residual branches before their addition, "
        "the input of global pooling, fx's logits); a kept quantizer still quantizes its "
        "tensor for every reader, so an identity skip path reads the quantized block input. "
        "The two after are fx and NNCF with Brevitas's placement exactly: those readers read "
        "the float tensor too, as in Brevitas, which quantizes a layer's input inside the "
        "layer. A spread is the largest minus the smallest of the three toolkits, shown when "
        "all three are in. Command: `python benchmarks/placement.py --models resnet20_fmnist "
        "mobilenetv2_fmnist --toolkits fx nncf fx-float-skips nncf-float-skips`.\n\n"
        + markdown_table(rows, list(rows[0]))
        + switched
        + left_out
        + environment_footer(results[0]["environment"])
    )


def moved_note(toolkit: str, moved: int) -> str:
    if not moved:
        return ""
    if toolkit.startswith("nncf"):
        return f"; {moved} kept quantizers moved into the layers they feed"
    return f"; {moved} readers of kept quantizers rewired to the float tensor"


def stored_results() -> dict[tuple[str, str, str, str], dict[str, Any]]:
    return {key_of(r): r for r in stored_placement_results()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[DEFAULT_MODEL])
    parser.add_argument("--specs", nargs="+", default=["W3A3"])
    parser.add_argument("--sources", nargs="+", default=["real", "genie"])
    parser.add_argument("--toolkits", nargs="+", default=["fx"], choices=TOOLKITS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = stored_results()
    if not args.render_only:
        grid = itertools.product(args.models, args.specs, args.sources, args.toolkits)
        for key in grid:
            if key in results and is_current_placement(results[key]):
                log.info("skip %s %s %s %s (done)", *key)
                continue
            log.info("run %s %s %s %s", *key)
            result = run(*key, args.threads)
            # Read again before writing: another process may have added its results since.
            results = {**stored_results(), key: result}
            write_json(PLACEMENT_RESULTS, list(results.values()))
    if results:
        current = [r for r in results.values() if is_current_placement(r)]
        text = render(current, [r for r in results.values() if not is_current_placement(r)])
        write_text_atomic(PLACEMENT_RESULTS.with_suffix(".md"), text)
        print(text)


if __name__ == "__main__":
    main()
