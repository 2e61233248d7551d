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


def plain_tensor(value: object) -> torch.Tensor:
    """``value`` as a plain tensor: a toolkit may hand over a wrapped one (Brevitas'
    QuantTensor) whose values are its ``.value``."""
    return getattr(value, "value", value)  # type: ignore[return-value]


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
    return plain_tensor(store[0])


def float_weights(
    model: nn.Module,
    handles: list[QuantizerHandle],
    probe: torch.Tensor,
    point: str | None = None,
) -> list[torch.Tensor]:
    """The float weight that ``model`` (a toolkit's quantized model) feeds to each weight
    quantizer in ``handles``, found by running the first image of ``probe`` up to ``point``
    (see ``capture_at``; None: the whole model). These are the toolkit's own tensors, so
    writing into them in place changes the layers."""
    seen: dict[int, torch.Tensor] = {}
    removers = [
        handle.override(lambda w, i=i: seen.setdefault(i, w)) for i, handle in enumerate(handles)
    ]
    try:
        with torch.no_grad(), capture_at(model, point) as store:
            run_to(model, probe[:1], store)
    finally:
        for remover in removers:
            remover.remove()
    missing = [h.layer for i, h in enumerate(handles) if i not in seen]
    if missing:
        where = f"before {point!r}" if point is not None else "in a forward pass"
        raise ZSQError(f"the weight quantizers of {missing} did not run {where}")
    return [seen[i] for i in range(len(handles))]


def float_weight(model: nn.Module, handle: QuantizerHandle, probe: torch.Tensor) -> torch.Tensor:
    """``float_weights`` for one handle, over the whole model."""
    return float_weights(model, [handle], probe)[0]
