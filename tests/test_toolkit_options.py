"""Toolkit options reach each toolkit's own call, win over the adapter's defaults, and an
unknown one fails before any work, listing those the toolkit takes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.test_apply import _model
from zsq_plugins import apply
from zsq_plugins.adapter import accepted_options, get_adapter, installed_adapters
from zsq_plugins.errors import ToolkitOptionError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

IMAGES = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
LAYERS = ["1.conv1", "1.conv2", "1.fc"]


def _apply(toolkit: str, **options):
    if toolkit not in installed_adapters():
        pytest.skip(f"{toolkit} is not installed")
    return apply(_model(), toolkit, data=IMAGES, progress=False, toolkit_options=options)


@pytest.mark.parametrize("toolkit", ["fx", "pt2e", "nncf", "brevitas"])
def test_an_unknown_option_fails_before_any_work_and_lists_the_accepted_ones(toolkit):
    if toolkit not in installed_adapters():
        pytest.skip(f"{toolkit} is not installed")
    accepted = list(accepted_options(get_adapter(toolkit)))
    assert accepted
    # data="genie" would synthesize for minutes: the error must come first
    with pytest.raises(ToolkitOptionError, match=rf"no option 'colour'.*{accepted[0]}"):
        apply(_model(), toolkit, data="genie", toolkit_options={"colour": "blue"})


def test_an_adapter_without_options_says_so():
    class Plain:
        name = "plain"

    from zsq_plugins.adapter import check_toolkit_options

    with pytest.raises(ToolkitOptionError, match="takes no options"):
        check_toolkit_options(Plain(), {"anything": 1})  # type: ignore[arg-type]


def test_fx_qconfig_mapping_wins_over_the_adapters_own():
    from torch.ao.quantization import QConfigMapping

    # At W8A8 the adapter names every layer (7-bit weights from the overflow fix); the user's
    # object type must still win over those names.
    mapping = QConfigMapping().set_object_type(nn.Linear, None)
    quantized, report = _apply("fx", qconfig_mapping=mapping)
    assert [h.layer for h in report.quantized.weight_handles()] == LAYERS[:2]
    assert type(quantized.get_submodule("1.fc")) is nn.Linear  # float
    assert "QConfigMapping" in report.to_dict()["toolkit_options"]["qconfig_mapping"]
    _, by_name = _apply("fx", qconfig_mapping={"module_name": [("1.conv2", None)]})
    assert [h.layer for h in by_name.quantized.weight_handles()] == ["1.conv1", "1.fc"]


def test_pt2e_module_configs_win_over_the_adapters_own():
    _, report = _apply("pt2e", module_name_qconfigs={"1.fc": None})
    assert [h.layer for h in report.quantized.weight_handles()] == LAYERS[:2]
    _, by_type = _apply("pt2e", module_type_qconfigs={nn.Linear: None})
    assert [h.layer for h in by_type.quantized.weight_handles()] == LAYERS[:2]


def test_nncf_options_given_as_plain_values_reach_nncf_quantize():
    _, report = _apply(
        "nncf",
        ignored_scope={"names": ["1/fc/linear/0"]},  # NNCF's own node name
        target_device="cpu",
        preset="performance",
        advanced_parameters={"overflow_fix": "enable"},
    )
    assert [h.layer for h in report.quantized.weight_handles()] == LAYERS[:2]
    # the user's preset wins: symmetric activations where the spec's default is asymmetric
    assert all(int(h.zero_point().abs().max()) == 0 for h in report.quantized.handles)
    with pytest.raises(ToolkitOptionError, match="target_device='tpu' is not one of: any, cpu"):
        _apply("nncf", target_device="tpu")
    with pytest.raises(ToolkitOptionError, match=r"has no field \['colour'\]"):
        _apply("nncf", advanced_parameters={"colour": 1})


def test_nncf_subset_size_wins_over_all_batches():
    _, everything = _apply("nncf")
    _, first_batch = _apply("nncf", subset_size=1)
    ranges = [
        (h.scale(), other.scale())
        for h, other in zip(
            everything.quantized.activation_handles(),
            first_batch.quantized.activation_handles(),
            strict=True,
        )
    ]
    assert any(not torch.equal(a, b) for a, b in ranges)  # fewer images, other ranges


def test_brevitas_layerwise_options():
    quantized, report = _apply("brevitas", name_blacklist=["1.fc"])
    assert [h.layer for h in report.quantized.weight_handles()] == LAYERS[:2]
    assert type(quantized.get_submodule("1.fc")) is nn.Linear
    with pytest.raises(ToolkitOptionError, match=r"names no module \['1.head'\]"):
        _apply("brevitas", name_blacklist=["1.head"])


def test_cli_refuses_an_unknown_option_before_any_work(tmp_path, capsys):
    from zsq_plugins.cli import main

    argv = ["quantize", "resnet20_fmnist", "--out", str(tmp_path), "--no-progress"]
    assert main([*argv, "--toolkit-option", "colour=blue"]) == 2
    assert "no option 'colour'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_grid_holds_options_per_toolkit():
    from zsq_plugins.compare import GridConfig

    axes = {"models": ["resnet20_fmnist"], "data": ["real"], "specs": ["W8A8"]}
    config = GridConfig(toolkits=["nncf"], toolkit_options={"nncf": {"subset_size": 2}}, **axes)
    assert config.protocol()["toolkit_options"] == {"nncf": {"subset_size": 2}}
    assert "toolkit_options" not in GridConfig(toolkits=["nncf"], **axes).protocol()
    with pytest.raises(ValueError, match=r"toolkit_options for \['fx'\]"):
        GridConfig(toolkits=["nncf"], toolkit_options={"fx": {}}, **axes)
