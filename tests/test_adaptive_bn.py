"""Adaptive BN walks the model block by block: the statistics it reaches each layer with are
the ones a run from the image gives, and the images pass the stem a bounded number of times
however deep the model is."""

import pytest
import torch

from zsq_plugins import zoo
from zsq_plugins.adapter import get_adapter
from zsq_plugins.graph.block_inputs import BlockRunner
from zsq_plugins.quant.adaptive_bn import adapt_batchnorm, layer_moments
from zsq_plugins.quant.fold import fold_batchnorm
from zsq_plugins.spec import QuantSpec


@pytest.mark.parametrize("toolkit", ["fx", "brevitas"])
def test_block_walk_reaches_every_layer_as_a_run_from_the_image(toolkit):
    model = zoo.load("resnet20_fmnist")
    images = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    quantized = get_adapter(toolkit).quantize(
        model, QuantSpec.parse("W4A4"), [images[:32], images[32:]], images[:2]
    )
    stem = quantized.weight_handles()[0].layer
    seen = []
    hook = quantized.model.get_submodule(stem).register_forward_pre_hook(
        lambda _, args: seen.append(len(args[0]))
    )
    try:
        corrections = adapt_batchnorm(quantized, model, images, batch_size=8)
    finally:
        hook.remove()
    handles = quantized.weight_handles()
    assert len(corrections) == len(handles) > 20
    assert max(c.mean_gap_before for c in corrections) > 0.05  # there was something to correct
    # Run from the image to each layer, every layer now has the FP channel statistics: the
    # walk's chained block inputs were the quantized model's real ones.
    folded = fold_batchnorm(model)
    for handle in handles:
        (mean_q, std_q), (mean_fp, std_fp) = layer_moments(quantized, folded, handle, images)
        bias = quantized.model.get_submodule(handle.layer).bias.detach().double()
        scale = std_fp.clamp_min(1e-6)
        assert ((mean_q + bias - mean_fp).abs() / scale).max() < 1e-3, handle.layer
        assert ((std_q - std_fp).abs() / scale).max() < 1e-3, handle.layer
    # Running from the image to each of the 20+ layers passes every image through the stem
    # once per layer; the walk does it once, plus one image per replayed batch and one batch
    # per block's replay check.
    assert sum(seen) < len(handles) * len(images) / 3


def test_a_replay_from_given_inputs_is_checked():
    """A block whose skip connection reads a tensor from before the block's first layer
    cannot be replayed from that layer's input, even from inputs computed beforehand."""

    class Skip(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 1, 1), torch.nn.Conv2d(1, 1, 1)

        def forward(self, x):
            early = x * 2
            return self.b(self.a(early + 1)) + early

    model = Skip().eval()
    images = torch.randn(8, 1, 4, 4)
    inputs = images * 2 + 1  # the input of ``a``, computed beforehand
    runner = BlockRunner(model, "a", None, images, 4, inputs=inputs)
    assert not runner.replays
    with torch.no_grad():
        assert torch.allclose(runner(torch.arange(8)), model(images))
    sound = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(2, 1, 1))
    with torch.no_grad():
        inputs = sound[1](sound[0](images))
    runner = BlockRunner(sound.eval(), "2", None, images, 4, inputs=inputs)
    assert runner.replays
    with torch.no_grad():
        assert torch.allclose(runner.values(3), sound(images))
