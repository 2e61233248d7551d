"""Which block learns each activation quantizer: decided by when the quantizer runs.

A block's output point is the input of the next block's first layer, as a forward pre-hook
on that layer sees it (blocks.output_points, capture.py). Every activation quantizer that
runs between the pre-hooks of a block's first layer and of the next block's first layer
therefore shapes that block's output, and the routine learns it with that block; those that
run before the first block's first layer (the model input's) belong to the first block. A
toolkit that quantizes a layer's input inside the layer (Brevitas) runs that quantizer after
the layer's pre-hook, so it is learned by the block that reads the value, which is where the
routine's loss first sees it.

Handles name their layer each in the toolkit's own way (a module name, an fx node name, an
op inside a container), so matching names against the FP graph would silently leave some
quantizers out, and a different set in each toolkit; the order of execution is the same in
every toolkit.
"""

from __future__ import annotations

import torch

from zsq_plugins.adapter import QuantizedModel, QuantizerHandle
from zsq_plugins.graph.blocks import Block


def activation_quantizers_by_block(
    quantized: QuantizedModel, blocks: list[Block], probe: torch.Tensor
) -> list[list[QuantizerHandle]]:
    """The enabled activation quantizers each block learns, in execution order, found by
    running ``probe`` (one image is enough) through the toolkit's model once."""
    model = quantized.model
    handles = [h for h in quantized.activation_handles() if h.enabled]
    current = {"block": 0}
    assigned: list[list[QuantizerHandle]] = [[] for _ in blocks]
    seen: set[int] = set()

    def start(index: int):
        def hook(*_: object) -> None:
            current["block"] = index

        return hook

    def ran(handle: QuantizerHandle):
        def record(x: torch.Tensor) -> torch.Tensor:
            if id(handle) not in seen:  # a quantizer shared by several places counts once
                seen.add(id(handle))
                assigned[current["block"]].append(handle)
            return x  # only the order matters here

        return record

    removers = [
        model.get_submodule(block.layers[0]).register_forward_pre_hook(start(index))
        for index, block in enumerate(blocks)
        if block.layers
    ]
    removers += [handle.override(ran(handle)) for handle in handles]
    try:
        with torch.no_grad():
            model(probe[:1])
    finally:
        for remover in removers:
            remover.remove()
    return assigned
