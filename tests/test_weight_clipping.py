"""The per-channel weight-step search that reconstruction can start from."""

import pytest
import torch

from tests.test_adapter_conformance import BUILT_IN, quantize, tiny_model
from zsq_plugins import QuantSpec
from zsq_plugins.capture import float_weights
from zsq_plugins.errors import ZSQError
from zsq_plugins.quant.fakequant import fake_quantize
from zsq_plugins.quant.weight_clipping import (
    WEIGHT_ERROR_NORM,
    init_weight_steps,
    search_weight_scale,
)
from zsq_plugins.testing import assert_quantizes_like, quantizer_io

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def _channel_errors(weight, scale, zero_point, qmin, qmax):
    quantized = fake_quantize(weight, scale, zero_point, qmin, qmax, axis=0)
    return (quantized - weight).abs().pow(WEIGHT_ERROR_NORM).flatten(1).sum(1)


def _min_max_steps(weight, qmax):
    return weight.abs().flatten(1).amax(1) / qmax


def test_search_lowers_every_channels_error_at_low_bits():
    weight = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    qmin, qmax = -2, 1  # 2 bits, full signed grid
    old = _min_max_steps(weight, 2)
    zero = torch.zeros(16)
    scale, changed, before, after = search_weight_scale(weight, old, zero, qmin, qmax, axis=0)
    assert scale.shape == old.shape
    old_errors = _channel_errors(weight, old, zero, qmin, qmax)
    new_errors = _channel_errors(weight, scale, zero, qmin, qmax)
    # min-max is far from the error optimum at 2 bits on Gaussian weights: most channels move,
    # each one that moves gets a lower error, and none gets a higher one
    assert changed >= 12
    assert int((new_errors < old_errors).sum()) == changed
    assert (new_errors <= old_errors).all()
    assert after == pytest.approx(float(new_errors.sum()), rel=1e-5)
    assert before == pytest.approx(float(old_errors.sum()), rel=1e-5)
    # a found step is the best of its own candidates: searching again changes nothing
    again = search_weight_scale(weight, scale, zero, qmin, qmax, axis=0)
    assert again[1] == 0
    torch.testing.assert_close(again[0], scale)


def test_search_keeps_a_step_that_is_already_better():
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    qmin, qmax = -8, 7
    zero = torch.zeros(4)
    covering = torch.maximum(weight.amax(1) / qmax, weight.amin(1) / qmin)
    # a finer search over a grid of ratios that contains the 80 candidates: its optimum is at
    # least as good as each of them, so the search must keep it (a tie keeps the toolkit's)
    ratios = [1.0 - i / 2000 for i in range(1600)]
    errors = torch.stack([_channel_errors(weight, covering * r, zero, qmin, qmax) for r in ratios])
    fine = covering * torch.tensor(ratios)[errors.argmin(0)]
    kept, changed, before, after = search_weight_scale(weight, fine, zero, qmin, qmax, axis=0)
    assert changed == 0 and before == after
    torch.testing.assert_close(kept, fine, rtol=0, atol=0)
    # and a worse step (the covering one) is replaced
    assert search_weight_scale(weight, covering * 1.2, zero, qmin, qmax, axis=0)[1] == 4


def test_search_per_tensor_and_asymmetric_grids():
    weight = torch.rand(6, 10, generator=torch.Generator().manual_seed(2)) - 0.2
    # per tensor: one step for the whole weight
    old = weight.abs().max().reshape(1) / 7
    scale, _, before, after = search_weight_scale(weight, old, torch.zeros(1), -8, 7, axis=None)
    assert scale.shape == (1,) and after < before
    # an unsigned grid with a zero point: the zero point is kept and every candidate covers
    # the range from it, so the search still never does worse than min-max
    zero = torch.full((6,), 3.0)
    old = (weight.amax(1) - weight.amin(1)) / 15
    scale, _, before, after = search_weight_scale(weight, old, zero, 0, 15, axis=0)
    assert (scale > 0).all() and after <= before


@pytest.mark.parametrize("name", BUILT_IN)
def test_toolkit_quantizers_apply_the_searched_steps(name):
    model = tiny_model("relu6")
    quantized, data = quantize(name, model, QuantSpec.parse("W2A4"))
    handles = quantized.weight_handles()
    before = [h.scale().clone() for h in handles]
    results = init_weight_steps(quantized, data[0])
    assert [r.layer for r in results] == [h.layer for h in handles]
    assert all(r.error_after < r.error_before for r in results), results
    assert any(not torch.equal(h.scale(), old) for h, old in zip(handles, before, strict=True))

    def run() -> None:
        with torch.no_grad():
            quantized.model(data[0])

    # the toolkit's own weight quantizers now quantize with the searched steps
    for handle in handles:
        weight, output = quantizer_io(handle, run)
        assert_quantizes_like(handle, weight, output)


def test_non_finite_weights_are_refused_by_name():
    model = tiny_model("relu6")
    quantized, data = quantize("fx", model, QuantSpec.parse("W4A4"))
    handles = quantized.weight_handles()
    with torch.no_grad():
        float_weights(quantized.model, handles, data[0])[0].view(-1)[0] = float("nan")
    with pytest.raises(ZSQError, match=f"{handles[0].layer!r} contain NaN"):
        init_weight_steps(quantized, data[0])
