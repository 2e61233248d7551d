"""BatchNorm folding on a torch.fx graph."""

from __future__ import annotations

import copy

import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from zsq_plugins.errors import UnsupportedModelError
from zsq_plugins.layers import Normalize


class ZSQTracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping input normalization as one named module in the graph."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, Normalize) or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """Symbolically traces ``model``, naming the operation that defeats tracing if it fails."""
    try:
        graph = ZSQTracer().trace(model)
        return torch.fx.GraphModule(model, graph, type(model).__name__)
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
    traced = trace(copy.deepcopy(model).eval())
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(node.args[0], torch.fx.Node):
            continue
        conv_node = node.args[0]
        if conv_node.op != "call_module" or len(conv_node.users) != 1:
            continue
        bn = traced.get_submodule(node.target)
        conv = traced.get_submodule(conv_node.target)
        if isinstance(bn, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d):
            parent_name, _, attribute = conv_node.target.rpartition(".")
            parent = traced.get_submodule(parent_name) if parent_name else traced
            setattr(parent, attribute, fuse_conv_bn_eval(conv, bn))
            node.replace_all_uses_with(conv_node)
            traced.graph.erase_node(node)
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def float_graph(model: nn.Module, fold: bool = True) -> torch.fx.GraphModule:
    """The traced copy of ``model`` every quantizer starts from: BatchNorm folded when
    ``fold`` (``QuantSpec.fold_batchnorm``); the caller's model is never modified."""
    return fold_batchnorm(model) if fold else trace(copy.deepcopy(model))
