"""Running a model up to one of its modules: the value where a layer reads its input.

The reconstruction routine and adaptive BN both need a model's (FP or toolkit-quantized) value
at the input of a named layer without running the rest of the network: a forward pre-hook
records the layer's input and stops the forward pass there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from zsq_plugins.adapter import QuantizerHandle
from zsq_plugins.errors import ZSQError


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the requested point is reached."""


@contextmanager
def capture_at(model: nn.Module, layer: str | None) -> Iterator[list[torch.Tensor]]:
    """Yields a list that receives the input of ``layer`` (and stops the forward there), or
    the model's output when ``layer`` is None; run the model with ``run_to``."""
    store: list[torch.Tensor] = []
    if layer is None:
        hook = model.register_forward_hook(lambda _, args, out: store.append(out))
    else:

        def record(_: nn.Module, args: tuple) -> None:
            store.append(args[0])
            raise _Stop

        hook = model.get_submodule(layer).register_forward_pre_hook(record)
    try:
        yield store
    finally:
        hook.remove()


def run_to(model: nn.Module, x: torch.Tensor, store: list[torch.Tensor]) -> torch.Tensor:
    """Runs ``model`` on ``x`` until the point ``store`` (from ``capture_at``) watches, and
    returns the value there as a plain tensor."""
    store.clear()
    try:
        output = model(x)
    except _Stop:
        pass
    else:
        if not store:
            store.append(output)
    value = store[0]
    return getattr(value, "value", value)  # a toolkit may hand over a wrapped tensor


def float_weight(model: nn.Module, handle: QuantizerHandle, probe: torch.Tensor) -> torch.Tensor:
    """The float weight that ``model`` (a toolkit's quantized model) feeds to the weight
    quantizer ``handle``, found by running ``probe`` through it: the toolkit's own tensor,
    so writing into it in place changes the layer."""
    seen: list[torch.Tensor] = []

    def record(weight: torch.Tensor) -> torch.Tensor:
        seen.append(weight)
        return weight

    remover = handle.override(record)
    try:
        with torch.no_grad(), capture_at(model, None) as store:
            run_to(model, probe, store)
    finally:
        remover.remove()
    if not seen:
        raise ZSQError(f"the weight quantizer of {handle.layer!r} did not run")
    return seen[0]
