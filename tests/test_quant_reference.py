import dataclasses

import pytest
import torch
from torch import nn

from tests.conftest import TinyConvNet
from zsq_plugins import QuantSpec
from zsq_plugins.errors import UnsupportedModelError
from zsq_plugins.quant.fakequant import affine_params, fake_quantize, mse_clip_range
from zsq_plugins.quant.fold import fold_batchnorm
from zsq_plugins.quant.reference import (
    InputQuantizer,
    activation_ranges,
    quantizable_layers,
    reference_quantize,
)


@pytest.fixture
def trained_bn_model():
    torch.manual_seed(0)
    model = TinyConvNet()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_fold_batchnorm_keeps_outputs_and_names(trained_bn_model):
    folded = fold_batchnorm(trained_bn_model)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(folded(x), trained_bn_model(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert [name for name, _ in quantizable_layers(folded)] == ["conv1", "conv2", "fc"]
    assert any(isinstance(m, nn.BatchNorm2d) for m in trained_bn_model.modules())  # a copy


def test_untraceable_model_names_the_problem():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(UnsupportedModelError, match=r"cannot be traced by torch\.fx"):
        fold_batchnorm(Branchy())


def test_affine_params_and_fake_quantize_grid():
    scale, zero, qmin, qmax = affine_params(torch.tensor(-1.0), torch.tensor(3.0), 4, False)
    assert (qmin, qmax) == (0, 15)
    assert scale.item() == pytest.approx(4 / 15)
    x = torch.linspace(-2, 4, 101)
    q = fake_quantize(x, scale, zero, qmin, qmax)
    assert len(torch.unique(q)) <= 16
    # The integer zero point moves the grid by at most one step.
    assert -1.0 - scale <= q.min() <= -1.0 + 1e-5 and 3.0 - scale <= q.max() <= 3.0 + scale
    scale, zero, qmin, qmax = affine_params(torch.tensor(-0.5), torch.tensor(2.0), 8, True)
    assert (qmin, qmax, zero.item()) == (-128, 127, 0.0)
    assert scale.item() == pytest.approx(2.0 / 127)


def test_mse_search_clips_outliers():
    torch.manual_seed(0)
    values = torch.cat([torch.rand(10000), torch.tensor([20.0])])
    low, high = mse_clip_range(values, 4, symmetric=False)
    assert high < 10.0

    def error(lo, hi):
        scale, zero, qmin, qmax = affine_params(torch.as_tensor(lo), torch.as_tensor(hi), 4, False)
        return (fake_quantize(values, scale, zero, qmin, qmax) - values).pow(2).mean()

    assert error(low, high) < 0.5 * error(values.min(), values.max())


def test_reference_quantize_honours_the_spec(trained_bn_model):
    x = torch.rand(64, 1, 8, 8)
    spec = QuantSpec(weight_bits=3, act_bits=4)
    quantized = reference_quantize(trained_bn_model, spec, x)
    quantizers = {n: m for n, m in quantized.named_modules() if isinstance(m, InputQuantizer)}
    assert {n: q.bits for n, q in quantizers.items()} == {
        "conv1.input_quantizer": 8,
        "conv2.input_quantizer": 4,
        "fc.input_quantizer": 8,
    }
    levels = [len(torch.unique(row)) for row in quantized.conv2.weight.detach().flatten(1)]
    assert max(levels) <= 2**3
    # the first conv's weights and input are 8-bit: the overflow fix gives its weights 7 bits
    for variant, bits in ((spec, 7), (dataclasses.replace(spec, overflow_fix=False), 8)):
        conv1 = reference_quantize(trained_bn_model, variant, x).conv1.weight.detach()
        steps = conv1.flatten(1).abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        integers = conv1.flatten(1) / steps
        assert torch.allclose(integers, integers.round(), atol=1e-3)  # on the b-bit grid
    reference = trained_bn_model(x)
    errors = {}
    for label in ("W8A8", "W4A4", "W2A4"):
        q = reference_quantize(trained_bn_model, QuantSpec.parse(label), x)
        errors[label] = (q(x) - reference).pow(2).mean().item()
    assert errors["W8A8"] < errors["W4A4"] < errors["W2A4"]


def test_activation_ranges_cover_the_data(trained_bn_model):
    ranges = activation_ranges(trained_bn_model, torch.rand(8, 1, 8, 8))
    assert list(ranges) == ["conv1", "conv2", "fc"]
    assert 0.0 <= ranges["conv1"][0] < ranges["conv1"][1] <= 1.0
    assert ranges["conv2"][0] >= 0.0  # after ReLU
