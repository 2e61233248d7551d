"""InputSpec: a torchvision-style model, normalized outside, gets bounded synthetic images in
its normalized input space, in every toolkit; bad specs fail clearly."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from zsq_plugins import InputSpec, QuantSpec, apply, synthesize
from zsq_plugins.adapter import installed_adapters
from zsq_plugins.errors import UnsupportedModelError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
SPEC = InputSpec(shape=(3, 8, 8), **IMAGENET, low=0.0, high=1.0)
FAST = {"iterations": 4, "batch_size": 4}


def normalized_input_model() -> nn.Module:
    """Takes (pixels - mean) / std, as torchvision's models do: no normalization inside."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    with torch.no_grad():  # statistics of normalized natural images: wide, centred at 0
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(2.0, 4.0)
    return model.eval()


@pytest.mark.parametrize("preset", ["genie", "dsg"])
def test_clamping_presets_keep_pixels_in_range_and_return_normalized_images(preset):
    data = synthesize(normalized_input_model(), 8, preset, input_spec=SPEC, progress=False, **FAST)
    pixels = SPEC.pixels(data.images)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # normalized space: a channel's values reach below 0 (pixel values under its mean)
    assert data.images.min() < 0
    unbounded = InputSpec(shape=(3, 8, 8), **IMAGENET)
    free = SPEC.pixels(synthesize(
        normalized_input_model(), 8, preset, input_spec=unbounded, progress=False, **FAST
    ).images)  # fmt: skip
    assert free.min() < 0 or free.max() > 1  # what the bounds prevent


def test_unbounded_images_are_announced(caplog):
    with caplog.at_level(logging.WARNING, logger="zsq_plugins.synthesis.api"):
        synthesize(
            normalized_input_model(), 4, "genie", input_spec=InputSpec(shape=(3, 8, 8)),
            progress=False, **FAST,
        )  # fmt: skip
    assert "images are unbounded" in caplog.text and "InputSpec" in caplog.text


@pytest.mark.parametrize("toolkit", ["fx", "pt2e", "nncf", "brevitas"])
def test_every_toolkit_quantizes_a_normalized_input_model_with_bounded_data(toolkit):
    if toolkit not in installed_adapters():
        pytest.skip(f"{toolkit} is not installed")
    model = normalized_input_model()
    quantized, report = apply(
        model, toolkit, QuantSpec.parse("W8A8"), data="genie", num_samples=8, input_spec=SPEC,
        progress=False, **FAST,
    )  # fmt: skip
    assert report.num_samples == 8 and report.input_shape == (3, 8, 8)
    x = SPEC.normalize(torch.rand(6, 3, 8, 8))
    with torch.no_grad():
        agreement = (quantized(x).argmax(1) == model(x).argmax(1)).float().mean()
    assert agreement >= 0.5


def test_bad_specs_say_what_to_fix():
    with pytest.raises(ValueError, match="mean has 2 values; the input has 3 channel"):
        InputSpec(shape=(3, 8, 8), mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(ValueError, match="low < high"):
        InputSpec(shape=(3, 8, 8), low=1.0, high=0.0)
    with pytest.raises(ValueError, match="give both mean and std"):
        InputSpec(shape=(3, 8, 8), mean=(0.5,))
    with pytest.raises(ValueError, match="std must be positive"):
        InputSpec(shape=(1, 8, 8), mean=(0.5,), std=(0.0,))
    with pytest.raises(ValueError, match=r"shape must be \(C, H, W\)"):
        InputSpec(shape=(8, 8))
    with pytest.raises(UnsupportedModelError, match="rejects inputs of shape"):
        synthesize(normalized_input_model(), 4, "noise", input_spec=InputSpec(shape=(1, 8, 8)))
    assert InputSpec.from_dict(SPEC.to_dict()) == SPEC


def test_a_bounded_set_is_reused_from_its_cache(tmp_path):
    def make():
        return synthesize(
            normalized_input_model(), 4, "genie", input_spec=SPEC, cache_dir=tmp_path,
            progress=False, **FAST,
        ).images  # fmt: skip

    assert torch.equal(make(), make())
