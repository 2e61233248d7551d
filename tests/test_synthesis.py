"""The synthesis engine on a tiny BN model: every preset, determinism, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.conftest import SHAPE, TinyConvNet, zoo_style_bn_model
from zsq_plugins import calibration_loader, synthesize
from zsq_plugins.errors import (
    CacheMismatchError,
    ChecksumMismatchError,
    UnknownPluginError,
    UnsupportedModelError,
)
from zsq_plugins.layers import Normalize
from zsq_plugins.synthesis import (
    GENERATORS,
    SynthesisConfig,
    SynthesisDiverged,
    SyntheticDataset,
    get_preset,
)
from zsq_plugins.synthesis import engine as engine_module
from zsq_plugins.synthesis.diagnostics import bn_statistics_loss

FAST = {"iterations": 12, "batch_size": 6}
PRESETS = ["noise", "zeroq", "dsg", "genie", "weight-stats"]


@pytest.fixture
def bn_model() -> nn.Module:
    return zoo_style_bn_model()


def run(model, preset, n=10, seed=0, **kwargs):
    options = {**FAST, **kwargs}
    return synthesize(model, n, preset, seed, input_shape=SHAPE, progress=False, **options)


def test_presets_are_registered_with_both_budgets():
    assert GENERATORS.names() == [
        "adversarial", "dsg", "genie", "noise", "weight-stats", "zeroq"
    ]  # fmt: skip
    for name in PRESETS:
        preset = get_preset(name)
        assert preset.config("cpu").iterations <= preset.config("paper").iterations
    assert get_preset("genie").config("paper").iterations == 4000
    with pytest.raises(ValueError, match="budget"):
        get_preset("genie").config("gpu")
    available = "available: adversarial, dsg, genie, noise, weight-stats, zeroq"
    with pytest.raises(UnknownPluginError, match=available):
        get_preset("deepinversion")


@pytest.mark.parametrize("preset", PRESETS)
def test_shapes_and_determinism(bn_model, preset):
    first = run(bn_model, preset, n=10, seed=3)
    again = run(bn_model, preset, n=10, seed=3)
    other = run(bn_model, preset, n=10, seed=4)
    assert first.images.shape == (10, *SHAPE)
    assert torch.isfinite(first.images).all()
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)
    assert [s["size"] for s in first.manifest["shards"]] == [6, 4]
    # Each batch's seconds come with what measured them (a cached set's cost is read later).
    assert {(s["torch_threads"], s["device"]) for s in first.manifest["shards"]} == {
        (torch.get_num_threads(), "cpu")
    }


@pytest.mark.parametrize(("preset", "iterations"), [("zeroq", 25), ("dsg", 25), ("genie", 80)])
def test_optimized_presets_lower_their_loss(bn_model, preset, iterations):
    data = run(bn_model, preset, n=6, iterations=iterations)
    (shard,) = data.manifest["shards"]
    assert shard["final_loss"] < 0.8 * shard["initial_loss"]


@pytest.mark.parametrize("preset", ["zeroq", "dsg", "genie"])
def test_bn_presets_match_statistics_better_than_noise(bn_model, preset):
    noise = run(bn_model, "noise", n=12)
    made = run(bn_model, preset, n=12, iterations=40, batch_size=12)
    assert bn_statistics_loss(bn_model, made.images) < 0.2 * bn_statistics_loss(
        bn_model, noise.images
    )


def test_clamped_presets_stay_in_the_models_input_range(bn_model):
    for preset in ("dsg", "genie"):
        images = run(bn_model, preset, n=6).images
        assert images.min() >= 0.0 and images.max() <= 1.0
    mean, std = bn_model[0].mean.item(), bn_model[0].std.item()
    noise = run(bn_model, "noise", n=200).images  # N(0, 1) in the normalized space
    assert noise.mean().item() == pytest.approx(mean, abs=0.02)
    assert noise.std().item() == pytest.approx(std, abs=0.02)


def test_the_callers_model_is_left_as_it_was(bn_model):
    bn_model.train()
    flags = [p.requires_grad for p in bn_model.parameters()]
    before = {k: v.clone() for k, v in bn_model.state_dict().items()}
    run(bn_model, "genie", n=6)
    assert bn_model.training
    assert [p.requires_grad for p in bn_model.parameters()] == flags
    after = bn_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched


def test_zoo_models_give_their_input_shape():
    from zsq_plugins import zoo

    model = zoo.card("resnet20_fmnist").build().eval()
    data = synthesize(model, 2, "noise", progress=False)
    assert data.images.shape == (2, 1, 28, 28)


def test_resume_reuses_finished_batches(bn_model, tmp_path, monkeypatch):
    reference = run(bn_model, "zeroq", n=18)
    calls = []
    original = engine_module.SynthesisEngine.run_batch

    interrupt_at = [2]

    def interrupted(self, size, seed, bar=None):
        calls.append(seed)
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt
        return original(self, size, seed, bar)

    monkeypatch.setattr(engine_module.SynthesisEngine, "run_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(bn_model, "zeroq", n=18, cache_dir=tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 1
    assert not list(tmp_path.glob(".*tmp"))  # no half-written file

    calls.clear()
    interrupt_at[0] = 0
    resumed = run(bn_model, "zeroq", n=18, cache_dir=tmp_path)
    assert len(calls) == 2  # batches 1 and 2 only
    assert torch.equal(resumed.images, reference.images)

    calls.clear()
    again = run(bn_model, "zeroq", n=18, cache_dir=tmp_path)
    assert calls == [] and torch.equal(again.images, reference.images)


def test_cache_made_differently_is_refused(bn_model, tmp_path):
    run(bn_model, "zeroq", n=6, cache_dir=tmp_path)
    with pytest.raises(CacheMismatchError, match="seed: stored 0, requested 1"):
        run(bn_model, "zeroq", n=6, seed=1, cache_dir=tmp_path)
    with pytest.raises(CacheMismatchError, match="preset"):
        run(bn_model, "genie", n=6, cache_dir=tmp_path)


def test_saved_set_round_trip_and_model_check(bn_model, tmp_path):
    data = run(bn_model, "genie", n=10)
    data.save(tmp_path / "set")
    loaded = SyntheticDataset.load(tmp_path / "set", model=bn_model)
    assert torch.equal(loaded.images, data.images)
    other = nn.Sequential(Normalize((0.5,), (0.25,)), TinyConvNet()).eval()
    with pytest.raises(CacheMismatchError, match="made for another model"):
        SyntheticDataset.load(tmp_path / "set", model=other)


def test_corrupted_files_are_reported_and_repaired(bn_model, tmp_path):
    reference = run(bn_model, "zeroq", n=12, cache_dir=tmp_path)
    shard = tmp_path / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"garbage!")
    with pytest.raises(ChecksumMismatchError, match="shard-00001"):
        SyntheticDataset.load(tmp_path)
    repaired = run(bn_model, "zeroq", n=12, cache_dir=tmp_path)  # regenerates batch 1 only
    assert torch.equal(repaired.images, reference.images)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheMismatchError, match="not valid JSON"):
        SyntheticDataset.load(tmp_path)


def test_model_without_batchnorm_names_the_presets_that_work(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    with pytest.raises(UnsupportedModelError, match=r"no BatchNorm.*noise") as info:
        run(model, "zeroq", cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert "noise" in str(info.value)
    assert run(model, "noise", n=3).images.shape == (3, *SHAPE)


def test_nan_weights_are_refused(bn_model):
    with torch.no_grad():
        bn_model[1].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(UnsupportedModelError, match=r"1\.conv1\.weight.*NaN"):
        run(bn_model, "genie")


def test_diverging_objective_stops_and_writes_nothing(bn_model, tmp_path):
    with torch.no_grad():
        bn_model[1].bn2.running_var.fill_(-5.0)  # impossible statistics: the target is NaN
    with pytest.raises(SynthesisDiverged, match="nan at step 1"):
        run(bn_model, "zeroq", n=6, cache_dir=tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"] == [] and not manifest["complete"]
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "num_samples"),
        ({"batch_size": 0}, "batch_size"),
        ({"iterations": -1}, "iterations"),
        ({"seed": -1}, "seed"),
        ({"lr": 0.0}, "lr"),
        ({"learning_rate": 0.1}, "unknown synthesis option"),
    ],
)
def test_bad_arguments_raise_value_error(bn_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(bn_model, "zeroq", **kwargs)


def test_wrong_or_missing_input_shape(bn_model):
    with pytest.raises(UnsupportedModelError, match=r"rejects inputs of shape \(N, 3, 8, 8\)"):
        synthesize(bn_model[1], 2, "noise", input_shape=(3, 8, 8), progress=False)
    with pytest.raises(ValueError, match="pass input_shape"):
        synthesize(bn_model, 2, "noise", progress=False)


def test_calibration_loader_from_model_dataset_and_tensor(bn_model):
    loader = calibration_loader(
        bn_model, 10, batch_size=4, preset="zeroq", input_shape=SHAPE, progress=False, iterations=5
    )
    batches = list(loader)
    assert [b.shape[0] for b in batches] == [4, 4, 2] and batches[0].shape[1:] == SHAPE
    pairs = list(calibration_loader(loader.dataset, batch_size=5, with_targets=True))
    assert len(pairs) == 2
    images, targets = pairs[0]
    assert images.shape == (5, *SHAPE) and targets.tolist() == [0] * 5
    from_tensor = list(calibration_loader(torch.zeros(3, *SHAPE), batch_size=2))
    assert [b.shape[0] for b in from_tensor] == [2, 1]
    with pytest.raises(TypeError, match="only to a model"):
        calibration_loader(loader.dataset, preset="genie")


def test_config_json_round_trip_and_validation():
    config = get_preset("dsg").config("paper")
    assert SynthesisConfig.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(ValueError, match="parameterization"):
        SynthesisConfig(parameterization="diffusion")
    with pytest.raises(ValueError, match="generator_channels"):
        SynthesisConfig(generator_channels=(8,))
