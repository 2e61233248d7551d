"""The conformance template (zsq_plugins.testing) run on every built-in adapter.

Each registered adapter whose toolkit is installed runs every check; an adapter whose toolkit
is missing is skipped with the pip extra to install.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from zsq_plugins import QuantSpec, zoo
from zsq_plugins.adapter import ADAPTERS, QuantizedModel, get_adapter
from zsq_plugins.errors import MissingDependencyError, UnknownPluginError
from zsq_plugins.testing import (
    CHECKS,
    check_adapter,
    expected_output,
    quantize_tiny,
    quantizer_io,
    run_check,
    tiny_model,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

BUILT_IN = ["brevitas", "fx", "nncf", "onnxruntime", "pt2e"]

# Helpers the toolkit-specific test modules share.
_expected, _through = expected_output, quantizer_io
__all__ = ["BUILT_IN", "_expected", "_through", "quantize", "quantize_resnet20", "tiny_model"]


def _adapter_or_skip(name: str):
    try:
        return get_adapter(name)
    except MissingDependencyError as error:
        pytest.skip(str(error))


def quantize(
    name: str, model: nn.Module, spec: QuantSpec, size: int = 8
) -> tuple[QuantizedModel, list[torch.Tensor]]:
    return quantize_tiny(_adapter_or_skip(name), model, spec, size)


def quantize_resnet20(
    name: str, spec: str = "W4A4", **overrides: object
) -> tuple[nn.Module, dict[str, torch.Tensor], QuantizedModel, list[torch.Tensor]]:
    """The zoo's resnet20_fmnist (random weights), a copy of its state, the toolkit's quantized
    model (``QuantSpec.parse(spec, **overrides)``) calibrated on two seeded batches, and those
    batches."""
    torch.manual_seed(0)
    model = zoo.card("resnet20_fmnist").build().eval()
    original = copy.deepcopy(model.state_dict())
    data = [torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in (0, 1)]
    quantized = _adapter_or_skip(name).quantize(
        model, QuantSpec.parse(spec, **overrides), data, data[0]
    )
    return model, original, quantized, data


def test_built_in_adapters_are_registered():
    assert set(BUILT_IN) <= set(ADAPTERS.names())


def test_unknown_toolkit_lists_the_known_ones():
    listing = r"available: brevitas, fx, nncf, onnxruntime, pt2e"
    with pytest.raises(UnknownPluginError, match=listing):
        get_adapter("aimet")


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
@pytest.mark.parametrize("name", BUILT_IN)
def test_adapter_conforms(name, check):
    run_check(check, _adapter_or_skip(name))


class _RoundsBadly:
    """The fx adapter with every weight handle reporting a scale twice the real one: a
    broken adapter the template must catch."""

    def __init__(self) -> None:
        self._inner = get_adapter("fx")
        self.name, self.requires, self.pip_extra = "broken", (), None

    def quantize(self, model, spec, calibration, example_input):
        quantized = self._inner.quantize(model, spec, calibration, example_input)
        for handle in quantized.weight_handles():
            handle.scale = lambda original=handle.scale: original() * 2
        return quantized

    def export_onnx(self, quantized, path, example_input):
        return self._inner.export_onnx(quantized, path, example_input)


def test_check_adapter_reports_what_a_broken_adapter_gets_wrong():
    failures = check_adapter(_RoundsBadly())
    assert "check_handles_describe_the_quantizers" in failures
    assert "check_spec_is_honoured" not in failures
    assert all(isinstance(reason, str) and reason for reason in failures.values())
