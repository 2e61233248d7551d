import json

import pytest
import torch
from torch import nn

from tests.conftest import TinyConvNet
from zsq_plugins import QuantSpec, apply
from zsq_plugins.adapter import ADAPTERS, installed_adapters
from zsq_plugins.errors import MissingDependencyError, UnknownPluginError, UnsupportedModelError
from zsq_plugins.layers import Normalize

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Normalize((0.5,), (0.25,)), TinyConvNet()).eval()


def test_zero_shot_apply_with_a_preset():
    model = _model()
    quantized, report = apply(
        model,
        "fx",
        QuantSpec(weight_bits=4, act_bits=4),
        data="zeroq",
        num_samples=12,
        input_shape=(1, 8, 8),
        iterations=5,
        batch_size=6,
        progress=False,
    )
    x = torch.rand(4, 1, 8, 8)
    assert quantized(x).shape == (4, 4)
    assert report.toolkit == "fx" and report.data == "zeroq" and report.num_samples == 12
    assert set(report.timings_s) == {
        "data",
        "quantize_and_calibrate",
        "abn",
        "clip",
        "reconstruct",
        "total",
    }
    # Steps not asked for leave no result (their phases are timed, as empty, on any machine).
    assert report.clipping is None and report.adaptive_bn is None
    assert report.reconstruction is None
    assert report.quantized.model is quantized
    # first conv and last linear: 8-bit, less the overflow fix's bit (their inputs are 8-bit)
    assert {h.bits for h in report.quantized.weight_handles()} == {4, 7}
    assert report.to_dict()["spec"]["weight_bits"] == 4


def test_apply_with_own_images():
    model = _model()
    images = torch.rand(20, 1, 8, 8)
    quantized, report = apply(model, "fx", data=images)
    assert report.data == "Tensor" and report.num_samples == 20
    torch.testing.assert_close(quantized(images), model(images), atol=0.05, rtol=0)  # W8A8


@pytest.mark.parametrize("toolkit", ["fx", "nncf"])
def test_calibration_shows_a_progress_bar(toolkit, capsys):
    """The toolkit's calibration (fx: one pass; NNCF: a batch to trace, then the statistics)
    advances a bar over the calibration batches that ends full."""
    if toolkit not in installed_adapters():
        pytest.skip(f"{toolkit} is not installed")
    apply(_model(), toolkit, data=torch.rand(70, 1, 8, 8), progress=True)
    bar = [line for line in capsys.readouterr().err.split("\r") if "calibrate" in line]
    assert bar and f"calibrate ({toolkit})" in bar[-1]
    assert "3/3" in bar[-1]  # 70 images in batches of 32


def test_unknown_toolkit_lists_installed_ones():
    with pytest.raises(UnknownPluginError, match=r"unknown toolkit 'aimet'; installed: .*fx"):
        apply(_model(), "aimet", data=torch.rand(4, 1, 8, 8))


def test_toolkit_not_installed_names_the_extra(monkeypatch):
    class Missing:
        name, requires, pip_extra = "ghost", ("no_such_toolkit_xyz",), "ghost"

        def quantize(self, *args):
            raise AssertionError("never reached")

        def export_onnx(self, *args):
            raise AssertionError("never reached")

    monkeypatch.setitem(ADAPTERS._items, "ghost", Missing)
    with pytest.raises(MissingDependencyError, match=r"pip install 'zsq-plugins\[ghost\]'"):
        apply(_model(), "ghost", data=torch.rand(4, 1, 8, 8))


def test_untraceable_model_names_the_cause():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            if x.mean() > 0.5:  # data-dependent control flow defeats torch.fx
                x = x * 2
            return self.conv(x).flatten(1)

    with pytest.raises(UnsupportedModelError, match="cannot be traced"):
        apply(Branchy(), "fx", data=torch.rand(4, 1, 8, 8))


def test_apply_with_reconstruction():
    model = _model()
    images = torch.rand(32, 1, 8, 8)
    _, report = apply(
        model,
        "fx",
        QuantSpec.parse("W3A4"),
        data=images,
        reconstruct="genie-m",
        reconstruct_options={"iterations": 10},
        progress=False,
    )
    assert report.reconstruction is not None
    assert all(block.fidelity <= 1e-5 for block in report.reconstruction.blocks)
    config = report.to_dict()["reconstruction"]["config"]
    assert config["weight_scale_lr"] == 1e-4
    assert config["iterations"] == 10  # reconstruct_options reach the routine


def test_unknown_reconstruction_option_fails_before_any_work():
    with pytest.raises(ValueError, match="iteration"):
        apply(
            _model(),
            "fx",
            data="zeroq",
            reconstruct="brecq",
            reconstruct_options={"iteration": 10},
        )


def test_unknown_reconstruction_preset_lists_the_known_ones():
    with pytest.raises(UnknownPluginError, match="adaround, brecq, genie-m, qdrop"):
        apply(_model(), "fx", data=torch.rand(4, 1, 8, 8), reconstruct="optq")


def test_apply_with_accurate_activation_clipping():
    images = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(weight_bits=4, act_bits=3)
    _, plain = apply(_model(), "fx", spec, data=images, progress=False)
    _, clipped = apply(_model(), "fx", spec, data=images, aac=True, progress=False)
    assert clipped.clipping and all(c.mse_after < c.mse_before for c in clipped.clipping)
    changed = {c.layer: c for c in clipped.clipping}
    before = {h.layer: h.scale() for h in plain.quantized.activation_handles()}
    for handle in clipped.quantized.activation_handles():
        if handle.layer in changed:  # the toolkit's model carries the new range
            new = changed[handle.layer].new_scale
            assert handle.scale().flatten()[0].item() == pytest.approx(new, rel=1e-5)
        else:
            torch.testing.assert_close(handle.scale(), before[handle.layer])
    assert json.loads(json.dumps(clipped.to_dict()))["clipping"][0]["layer"] in changed


def test_apply_with_adaptive_bn_moves_layer_statistics_toward_fp32():
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(weight_bits=3, act_bits=4)
    model = _model()
    with torch.no_grad():
        reference = model(images)
    errors = {}
    for abn in (False, True):
        quantized, report = apply(_model(), "fx", spec, data=images, abn=abn, progress=False)
        with torch.no_grad():
            errors[abn] = (quantized(images).mean(0) - reference.mean(0)).abs().max().item()
    assert [c.layer for c in report.adaptive_bn] == [
        h.layer for h in report.quantized.weight_handles()
    ]
    assert json.loads(json.dumps(report.to_dict()))["adaptive_bn"][0]["scaled"] is True
    assert errors[True] < 0.5 * errors[False]


class _Counted(torch.utils.data.Dataset):
    """Images, counting which were read."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.read = images, set()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.read.add(index)
        return self.images[index]


def test_own_data_is_cut_at_num_samples():
    images = torch.rand(100, 1, 8, 8)
    _, report = apply(_model(), "fx", data=images, num_samples=20, progress=False)
    assert report.num_samples == 20
    dataset = _Counted(images)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    _, report = apply(_model(), "fx", data=loader, num_samples=40, aac=True, progress=False)
    assert report.num_samples == 40
    assert max(dataset.read) < 48  # three batches of 16 read, the third cut to 8 images
    dataset = _Counted(images)
    _, report = apply(_model(), "nncf" if "nncf" in installed_adapters() else "fx",
                      data=dataset, num_samples=24, progress=False)  # fmt: skip
    assert report.num_samples == 24 and max(dataset.read) < 24
