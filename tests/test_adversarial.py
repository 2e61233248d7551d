"""The adversarial (ZAQ-style) preset: images that the quantized model gets most wrong, in
alternation with each toolkit's own calibration."""

import pytest
import torch

from tests.conftest import SHAPE, calibration_error, trained_no_bn_model
from tests.test_adapter_conformance import BUILT_IN
from tests.test_weight_stats import _no_bn_model
from zsq_plugins import QuantSpec, apply, synthesize
from zsq_plugins.synthesis.adversarial import adversarial_synthesize
from zsq_plugins.synthesis.discrepancy import output_discrepancy, relation_map

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

FAST = {"iterations": 8, "batch_size": 8, "input_shape": SHAPE, "progress": False}


def test_adversarial_preset_needs_a_quantized_opponent():
    with pytest.raises(ValueError, match="apply"):
        synthesize(_no_bn_model(), 8, "adversarial", **FAST)


def test_relation_map_is_the_cosine_similarity_of_samples():
    features = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    expected = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(relation_map(features), expected)


def test_relation_map_values_and_gradients_match_normalizing_first():
    """It works from the Gram matrix (for speed): its values and gradients must be those of
    normalizing each image's features first, an all-zero image included."""
    torch.manual_seed(0)
    features = torch.randn(5, 3, 4, 4) * 10 + 2
    features[3] = 0.0
    features.requires_grad_()
    weights = torch.randn(5, 5)
    (ours,) = torch.autograd.grad((relation_map(features) * weights).sum(), features)
    flat = torch.nn.functional.normalize(features.flatten(1), dim=1)
    reference = flat @ flat.T
    (expected,) = torch.autograd.grad((reference * weights).sum(), features)
    torch.testing.assert_close(relation_map(features), reference)
    # The zero image's gradient is of order 1/eps: equal to float32's relative precision.
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(ours).all()


def test_adversarial_images_widen_the_gap_between_fp_and_quantized():
    model = _no_bn_model()
    noise = synthesize(model, 32, "noise", **FAST).images
    opponent, _ = apply(model, "fx", QuantSpec.parse("W4A4"), data=noise, progress=False)
    adversarial = synthesize(
        model, 32, "adversarial", opponent=opponent, **{**FAST, "iterations": 60}
    )
    for shard in adversarial.manifest["shards"]:
        assert shard["final_loss"] < shard["initial_loss"]  # the objective falls

    def gap(images: torch.Tensor) -> float:
        with torch.no_grad():
            return float(output_discrepancy(model(images), opponent(images)))

    assert gap(adversarial.images) > 2 * gap(noise)


@pytest.mark.parametrize("name", BUILT_IN)
def test_each_toolkit_plays_the_opponent(name):
    data = adversarial_synthesize(
        _no_bn_model(), name, QuantSpec.parse("W4A4"), 18, rounds=3, **FAST
    )
    assert data.images.shape == (18, *SHAPE)
    rounds = data.manifest["rounds"]
    assert [r["identity"]["preset"] for r in rounds] == ["noise", "adversarial", "adversarial"]
    opponents = [r["identity"]["opponent_fingerprint"] for r in rounds[1:]]
    assert len(set(opponents)) == 2  # each round plays the model calibrated on more images


def test_finished_rounds_are_reused_and_apply_runs_the_rounds(tmp_path):
    model, spec = _no_bn_model(), QuantSpec.parse("W4A4")
    data = adversarial_synthesize(model, "fx", spec, 24, cache_dir=tmp_path, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round0", "round1", "round2", "round3"]
    again = adversarial_synthesize(model, "fx", spec, 24, cache_dir=tmp_path, **FAST)
    torch.testing.assert_close(again.images, data.images)
    _, report = apply(model, "fx", spec, data="adversarial", num_samples=24, **FAST)
    assert (report.data, report.num_samples) == ("adversarial", 24)


def test_adversarial_data_beat_noise_calibration():
    model = trained_no_bn_model()
    options = {**FAST, "iterations": 60, "batch_size": 16}
    adversarial = calibration_error(model, "adversarial", num_samples=64, **options)
    noise = synthesize(model, 64, "noise", input_shape=SHAPE, progress=False).images
    assert adversarial < 0.5 * calibration_error(model, noise)
