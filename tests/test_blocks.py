import pytest
from torch import nn

from zsq_plugins import zoo
from zsq_plugins.graph.blocks import BlockKind, find_blocks, output_points
from zsq_plugins.quant.fold import fold_batchnorm
from zsq_plugins.zoo.architectures import ARCHITECTURES
from zsq_plugins.zoo.vit import SelfAttention


def _graph(name: str):
    return fold_batchnorm(zoo.card(name).build())


def _layers(graph) -> list[str]:
    return [
        str(n.target)
        for n in graph.graph.nodes
        if n.op == "call_module"
        and isinstance(graph.get_submodule(n.target), nn.Conv2d | nn.Linear)
    ]


@pytest.mark.parametrize(
    "name", ["resnet20_fmnist", "mobilenetv2_fmnist", "vgg_nobn_fmnist", "efficientnet_lite0"]
)
def test_every_layer_is_in_exactly_one_block_in_order(name):
    graph = _graph(name)
    blocks = find_blocks(graph)
    flat = [layer for block in blocks for layer in block.layers]
    assert flat == _layers(graph)
    assert len({b.name for b in blocks}) == len(blocks)  # unique names
    assert blocks[-1].kind is BlockKind.HEAD


def test_resnet20_blocks_are_its_basic_blocks():
    blocks = find_blocks(_graph("resnet20_fmnist"))
    residual = [b for b in blocks if b.kind is BlockKind.RESIDUAL]
    assert [b.name for b in residual] == [f"stages.{s}.{i}" for s in range(3) for i in range(3)]
    assert residual[3].layers == (
        "stages.1.0.conv1.0", "stages.1.0.conv2.0", "stages.1.0.shortcut.0",
    )  # fmt: skip
    assert "stages.0.0.relu" in residual[0].nodes[-1].replace("_", ".")  # the activation after
    assert blocks[0].layers == ("stem.0",) and blocks[-1].layers == ("fc",)


def test_plain_network_is_cut_at_pooling():
    blocks = find_blocks(_graph("vgg_nobn_fmnist"))
    assert [b.kind for b in blocks] == [BlockKind.CHAIN] * 3 + [BlockKind.HEAD]
    assert [len(b.layers) for b in blocks] == [2, 2, 2, 2]


def test_layer_granularity_and_user_predicate():
    graph = _graph("resnet20_fmnist")
    layers = find_blocks(graph, granularity="layer")
    assert [b.layers for b in layers] == [(name,) for name in _layers(graph)]
    stages = find_blocks(graph, predicate=lambda module, name: name in {"stages.0", "stages.1"})
    assert [b.kind for b in stages[1:3]] == [BlockKind.USER, BlockKind.USER]
    assert len(stages[1].layers) == 6 and len(stages[2].layers) == 7
    assert [b.kind for b in stages[3:6]] == [BlockKind.RESIDUAL] * 3  # stages.2 is unaffected


@pytest.mark.parametrize("name", ["resnet20_fmnist", "mobilenetv2_fmnist", "vgg_nobn_fmnist"])
def test_block_by_block_the_output_point_is_the_next_block(name):
    graph = _graph(name)
    blocks = find_blocks(graph)
    assert output_points(graph, blocks) == [b.layers[0] for b in blocks[1:]] + [None]


def test_layer_by_layer_the_output_point_is_a_layer_that_reads_it():
    graph = _graph("resnet20_fmnist")
    layers = find_blocks(graph, granularity="layer")
    points = dict(zip((b.layers[0] for b in layers), output_points(graph, layers), strict=True))
    # The projection shortcut runs after conv2 but reads the block's input, not conv2's output.
    assert points["stages.1.0.conv1.0"] == "stages.1.0.conv2.0"
    assert points["stages.1.0.conv2.0"] == "stages.1.1.conv1.0"
    assert points["stages.1.0.shortcut.0"] == "stages.1.1.conv1.0"
    assert points["fc"] is None


def _architecture(name: str):
    return fold_batchnorm(ARCHITECTURES[name]().eval())


def test_a_vision_transformer_gives_one_block_per_encoder_layer():
    graph = _architecture("vit_fmnist")
    blocks = find_blocks(graph)
    layers = [b for b in blocks if b.kind is BlockKind.TRANSFORMER]
    assert [b.name for b in layers] == [f"layers.{i}" for i in range(6)]
    assert layers[0].layers == tuple(
        f"layers.0.{name}"
        for name in ("attn.query", "attn.key", "attn.value", "attn.proj", "fc1", "fc2")
    )
    assert [b.kind for b in (blocks[0], blocks[-1])] == [BlockKind.CHAIN, BlockKind.HEAD]
    assert [layer for b in blocks for layer in b.layers] == _layers(graph)
    assert output_points(graph, blocks) == [b.layers[0] for b in blocks[1:]] + [None]


def test_a_post_norm_encoder_layer_keeps_its_norm_inside_the_block():
    class PostNorm(nn.Module):
        def __init__(self, width: int = 16) -> None:
            super().__init__()
            self.attn = SelfAttention(width, 2)
            self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
            self.head = nn.Linear(width, 3)

        def forward(self, x):
            x = self.norm1(x + self.attn(x))
            x = self.norm2(x + self.fc2(self.fc1(x).relu()))
            return self.head(x.mean(1))

    graph = fold_batchnorm(PostNorm().eval())
    blocks = find_blocks(graph)
    assert [b.kind for b in blocks] == [BlockKind.TRANSFORMER, BlockKind.HEAD]
    assert "norm1" in blocks[0].nodes and len(blocks[0].layers) == 6


def test_a_convnext_block_is_one_residual_block():
    blocks = find_blocks(_architecture("convnext_fmnist"))
    residual = [b for b in blocks if b.kind is BlockKind.RESIDUAL]
    assert [b.name for b in residual] == ["stages.0.0", "stages.0.1", "stages.2.0", "stages.2.1"]
    assert residual[0].layers == tuple(
        f"stages.0.0.{name}" for name in ("dwconv", "pwconv1", "pwconv2")
    )
    assert [b.kind for b in blocks].count(BlockKind.TRANSFORMER) == 0
