"""The conformance template every toolkit adapter runs (tiny models, fast)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import TinyConvNet
from zsq_plugins import QuantSpec
from zsq_plugins.adapter import ADAPTERS, QuantizerKind, get_adapter
from zsq_plugins.errors import UnknownPluginError
from zsq_plugins.quant.fakequant import fake_quantize
from zsq_plugins.quant.fold import fold_batchnorm
from zsq_plugins.zoo._layers import Normalize

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ADAPTER_NAMES = ["fx"]


class TinyReLU6Net(nn.Module):
    """Conv-BN-ReLU6, a residual add and a linear head: the patterns adapters must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize((0.5,), (0.25,))
        self.stem = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU6()
        )
        self.body = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU6()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))
        x = x + self.body(x)
        return self.fc(self.flatten(self.pool(x)))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = (
        TinyReLU6Net()
        if kind == "relu6"
        else nn.Sequential(Normalize((0.5,), (0.25,)), TinyConvNet())
    )
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def _quantize(name: str, model: nn.Module, spec: QuantSpec):
    generator = torch.Generator().manual_seed(0)
    data = [torch.rand(16, 1, 8, 8, generator=generator) for _ in range(2)]
    return get_adapter(name).quantize(model, spec, data, data[0][:2]), data


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_adapter_is_registered(name):
    assert name in ADAPTERS.names()


def test_unknown_toolkit_lists_the_known_ones():
    with pytest.raises(UnknownPluginError, match=r"available: .*fx"):
        get_adapter("aimet")


@pytest.mark.parametrize("name", ADAPTER_NAMES)
@pytest.mark.parametrize("kind", ["relu", "relu6"])
def test_spec_is_honoured(name, kind):
    model = _model(kind)
    quantized, _ = _quantize(name, model, QuantSpec(weight_bits=3, act_bits=4))
    layers = [
        n for n, m in fold_batchnorm(model).named_modules() if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    weights = {h.layer: h.bits for h in quantized.weight_handles()}
    assert sorted(weights) == sorted(layers)  # one weight quantizer per conv/linear
    first, last = layers[0], layers[-1]
    assert weights[first] == 8 and weights[last] == 8
    assert all(bits == 3 for layer, bits in weights.items() if layer not in (first, last))
    assert all(h.axis == 0 for h in quantized.weight_handles())
    acts = quantized.activation_handles()
    assert all(h.axis is None for h in acts)
    assert {h.bits for h in acts} == {4, 8}
    normalize = next(n for n, m in model.named_modules() if isinstance(m, Normalize))
    assert quantized.handle(normalize, "activation").bits == 8  # input of the first conv
    assert quantized.handle(last, "activation").bits == 8  # the logits


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_no_pre_activation_quantizer_before_relu6(name):
    quantized, _ = _quantize(name, _model("relu6"), QuantSpec(weight_bits=4, act_bits=4))
    producers = {h.layer for h in quantized.activation_handles()}
    assert "stem.0" not in producers and "stem.2" in producers


@pytest.mark.parametrize("name", ADAPTER_NAMES)
@pytest.mark.parametrize("kind", ["relu", "relu6"])
def test_switched_off_equals_folded_fp32(name, kind):
    model = _model(kind)
    quantized, data = _quantize(name, model, QuantSpec(weight_bits=4, act_bits=4))
    x = data[1]
    assert (quantized.model(x) - model(x)).abs().max() > 1e-4  # quantization is on
    for handle in quantized.handles:
        handle.set_enabled(False)
        assert not handle.enabled
    torch.testing.assert_close(quantized.model(x), fold_batchnorm(model)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_handle_round_trip_changes_output_as_the_math_says(name):
    model = _model("relu")
    quantized, data = _quantize(name, model, QuantSpec(weight_bits=4, act_bits=4))
    x = data[1]
    last = quantized.activation_handles()[-1]  # the logits' quantizer
    last.set_enabled(False)
    logits = quantized.model(x).detach()
    last.set_enabled(True)
    new_scale = last.scale() * 1.7
    last.set_scale(new_scale)
    torch.testing.assert_close(last.scale(), new_scale)
    zero = last.zero_point()
    expected = fake_quantize(logits, new_scale.flatten()[0], zero.flatten()[0].float(),
                             last.quant_min, last.quant_max)  # fmt: skip
    torch.testing.assert_close(quantized.model(x), expected, rtol=1e-5, atol=1e-6)

    weight = quantized.weight_handles()[1]
    scale = weight.scale()
    weight.set_scale(scale * 2)
    torch.testing.assert_close(weight.scale(), scale * 2)
    assert weight.kind is QuantizerKind.WEIGHT
