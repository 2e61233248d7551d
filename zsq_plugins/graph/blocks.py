"""Reconstruction blocks found from the model's torch.fx graph, never from class names.

- residual blocks: everything between an addition's fork point (the latest node both of its
  operands depend on) and the addition, plus an activation applied right after it (ResNet's
  basic block, MobileNetV2's inverted residual, ConvNeXt's block);
- transformer encoder layers: a residual block holding attention (a softmax) and the residual
  block forked from its sum (the feed-forward), as one block;
- plain chains: the conv/linear layers outside residual blocks, split where the signal is
  pooled or flattened (VGG's stages; MobileNetV2's non-residual inverted residuals);
- the classifier head: the linear layers after the last pooling/flatten.
A ``predicate(module, name)`` makes every matching module one block instead (a user's own
notion of a block); ``granularity="layer"`` gives one block per conv/linear (AdaRound).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from enum import Enum

import torch
import torch.fx
from torch import nn

ADDITIONS = (operator.add, torch.add, operator.iadd)
SPLITTING_MODULES = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
)  # fmt: skip
SPLITTING_FUNCTIONS = (
    torch.flatten, nn.functional.max_pool2d, nn.functional.avg_pool2d,
    nn.functional.adaptive_avg_pool2d, nn.functional.adaptive_max_pool2d,
)  # fmt: skip
SPLITTING_METHODS = ("flatten", "view", "reshape", "mean")
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.SiLU, nn.GELU)

BlockPredicate = Callable[[nn.Module, str], bool]

MAX_CHAIN_LAYERS = 3
"""A plain chain longer than this is cut into pieces of this many layers: an inverted
residual's expand-depthwise-project, or a VGG stage's convolutions, stay together."""


class Granularity(str, Enum):
    BLOCK = "block"
    LAYER = "layer"


class BlockKind(str, Enum):
    RESIDUAL = "residual"
    TRANSFORMER = "transformer"
    CHAIN = "chain"
    HEAD = "head"
    LAYER = "layer"
    USER = "user"


@dataclasses.dataclass(frozen=True)
class Block:
    name: str
    kind: BlockKind
    layers: tuple[str, ...]
    """Names of the conv/linear modules inside, in execution order."""
    nodes: tuple[str, ...]
    """Names of the fx nodes inside, in execution order."""


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)


def _is_addition(node: torch.fx.Node) -> bool:
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if len(tensors) != 2:
        return False
    if node.op == "call_function":
        return node.target in ADDITIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def _is_softmax(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Softmax)
    if node.op == "call_function":
        return node.target in (torch.softmax, nn.functional.softmax)
    return node.op == "call_method" and node.target == "softmax"


def _encoder_layers(
    blocks: list[tuple[BlockKind, list[torch.fx.Node]]],
    forks: dict[int, torch.fx.Node],
    modules: dict[str, nn.Module],
) -> list[tuple[BlockKind, list[torch.fx.Node]]]:
    """Merges each attention residual with the residual forked from its sum (a pre-norm
    encoder layer's feed-forward) or from the norm of its sum (post-norm), in the order the
    blocks were found."""
    attends = [any(_is_softmax(n, modules) for n in members) for _, members in blocks]
    merged: list[tuple[BlockKind, list[torch.fx.Node]]] = []
    index = 0
    while index < len(blocks):
        kind, members = blocks[index]
        follower = index + 1
        fork = forks.get(follower)
        between = (
            [fork] if fork is not None and fork.op == "call_module"
            and isinstance(modules[fork.target], nn.LayerNorm)
            and fork.all_input_nodes == [members[-1]] else []
        )  # fmt: skip
        if (
            kind is BlockKind.RESIDUAL and attends[index] and follower < len(blocks)
            and blocks[follower][0] is BlockKind.RESIDUAL and not attends[follower]
            and (fork is members[-1] or between)
        ):  # fmt: skip
            merged.append((BlockKind.TRANSFORMER, members + between + blocks[follower][1]))
            index += 2
            continue
        merged.append((kind, members))
        index += 1
    return merged


def _splits(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], SPLITTING_MODULES)
    if node.op == "call_function":
        return node.target in SPLITTING_FUNCTIONS
    return node.op == "call_method" and node.target in SPLITTING_METHODS


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _common_name(names: list[str]) -> str:
    parts = [name.split(".") for name in names]
    prefix = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        prefix.append(pieces[0])
    return ".".join(prefix)


def _make(kind: BlockKind, nodes: list[torch.fx.Node], modules: dict[str, nn.Module]) -> Block:
    layers = [
        str(n.target) for n in nodes if n.op == "call_module" and _is_layer(modules[n.target])
    ]
    name = _common_name(layers) or (layers[0] if layers else nodes[0].name)
    return Block(name, kind, tuple(layers), tuple(n.name for n in nodes))


def _cut(members: list[torch.fx.Node], layer_nodes: set[torch.fx.Node], size: int) -> list[list]:
    """Cuts a chain after every ``size``-th layer (trailing non-layer nodes stay attached)."""
    pieces: list[list[torch.fx.Node]] = [[]]
    count = 0
    for node in members:
        if node in layer_nodes and count == size:
            pieces.append([])
            count = 0
        pieces[-1].append(node)
        count += node in layer_nodes
    return pieces


def _unique_names(blocks: list[Block]) -> list[Block]:
    counts: dict[str, int] = {}
    for block in blocks:
        counts[block.name] = counts.get(block.name, 0) + 1
    return [
        dataclasses.replace(block, name=f"{block.layers[0]}..{block.layers[-1]}")
        if counts[block.name] > 1 and block.layers
        else block
        for block in blocks
    ]


def output_points(graph_module: torch.fx.GraphModule, blocks: list[Block]) -> list[str | None]:
    """Where each block's output is compared with the FP model's: the input of the first later
    block's first layer that depends on the block (None: the model's output). In execution
    order the next block is not always that one: layer by layer, a residual block's projection
    shortcut runs after its second conv but reads the block's input, so the second conv's
    output would be compared at a tensor it does not change."""
    nodes = list(graph_module.graph.nodes)
    by_name = {node.name: node for node in nodes}
    layer_node = {str(node.target): node for node in nodes if node.op == "call_module"}
    # What each block's first layer reads, traversed once per block rather than once per pair.
    reads = [_ancestors(layer_node[b.layers[0]]) if b.layers else set() for b in blocks]
    points: list[str | None] = []
    for index, block in enumerate(blocks):
        last = by_name[block.nodes[-1]]
        later = (j for j in range(index + 1, len(blocks)) if last in reads[j])
        points.append(next((blocks[j].layers[0] for j in later), None))
    return points


def find_blocks(
    graph_module: torch.fx.GraphModule,
    granularity: Granularity | str = Granularity.BLOCK,
    predicate: BlockPredicate | None = None,
    max_chain_layers: int = MAX_CHAIN_LAYERS,
) -> list[Block]:
    """Reconstruction blocks of a (BN-folded) traced model, in execution order."""
    modules = dict(graph_module.named_modules())
    order = list(graph_module.graph.nodes)
    position = {node: index for index, node in enumerate(order)}
    layer_nodes = [n for n in order if n.op == "call_module" and _is_layer(modules[n.target])]
    if Granularity(granularity) is Granularity.LAYER:
        return [_make(BlockKind.LAYER, [n], modules) for n in layer_nodes]

    owner: dict[torch.fx.Node, int] = {}  # node -> index of the block that holds it
    blocks: list[tuple[BlockKind, list[torch.fx.Node]]] = []
    forks: dict[int, torch.fx.Node] = {}  # residual block index -> its fork point

    if predicate is not None:
        for name, module in graph_module.named_modules():
            if not name or not predicate(module, name):
                continue
            inside = [n for n in layer_nodes if str(n.target).startswith(name + ".")
                      or str(n.target) == name]  # fmt: skip
            inside = [n for n in inside if n not in owner]
            if inside:
                first, last = position[inside[0]], position[inside[-1]]
                members = [n for n in order[first : last + 1] if n not in owner]
                for node in members:
                    owner[node] = len(blocks)
                blocks.append((BlockKind.USER, members))

    for node in order:
        if not _is_addition(node) or node in owner:
            continue
        left, right = (a for a in node.args if isinstance(a, torch.fx.Node))
        common = (_ancestors(left) | {left}) & (_ancestors(right) | {right})
        if not common:
            continue
        fork = max(common, key=position.__getitem__)
        members = order[position[fork] + 1 : position[node] + 1]
        users = list(node.users)
        if (
            len(users) == 1
            and users[0].op == "call_module"
            and isinstance(modules[users[0].target], ACTIVATIONS)
        ):
            members.append(users[0])
        if any(m in owner for m in members):
            continue  # nested in a user block
        for member in members:
            owner[member] = len(blocks)
        forks[len(blocks)] = fork
        blocks.append((BlockKind.RESIDUAL, members))
    blocks = _encoder_layers(blocks, forks, modules)
    owner = {node: index for index, (_, members) in enumerate(blocks) for node in members}

    # Plain chains: runs of unowned nodes holding layers, split at pooling/flattening.
    last_split = max((position[n] for n in order if _splits(n, modules)), default=-1)
    current: list[torch.fx.Node] = []

    layer_set = set(layer_nodes)

    def close(kind: BlockKind) -> None:
        if any(n in layer_set for n in current):
            for piece in _cut(current, layer_set, max_chain_layers):
                for member in piece:
                    owner[member] = len(blocks)
                blocks.append((kind, piece))
        current.clear()

    for node in order:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node in owner:
            close(BlockKind.CHAIN)
            continue
        if _splits(node, modules):
            close(BlockKind.CHAIN)
            continue
        current.append(node)
        if position[node] > last_split and node is order[-2]:
            break
    close(BlockKind.HEAD if current and position[current[0]] > last_split else BlockKind.CHAIN)

    blocks.sort(key=lambda item: position[item[1][0]])
    result = []
    for kind, members in blocks:
        if kind is BlockKind.CHAIN and all(position[m] > last_split for m in members):
            kind = BlockKind.HEAD
        result.append(_make(kind, members, modules))
    return _unique_names(result)
