"""The conformance template every toolkit adapter runs (tiny models, fast).

Each registered adapter whose toolkit is installed runs every test here; an adapter whose
toolkit is missing is skipped with the pip extra to install.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import TinyConvNet
from zsq_plugins import QuantSpec
from zsq_plugins.adapter import ADAPTERS, QuantizerHandle, QuantizerKind, get_adapter
from zsq_plugins.errors import MissingDependencyError, UnknownPluginError
from zsq_plugins.quant.clipping import clip_activations
from zsq_plugins.quant.fakequant import fake_quantize
from zsq_plugins.quant.fold import fold_batchnorm
from zsq_plugins.zoo._layers import Normalize

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BUILT_IN = ["brevitas", "fx", "nncf"]


def _adapter_or_skip(name: str):
    try:
        return get_adapter(name)
    except MissingDependencyError as error:
        pytest.skip(str(error))


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


def tiny_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "relu6":
        model: nn.Module = TinyReLU6Net()
    else:
        model = nn.Sequential(Normalize((0.5,), (0.25,)), TinyConvNet())
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def quantize(name: str, model: nn.Module, spec: QuantSpec):
    generator = torch.Generator().manual_seed(0)
    data = [torch.rand(16, 1, 8, 8, generator=generator) for _ in range(2)]
    adapter = _adapter_or_skip(name)
    return adapter.quantize(model, spec, data, data[0][:2]), data


def _unwrap(value):
    """A quantizer module's output as a tensor (toolkits wrap it in tuples or QuantTensors)."""
    if isinstance(value, tuple | list):
        value = value[0]
    return getattr(value, "value", value)


def _through(handle: QuantizerHandle, run) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of the handle's quantizer module during ``run()``."""
    seen = {}

    def record(_, args, output):
        seen.setdefault("input", _unwrap(args[0]).detach())
        seen.setdefault("output", _unwrap(output).detach())

    hook = handle.module.register_forward_hook(record)
    try:
        run()
    finally:
        hook.remove()
    return seen["input"], seen["output"]


def _expected(handle: QuantizerHandle, x: torch.Tensor) -> torch.Tensor:
    return fake_quantize(
        x,
        handle.scale().flatten() if handle.axis is not None else handle.scale().flatten()[0],
        handle.zero_point().flatten().float()
        if handle.axis is not None
        else handle.zero_point().flatten()[0].float(),
        handle.quant_min,
        handle.quant_max,
        axis=handle.axis,
    )


def test_built_in_adapters_are_registered():
    assert set(BUILT_IN) <= set(ADAPTERS.names())


def test_unknown_toolkit_lists_the_known_ones():
    with pytest.raises(UnknownPluginError, match=r"available: brevitas, fx, nncf"):
        get_adapter("aimet")


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("kind", ["relu", "relu6"])
def test_spec_is_honoured(name, kind):
    model = tiny_model(kind)
    quantized, _ = quantize(name, model, QuantSpec(weight_bits=3, act_bits=4))
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
    assert acts and all(h.axis is None for h in acts)
    assert {h.bits for h in acts} == {4, 8}
    normalize = next(n for n, m in model.named_modules() if isinstance(m, Normalize))
    inputs = [h for h in acts if h.layer in ("input", normalize)]
    assert inputs and all(h.bits == 8 for h in inputs)  # the first conv's input stays 8-bit


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("kind", ["relu", "relu6"])
def test_switched_off_equals_folded_fp32(name, kind):
    model = tiny_model(kind)
    quantized, data = quantize(name, model, QuantSpec(weight_bits=4, act_bits=4))
    x = data[1]
    assert (quantized.model(x) - model(x)).abs().max() > 1e-4  # quantization is on
    for handle in quantized.handles:
        handle.set_enabled(False)
        assert not handle.enabled
    expected = fold_batchnorm(model)(x)
    torch.testing.assert_close(quantized.model(x), expected, rtol=1e-5, atol=1e-5)
    for handle in quantized.handles:
        handle.set_enabled(True)
    assert (quantized.model(x) - expected).abs().max() > 1e-4


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("kind", [QuantizerKind.ACTIVATION, QuantizerKind.WEIGHT])
def test_handle_round_trip_changes_output_as_the_math_says(name, kind):
    quantized, data = quantize(name, tiny_model("relu"), QuantSpec(weight_bits=4, act_bits=4))
    candidates = [h for h in quantized.handles if h.kind is kind and h.bits == 4]
    handle = candidates[0]

    def run():
        with torch.no_grad():
            quantized.model(data[1])

    x, y = _through(handle, run)
    torch.testing.assert_close(y, _expected(handle, x), rtol=1e-5, atol=1e-6)
    new_scale = handle.scale() * 1.7
    handle.set_scale(new_scale)
    torch.testing.assert_close(handle.scale(), new_scale)
    x2, y2 = _through(handle, run)
    torch.testing.assert_close(y2, _expected(handle, x2), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y2, y)


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("label", ["W8A8", "W4A4"])
def test_onnx_export_runs_in_onnxruntime_and_matches(name, label, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    quantized, data = quantize(name, tiny_model("relu6"), QuantSpec.parse(label))
    adapter = _adapter_or_skip(name)
    path = adapter.export_onnx(quantized, tmp_path / "model.onnx", data[0][:2])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = data[1]
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = quantized.model(x)
    expected = _unwrap(expected)
    # Float accumulation differs between runtimes, so a value may round to the neighbouring
    # level of a quantizer now and then: allow a few percent of the output's range.
    tolerance = 0.03 * float(expected.abs().max())
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=tolerance, rtol=0)
    assert (torch.from_numpy(got).argmax(1) == expected.argmax(1)).float().mean() >= 0.9


@pytest.mark.parametrize("name", BUILT_IN)
def test_identity_overrides_give_the_fp32_model_back(name):
    model = tiny_model("relu6")
    quantized, data = quantize(name, model, QuantSpec(weight_bits=4, act_bits=4))
    x = data[1]
    with torch.no_grad():
        before = quantized.model(x)
    removers = [handle.override(lambda value: value) for handle in quantized.handles]
    with torch.no_grad():
        torch.testing.assert_close(
            quantized.model(x), fold_batchnorm(model)(x), rtol=1e-5, atol=1e-5
        )
    for remover in removers:
        remover.remove()
    with torch.no_grad():
        torch.testing.assert_close(quantized.model(x), before)


@pytest.mark.parametrize("name", BUILT_IN)
def test_gradients_reach_the_functions_that_override_quantizers(name):
    quantized, data = quantize(name, tiny_model("relu"), QuantSpec(weight_bits=4, act_bits=4))
    weight = next(h for h in quantized.weight_handles() if h.bits == 4)
    act = next(h for h in quantized.activation_handles() if h.bits == 4)
    delta = torch.zeros((), requires_grad=True)
    gain = torch.ones((), requires_grad=True)
    removers = [weight.override(lambda w: w + delta), act.override(lambda x: x * gain)]
    try:
        quantized.model(data[1]).pow(2).sum().backward()
    finally:
        for remover in removers:
            remover.remove()
    assert delta.grad is not None and delta.grad.abs() > 0
    assert gain.grad is not None and gain.grad.abs() > 0


@pytest.mark.parametrize("name", BUILT_IN)
def test_override_acts_only_while_the_quantizer_is_enabled(name):
    quantized, data = quantize(name, tiny_model("relu"), QuantSpec(weight_bits=4, act_bits=4))
    handle = next(h for h in quantized.activation_handles() if h.bits == 4)
    handle.set_enabled(False)
    with torch.no_grad():
        off = quantized.model(data[1])
    remover = handle.override(lambda x: x * 0)
    with torch.no_grad():
        torch.testing.assert_close(quantized.model(data[1]), off)
    remover.remove()


@pytest.mark.parametrize("name", BUILT_IN)
def test_accurate_activation_clipping_lands_on_the_toolkits_quantizers(name):
    quantized, data = quantize(name, tiny_model("relu6"), QuantSpec(weight_bits=4, act_bits=3))
    images = torch.cat(data)
    kept = {h.layer: h.scale().clone() for h in quantized.activation_handles()}
    results = clip_activations(quantized, images)
    assert results and all(r.mse_after < r.mse_before for r in results)
    assert any(r.mse_after < 0.9 * r.mse_before for r in results)  # 3-bit min-max is coarse
    changed = {r.layer: r for r in results}
    for handle in quantized.activation_handles():
        expected = changed[handle.layer].new_scale if handle.layer in changed else None
        scale = handle.scale().flatten()[0].item()
        if expected is None:
            torch.testing.assert_close(handle.scale(), kept[handle.layer])
        else:
            torch.testing.assert_close(scale, expected, rtol=1e-5, atol=0)

    def run():
        with torch.no_grad():
            quantized.model(data[1])

    for handle in quantized.activation_handles():  # the toolkit's own kernels use the range
        x, y = _through(handle, run)
        torch.testing.assert_close(y, _expected(handle, x), rtol=1e-5, atol=1e-6)
