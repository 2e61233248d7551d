"""The ``auto`` budget: defaults that scale with the model's cost per image."""

import pytest
import torch
from torch import nn

from tests.conftest import SHAPE, TinyConvNet
from zsq_plugins import apply, budgets, synthesize
from zsq_plugins.budgets import AutoBudget, auto_budget, model_macs
from zsq_plugins.errors import UnsupportedModelError
from zsq_plugins.reconstruction import RECONSTRUCTIONS
from zsq_plugins.synthesis.presets import get_preset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyConvNet().eval()


def test_macs_count_convolutions_and_linear_layers():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8x8 outputs of 8 channels, 3*3*3 each
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 3*3 each
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    expected = 64 * 8 * 27 + 64 * 8 * 9 + 8 * 5
    assert model_macs(model, (3, 8, 8)) == expected
    assert model.training  # the caller's mode is left as it was


def test_macs_of_a_wrong_shape_say_what_to_give():
    with pytest.raises(UnsupportedModelError, match="input_spec=InputSpec"):
        model_macs(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), (3, 8, 8))


def test_models_as_cheap_as_the_reference_keep_the_cpu_budget():
    budget = auto_budget(budgets.REFERENCE_MACS)
    assert budget == AutoBudget(macs=budgets.REFERENCE_MACS, images=1024, scaled=False)
    assert budget.generation_steps(130) == 130 and budget.generation_batch(128) == 128
    assert budget.reconstruction_steps(800, 32) == 800


@pytest.mark.parametrize("macs", [100e6, 385e6, 2e9])
def test_costlier_models_get_bounded_compute(macs):
    budget = auto_budget(int(macs))
    assert budget.scaled and budgets.MIN_IMAGES <= budget.images <= budgets.MAX_IMAGES
    assert budget.images % 32 == 0
    steps = budget.generation_steps(130)
    assert budgets.MIN_GENERATION_STEPS <= steps <= 130
    if steps > budgets.MIN_GENERATION_STEPS:
        assert steps * budget.images * macs <= budgets.GENERATION_MACS
    batch = budget.generation_batch(128)
    assert batch <= 128 and batch & (batch - 1) == 0  # a power of two
    rounds = budget.reconstruction_steps(800, 32)
    assert budgets.MIN_RECONSTRUCTION_STEPS <= rounds <= 800
    if rounds > budgets.MIN_RECONSTRUCTION_STEPS:
        assert rounds * 32 * macs <= budgets.RECONSTRUCTION_MACS
    # Costlier models never get more of anything.
    cheaper = auto_budget(int(macs / 2))
    assert cheaper.images >= budget.images
    assert cheaper.generation_steps(130) >= steps
    assert cheaper.reconstruction_steps(800, 32) >= rounds


@pytest.fixture
def tiny_reference(monkeypatch):
    """A reference cost below the tiny test model's, so that ``auto`` scales it, with caps
    that give it a few steps."""
    macs = model_macs(tiny_model(), SHAPE)
    monkeypatch.setattr(budgets, "REFERENCE_MACS", macs // 8)
    monkeypatch.setattr(budgets, "MIN_IMAGES", 16)
    monkeypatch.setattr(budgets, "GENERATION_MACS", 3 * 128 * macs)
    monkeypatch.setattr(budgets, "RECONSTRUCTION_MACS", 4 * 32 * macs)
    monkeypatch.setattr(budgets, "MIN_GENERATION_STEPS", 1)
    monkeypatch.setattr(budgets, "MIN_RECONSTRUCTION_STEPS", 1)
    monkeypatch.setattr(budgets, "GENERATION_BATCH_MACS", 32 * macs)
    return auto_budget(macs)


def test_synthesize_scales_the_cpu_budget_unless_told(tiny_reference):
    assert tiny_reference.images == 128  # 1024 x 1/8
    data = synthesize(tiny_model(), 128, "zeroq", input_shape=SHAPE, progress=False)
    config = data.manifest["identity"]["config"]
    assert data.manifest["identity"]["budget"] == "auto"
    assert (config["iterations"], config["batch_size"]) == (3, 32)
    cpu = get_preset("zeroq").config("cpu")
    told = synthesize(tiny_model(), 8, "zeroq", input_shape=SHAPE, iterations=2, progress=False)
    assert told.manifest["identity"]["config"]["iterations"] == 2
    assert told.manifest["identity"]["config"]["batch_size"] == 32  # not told: scaled
    plain = synthesize(
        tiny_model(), 8, "zeroq", input_shape=SHAPE, budget="cpu", iterations=2, progress=False
    )
    assert plain.manifest["identity"]["config"]["batch_size"] == cpu.batch_size


def test_apply_defaults_follow_the_model_cost(tiny_reference):
    images = torch.rand(300, *SHAPE)
    _, report = apply(tiny_model(), "fx", "W4A4", data=images, reconstruct="brecq", progress=False)
    assert report.num_samples == tiny_reference.images == 128
    iterations = report.reconstruction.config["iterations"]
    assert iterations == 4 < RECONSTRUCTIONS.get("brecq").config("cpu").iterations
    _, told = apply(
        tiny_model(), "fx", "W4A4", data=images, num_samples=20, reconstruct="brecq",
        reconstruct_options={"iterations": 2}, progress=False,
    )  # fmt: skip
    assert told.num_samples == 20 and told.reconstruction.config["iterations"] == 2
    assert told.peak_rss_mib.keys() <= told.timings_s.keys()
    assert told.peak_rss_mib["reconstruct"] > 0


def test_num_samples_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        apply(tiny_model(), "fx", data=torch.rand(4, *SHAPE), num_samples=0)
