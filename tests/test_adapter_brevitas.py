"""Brevitas specifics: the layout on a zoo ResNet, Brevitas' own view of the handles, zero
points, asymmetric weights, and the errors."""

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
    pytest.mark.brevitas,
    requires_package("brevitas", "brevitas"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture(scope="module")
def resnet20_w4a4():
    return quantize_resnet20("brevitas")


def test_resnet20_w4a4_layout(resnet20_w4a4):
    model, _, quantized, _ = resnet20_w4a4
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    first, last = layers[0], "fc"
    weights = {h.layer: h.bits for h in quantized.weight_handles()}
    assert sorted(weights) == sorted(layers)
    # The 8-bit layers' inputs are 8-bit too: the overflow fix gives their weights 7 bits.
    assert {layer for layer, bits in weights.items() if bits == 7} == {first, last}
    assert set(weights.values()) == {4, 7}
    acts = {h.layer: h for h in quantized.activation_handles()}
    assert acts["normalize"].bits == 8  # the first conv's input
    last_input = quantized.model.get_submodule(last).input_quant
    assert next(h for h in acts.values() if h.module is last_input).bits == 8
    assert sum(h.bits == 8 for h in acts.values()) == 2
    assert all(h.bits == 4 for h in acts.values() if h.layer not in ("normalize", "flatten"))
    # ReLU outputs are quantized unsigned with zero point 0, the normalized image with one.
    assert acts["stem.2"].quant_min == 0 and float(acts["stem.2"].zero_point()) == 0
    assert acts["normalize"].quant_min == 0 and float(acts["normalize"].zero_point()) > 0


def test_layers_reading_one_tensor_share_one_quantizer(resnet20_w4a4):
    _, _, quantized, _ = resnet20_w4a4
    readers: dict[int, list[str]] = {}
    for name, module in quantized.model.named_modules():
        if hasattr(module, "input_quant"):
            readers.setdefault(id(module.input_quant), []).append(name)
    assert any(len(names) == 2 for names in readers.values())  # conv1 + projection shortcut
    assert len(quantized.activation_handles()) == len(readers)
    layers = [h.layer for h in quantized.activation_handles()]
    assert len(layers) == len(set(layers))


def test_the_users_model_is_left_untouched(resnet20_w4a4):
    model, original, quantized, data = resnet20_w4a4
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(type(m).__module__.startswith("brevitas") for m in model.modules())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0)
    for handle in quantized.handles:
        handle.set_enabled(False)
    try:
        with torch.no_grad():
            torch.testing.assert_close(quantized.model(data[1]), model(data[1]))
    finally:
        for handle in quantized.handles:
            handle.set_enabled(True)


def test_handles_agree_with_brevitas_own_view():
    quantized, _ = quantize("brevitas", tiny_model("relu6"), QuantSpec.parse("W4A4"))
    layer = quantized.model.get_submodule("body.0")
    weight = quantized.handle("body.0", QuantizerKind.WEIGHT)
    torch.testing.assert_close(layer.quant_weight().scale.flatten(), weight.scale())
    assert (weight.quant_min, weight.quant_max) == (-8, 7)  # the spec's full grid
    assert int(layer.quant_weight().bit_width) == weight.bits == 4
    act = quantized.handle("stem.2", QuantizerKind.ACTIVATION)
    assert act.module is layer.input_quant
    torch.testing.assert_close(layer.input_quant.scale().flatten(), act.scale())
    scaling = layer.input_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl
    assert isinstance(scaling.value, nn.Parameter)  # a stored scale, not recomputed


def test_narrow_range_is_brevitas_own_default_grid():
    spec = QuantSpec(weight_bits=4, act_bits=4, weight_narrow_range=True)
    quantized, _ = quantize("brevitas", tiny_model("relu6"), spec)
    tensor_quant = quantized.model.get_submodule("body.0").weight_quant.tensor_quant
    assert tensor_quant.int_quant.narrow_range
    weight = quantized.handle("body.0", QuantizerKind.WEIGHT)
    assert (weight.quant_min, weight.quant_max) == (-7, 7)


def test_zero_point_round_trip_and_a_new_scale_keeps_it():
    quantized, data = quantize("brevitas", tiny_model("relu"), QuantSpec.parse("W4A4"))
    handle = quantized.handle("0", QuantizerKind.ACTIVATION)  # the normalized image
    handle.set_zero_point(torch.tensor([100.0]))
    assert float(handle.zero_point()) == 100
    handle.set_scale(handle.scale() * 1.3)
    assert float(handle.zero_point()) == 100
    x, y = _through(handle, lambda: quantized.model(data[1]))
    torch.testing.assert_close(y, _expected(handle, x), rtol=1e-5, atol=1e-6)
    unsigned = quantized.handle("1.relu1", QuantizerKind.ACTIVATION)
    with pytest.raises(ValueError, match="no zero point"):
        unsigned.set_zero_point(torch.tensor([3.0]))


def test_asymmetric_weights_have_zero_points_and_switch_off():
    model = tiny_model("relu")
    spec = QuantSpec(weight_bits=4, act_bits=4, weight_symmetry="asymmetric")
    quantized, data = quantize("brevitas", model, spec)
    handle = quantized.handle("1.conv2", QuantizerKind.WEIGHT)
    assert (handle.quant_min, handle.quant_max) == (0, 15)
    assert bool((handle.zero_point() > 0).all())
    x, y = _through(handle, lambda: quantized.model(data[1]))
    torch.testing.assert_close(y, _expected(handle, x), rtol=1e-5, atol=1e-6)
    for h in quantized.handles:
        h.set_enabled(False)
    with torch.no_grad():
        torch.testing.assert_close(quantized.model(data[1]), fold_batchnorm(model)(data[1]))


def test_errors():
    adapter = get_adapter("brevitas")
    model, x = tiny_model("relu"), torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="no batch"):
        adapter.quantize(model, QuantSpec(), [], x)
    with pytest.raises(ValueError, match="per tensor"):
        adapter.quantize(model, QuantSpec(act_granularity="per_channel"), [x], x)


def test_layers_inside_modules_fx_keeps_whole_stay_float_as_in_fx():
    """nn.TransformerEncoder is one node for torch.fx: its linears (and nn.MultiheadAttention's
    out_proj, whose weight the functional forward reads without calling it) stay float, so
    Brevitas quantizes the same layers as fx instead of failing on them."""
    from zsq_plugins import apply
    from zsq_plugins.testing_models import TinyViT

    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    layers = {}
    for toolkit in ("brevitas", "fx"):
        _, report = apply(TinyViT().eval(), toolkit, "W8A8", data=x, progress=False)
        layers[toolkit] = sorted(h.layer for h in report.quantized.weight_handles())
    assert layers["brevitas"] == layers["fx"] == ["head", "patch"]
