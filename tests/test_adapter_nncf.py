"""NNCF specifics: the layout on a zoo ResNet, min-max calibration over every batch, zero
points on NNCF's asymmetric quantizers, a top-level nn.Sequential, and the errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import requires_package
from tests.test_adapter_conformance import (
    _expected,
    _through,
    quantize,
    quantize_resnet20,
    tiny_model,
)
from zsq_plugins import QuantSpec
from zsq_plugins.adapter import QuantizerKind, get_adapter
from zsq_plugins.quant.fold import fold_batchnorm

pytestmark = [
    pytest.mark.nncf,
    requires_package("nncf", "nncf"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture(scope="module")
def resnet20_w4a4():
    return quantize_resnet20("nncf")


def test_resnet20_w4a4_layout(resnet20_w4a4):
    model, original, quantized, _ = resnet20_w4a4
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    weights = {h.layer: h for h in quantized.weight_handles()}
    assert sorted(weights) == sorted(layers)  # FP module names, one quantizer per layer
    # The 8-bit layers' inputs are 8-bit too: the overflow fix gives their weights 7 bits.
    assert {layer for layer, h in weights.items() if h.bits == 7} == {"stem.0", "fc"}
    assert (weights["fc"].quant_min, weights["fc"].quant_max) == (-64, 63)
    assert all(h.bits == 4 and (h.quant_min, h.quant_max) == (-8, 7) for h in weights.values()
               if h.layer not in ("stem.0", "fc"))  # fmt: skip
    acts = {h.layer: h for h in quantized.activation_handles()}
    # 8 bits: the first conv's input (the normalized image) and the pooled features the last
    # linear reads (through flatten); every other activation quantizer has 4.
    assert {layer for layer, h in acts.items() if h.bits == 8} == {"normalize", "pool"}
    assert {h.bits for h in acts.values()} == {4, 8}
    # ReLU outputs are quantized unsigned with zero point 0, the normalized image with one.
    assert acts["stem.2"].quant_min == 0 and int(acts["stem.2"].zero_point()) == 0
    assert int(acts["normalize"].zero_point()) > 0
    # What each activation quantizer feeds: the pooled features reach fc through flatten; a
    # block's first ReLU feeds its second conv; a residual branch before its addition, and
    # the last ReLU (re-quantized after pooling), feed no layer.
    assert acts["pool"].feeds == {"fc"}
    assert acts["stages.0.0.conv1.2"].feeds == {"stages.0.0.conv2.0"}
    assert acts["stages.0.0.conv2.0"].feeds == frozenset()
    assert acts["stages.2.2.relu"].feeds == frozenset()
    assert acts["stages.1.0.relu"].feeds >= {"stages.1.1.conv1.0"}
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # untouched


def test_resnet20_switched_off_is_the_folded_model(resnet20_w4a4):
    model, _, quantized, data = resnet20_w4a4
    for handle in quantized.handles:
        handle.set_enabled(False)
    try:
        with torch.no_grad():
            torch.testing.assert_close(quantized.model(data[1]), fold_batchnorm(model)(data[1]))
    finally:
        for handle in quantized.handles:
            handle.set_enabled(True)


def test_calibration_takes_global_min_max_over_every_batch():
    narrow = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    wide = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = tiny_model("relu")
    quantized = get_adapter("nncf").quantize(model, QuantSpec(), [narrow, wide], narrow[:2])
    assert quantized.report["calibration_batches"] == 2
    handle = quantized.handle("0", QuantizerKind.ACTIVATION)  # the normalized input
    normalized = model[0](torch.cat([narrow, wide]))
    step, zero_point = handle.scale(), handle.zero_point().float()
    low, high = -zero_point * step, (handle.quant_max - zero_point) * step
    assert low <= normalized.min() and high >= normalized.max()
    assert (normalized.min() - low) < step and (high - normalized.max()) < step


def test_asymmetric_zero_point_round_trip():
    quantized, data = quantize("nncf", tiny_model("relu6"), QuantSpec(weight_bits=4, act_bits=4))
    handle = quantized.handle("normalize", QuantizerKind.ACTIVATION)
    assert handle.axis is None and (handle.quant_min, handle.quant_max) == (0, 255)
    handle.set_zero_point(torch.tensor([100.0]))
    handle.set_scale(torch.tensor([0.02]))
    assert int(handle.zero_point()) == 100
    torch.testing.assert_close(handle.scale(), torch.tensor([0.02]))

    def run():
        with torch.no_grad():
            quantized.model(data[1])

    x, y = _through(handle, run)
    torch.testing.assert_close(y, _expected(handle, x), rtol=1e-5, atol=1e-6)
    assert y.min() >= -100 * 0.02 - 1e-6 and y.max() <= 155 * 0.02 + 1e-6


def test_zero_points_nncf_cannot_hold_are_refused():
    quantized, _ = quantize("nncf", tiny_model("relu"), QuantSpec.parse("W4A4"))
    weight = quantized.weight_handles()[0]
    weight.set_zero_point(torch.zeros(4))  # symmetric: 0 is the only zero point
    with pytest.raises(ValueError, match="zero point is 0"):
        weight.set_zero_point(torch.ones(4))
    act = quantized.activation_handles()[1]
    with pytest.raises(ValueError, match="inside the range"):
        act.set_zero_point(torch.tensor([-3.0]))


def test_top_level_sequential_keeps_its_names_and_class():
    model = tiny_model("relu")  # nn.Sequential(Normalize, TinyConvNet)
    quantized, _ = quantize("nncf", model, QuantSpec.parse("W8A8"))
    assert isinstance(quantized.model, nn.Sequential)
    assert {h.layer for h in quantized.weight_handles()} == {"1.conv1", "1.conv2", "1.fc"}
    assert type(model) is nn.Sequential  # the user's model is left as it was


def test_errors():
    adapter, model, x = get_adapter("nncf"), tiny_model("relu"), torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="no batch"):
        adapter.quantize(model, QuantSpec(), iter([]), x)
    with pytest.raises(ValueError, match="per_tensor"):
        adapter.quantize(model, QuantSpec(act_granularity="per_channel"), [x], x)


def test_layer_norm_models_quantize_with_their_norms_left_float():
    """NNCF 3.4 fails on LayerNorm's 1-D weight (a per-channel quantizer filled with a
    per-tensor statistic); the adapter leaves layer norms float, as torch.ao does, and a
    ConvNeXt-style model quantizes, close to FP32 at W8A8."""
    from zsq_plugins import apply
    from zsq_plugins.testing_models import TinyConvNeXt

    model = TinyConvNeXt().eval()
    x = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    quantized, report = apply(model, "nncf", "W8A8", data=x, progress=False)
    with torch.no_grad():
        error = (quantized(x) - model(x)).norm() / model(x).norm()
    assert error < 0.05, float(error)
    assert len(report.quantized.weight_handles()) == 8  # every conv and linear


def test_multihead_attention_is_refused_before_any_work():
    from zsq_plugins import apply
    from zsq_plugins.errors import UnsupportedModelError
    from zsq_plugins.testing_models import TinyViT

    with pytest.raises(UnsupportedModelError, match=r"nn.MultiheadAttention.*fx, pt2e"):
        apply(TinyViT().eval(), "nncf", "W8A8", data=torch.rand(4, 1, 16, 16), progress=False)
