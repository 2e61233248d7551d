"""torch.ao FX specifics: real int8 kernels at W8A8, and the graph fixes at low bits."""

import pytest
import torch

from tests.test_adapter_conformance import quantize, tiny_model
from zsq_plugins import QuantSpec
from zsq_plugins.adapter import get_adapter

pytestmark = [pytest.mark.fx, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_w8a8_converts_to_int8_kernels_that_match_the_simulation():
    # 7 x 7 images: no pooled value at a rounding tie (zsq_plugins.testing.quantize_tiny)
    quantized, data = quantize("fx", tiny_model("relu6"), QuantSpec.parse("W8A8"), size=7)
    converted = get_adapter("fx").convert(quantized)
    kernels = {type(m).__module__ for m in converted.modules()}
    assert any(k.startswith("torch.ao.nn.quantized") for k in kernels)
    x = data[1]
    with torch.no_grad():
        simulated, real = quantized.model(x), converted(x)
    step = quantized.activation_handles()[-1].scale().item()
    assert (simulated - real).abs().max() <= 3 * step


def test_low_bit_model_is_not_converted():
    quantized, _ = quantize("fx", tiny_model("relu"), QuantSpec.parse("W4A8"))
    with pytest.raises(ValueError, match="below 8 bits"):
        get_adapter("fx").convert(quantized)


def test_calibration_needs_data():
    with pytest.raises(ValueError, match="no batch"):
        get_adapter("fx").quantize(tiny_model("relu"), QuantSpec(), [], torch.rand(2, 1, 8, 8))


def test_a_torch_without_torch_ao_fx_gets_a_clear_error(monkeypatch):
    """torch.ao's FX quantization is deprecated upstream: once a torch drops it, the fx
    adapter names the successor and the others keep working."""
    import importlib.util

    from zsq_plugins.adapter import installed_adapters
    from zsq_plugins.errors import MissingDependencyError

    real_find_spec = importlib.util.find_spec

    def without_torch_ao(name, *args):
        return None if name.startswith("torch.ao.quantization") else real_find_spec(name, *args)

    installed = set(installed_adapters())
    monkeypatch.setattr(importlib.util, "find_spec", without_torch_ao)
    with pytest.raises(MissingDependencyError, match=r"no longer ships torch.ao's FX.*'pt2e'"):
        get_adapter("fx")
    assert set(installed_adapters()) == installed - {"fx"}
