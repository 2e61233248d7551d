"""BatchNorm folding on a torch.fx graph."""

from __future__ import annotations

import copy

import torch.fx
from torch import nn
from torch.fx.experimental.optimization import fuse

from zsq_plugins.errors import UnsupportedModelError


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """Symbolically traces ``model``, naming the operation that defeats tracing if it fails."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as error:  # fx raises TraceError, TypeError, RuntimeError... by case
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be traced by torch.fx: {type(error).__name__}: "
            f"{error}. Data-dependent control flow (an `if` or loop on tensor values) is the "
            "usual cause; move it out of forward() or wrap it in a leaf module."
        ) from error


def fold_batchnorm(model: nn.Module) -> torch.fx.GraphModule:
    """A copy of ``model`` (eval mode) with every Conv-BN pair folded into the conv.

    Module names of the original model are kept (a folded conv keeps its name; its BN is
    gone), so quantizers can be reported by the FP model's names.
    """
    model = copy.deepcopy(model).eval()
    traced = trace(model)
    return fuse(traced, inplace=True)
