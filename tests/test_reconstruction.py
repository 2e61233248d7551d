"""The shared reconstruction routine on each toolkit's own model (tiny models, few steps)."""

import pytest
import torch

from tests.test_adapter_conformance import BUILT_IN, quantize, tiny_model
from zsq_plugins import QuantSpec
from zsq_plugins.adapter import get_adapter
from zsq_plugins.quant.fold import fold_batchnorm
from zsq_plugins.reconstruction.config import ReconstructionConfig
from zsq_plugins.reconstruction.routine import reconstruct

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

FAST = ReconstructionConfig(iterations=150, batch_size=16, drop_probability=0.5)
THOROUGH = FAST.replace(iterations=400)


def _error(quantized, reference, x):
    with torch.no_grad():
        return (quantized.model(x) - reference).pow(2).mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILT_IN)
def test_toolkit_model_reproduces_the_routine_and_beats_plain_calibration(name):
    model = tiny_model("relu6")
    quantized, data = quantize(name, model, QuantSpec.parse("W2A4"))
    x = torch.cat(data)
    with torch.no_grad():
        reference = fold_batchnorm(model)(x)
    plain = _error(quantized, reference, x)
    report = reconstruct(quantized, model, x, THOROUGH, progress=False)
    assert [b.name for b in report.blocks] == ["stem.0", "body.0", "fc"]
    assert all(block.fidelity <= 1e-5 for block in report.blocks), report.blocks
    assert _error(quantized, reference, x) < 0.9 * plain


def test_fx_still_converts_to_int8_after_reconstruction():
    model = tiny_model("relu6")
    quantized, data = quantize("fx", model, QuantSpec.parse("W8A8"))
    reconstruct(quantized, model, torch.cat(data), FAST.replace(iterations=20), progress=False)
    converted = get_adapter("fx").convert(quantized)
    with torch.no_grad():
        difference = (converted(data[1]) - quantized.model(data[1])).abs()
    # int8 kernels requantize after every layer, so an output may land a few levels of the
    # output quantizer away from the fake-quantized model, but rarely
    step = quantized.activation_handles()[-1].scale().item()
    assert difference.max() <= 4 * step and difference.mean() <= 0.5 * step


def test_layer_granularity_reconstructs_each_layer():
    model = tiny_model("relu")
    quantized, data = quantize("fx", model, QuantSpec.parse("W4A4"))
    config = FAST.replace(granularity="layer", iterations=20, learn_act_scales=False)
    report = reconstruct(quantized, model, torch.cat(data), config, progress=False)
    assert len(report.blocks) == len(quantized.weight_handles())
