"""ZAQ's two-level discrepancy between a FP model and a quantized opponent.

After ZAQ (Liu et al., CVPR 2021): images are pushed to where the quantized model disagrees
most with the FP model, at two levels:
- output: the L1 distance between the two models' logits;
- intermediate: how differently the two models relate the batch's images to each other, at
  the input of every conv/linear layer both models have. Each layer's features are flattened
  per image, normalized, and their cosine-similarity matrix (N x N) is compared. ZAQ compares
  spatial and channel relation maps; a sample-relation map is used here because its size does
  not grow with the layer (an N x N matrix per layer, where a channel map of a 512-channel
  layer is 512 x 512 per image) and, like ZAQ's maps, it is blind to the scale differences
  that calibration fixes anyway.

The opponent is a toolkit's quantized model. It is matched to the FP model by module name,
which every adapter keeps for conv/linear layers (see Adapter.quantize).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from zsq_plugins.capture import plain_tensor

NORM_FLOOR = 1e-12
"""Smallest feature norm divided by (F.normalize's eps): an all-zero row relates as zeros."""


def relation_map(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every pair of images' features: (N, ...) -> (N, N).

    From the Gram matrix, divided by the norms on its diagonal: the values and gradients of
    normalizing each row first, without the full-size division whose backward pass was the
    largest single cost of an adversarial step (a fifth of it, on convnext_fmnist).
    """
    flat = features.flatten(1)
    gram = flat @ flat.T
    norms = gram.diagonal().clamp_min(NORM_FLOOR**2).sqrt()
    return gram / (norms[:, None] * norms[None, :])


def matching_layers(model: nn.Module, opponent: nn.Module) -> list[str]:
    """Names of ``model``'s conv/linear layers that ``opponent`` has under the same name."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        try:
            opponent.get_submodule(name)
        except AttributeError:
            continue
        names.append(name)
    return names


@contextlib.contextmanager
def layer_inputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Yields a dict that holds, after each forward pass, the input of every layer in
    ``names`` (a toolkit's wrapped tensor is unwrapped)."""
    store: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_: nn.Module, args: tuple) -> None:
            store[name] = plain_tensor(args[0])

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def output_discrepancy(fp_logits: torch.Tensor, opponent_logits: torch.Tensor) -> torch.Tensor:
    """L1 distance between the logits, summed over classes and averaged over the batch."""
    return (fp_logits - plain_tensor(opponent_logits)).abs().flatten(1).sum(1).mean()


def relation_discrepancy(
    fp_features: dict[str, torch.Tensor], opponent_features: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Mean squared difference of the sample-relation maps, summed over the layers."""
    total = None
    for name, features in fp_features.items():
        other = opponent_features.get(name)
        if other is None or len(features) < 2:
            continue
        term = (relation_map(features) - relation_map(other)).pow(2).mean()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total
