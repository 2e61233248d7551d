import math

import pytest
import torch
from torch import nn

from tests.conftest import SHAPE, calibration_error, trained_no_bn_model
from zsq_plugins import synthesize
from zsq_plugins.errors import UnsupportedModelError
from zsq_plugins.layers import Normalize
from zsq_plugins.quant.fold import fold_batchnorm
from zsq_plugins.synthesis.weight_stats import (
    clamped_gaussian,
    max_of_gaussians,
    propagate,
    weight_statistics_targets,
)


@pytest.mark.parametrize(("low", "high"), [(0.0, math.inf), (0.0, 6.0), (-1.0, 1.0)])
def test_clamped_gaussian_moments_match_sampling(low, high):
    mean, var = torch.tensor([0.5, -1.0]), torch.tensor([4.0, 0.25])
    got_mean, got_var = clamped_gaussian((mean, var), low, high)
    samples = torch.randn(400_000, 2, generator=torch.Generator().manual_seed(0))
    clamped = (samples * var.sqrt() + mean).clamp(low, high)
    torch.testing.assert_close(got_mean, clamped.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(got_var, clamped.var(0), atol=0.02, rtol=0)


def test_max_of_gaussians_known_values():
    mean, var = max_of_gaussians(2)
    assert mean == pytest.approx(1 / math.sqrt(math.pi), abs=0.01)  # E[max of 2] = 1/sqrt(pi)
    assert var == pytest.approx(1 - 1 / math.pi, abs=0.01)


def _no_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        Normalize((0.5,), (0.25,)),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 3),
    ).eval()


def test_first_layer_moments_follow_from_its_weights():
    model = _no_bn_model()
    moments = propagate(fold_batchnorm(model), SHAPE)
    conv = model[1]
    mean, var = moments["1"]
    sums = conv.weight.detach().sum(dim=(1, 2, 3))
    torch.testing.assert_close(mean, conv.bias.detach())  # standardized input: mean 0
    torch.testing.assert_close(var, sums.pow(2))  # spatially smooth input, unit variance
    assert list(moments) == ["1", "4", "7"]


def test_targets_are_read_after_batchnorm_when_it_follows():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(72, 2)
    ).eval()
    targets = weight_statistics_targets(model, SHAPE)
    assert [t.name for t in targets] == ["0", "4"]
    assert targets[0].module is model[1] and targets[0].on_output


def test_weight_statistics_objective_falls_on_a_model_without_batchnorm():
    data = synthesize(
        _no_bn_model(), 8, "zeroq", input_shape=SHAPE, statistics="weights", iterations=30,
        batch_size=8, clamp_to_input_range=True, progress=False,
    )  # fmt: skip
    (shard,) = data.manifest["shards"]
    assert shard["final_loss"] < 0.8 * shard["initial_loss"]


def test_unsupported_operation_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x).transpose(1, 2).flatten(1)

    with pytest.raises(UnsupportedModelError, match="transpose"):
        weight_statistics_targets(Odd(), SHAPE)


def test_an_operation_without_a_rule_passes_moments_on_with_a_warning(caplog):
    """Where the channels stay, an operation without a rule keeps its input's moments (an
    approximation the warning names); strictness refuses it instead."""

    class Erf(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)

        def forward(self, x):
            return self.conv2(torch.erf(self.conv1(x))).flatten(1)

    with caplog.at_level("WARNING", logger="zsq_plugins.synthesis.weight_stats"):
        targets = weight_statistics_targets(Erf(), SHAPE)
    assert [t.name for t in targets] == ["conv1", "conv2"]
    assert "erf" in caplog.text and "unchanged" in caplog.text
    with pytest.raises(UnsupportedModelError, match="erf"):
        weight_statistics_targets(Erf(), SHAPE, strict=True)


@pytest.mark.parametrize(
    "module", [nn.GELU(), nn.SiLU(), nn.Hardswish(), nn.Sigmoid(), nn.Tanh(), nn.LeakyReLU(0.1)]
)
def test_elementwise_moments_match_sampling(module):
    from zsq_plugins.synthesis.moments import elementwise_moments

    mean, var = torch.tensor([-1.5, 0.0, 0.7, 2.0]), torch.tensor([0.3, 1.0, 2.5, 0.1])
    got_mean, got_var = elementwise_moments(module, (mean, var))
    draws = module(
        mean + var.sqrt() * torch.randn(400_000, 4, generator=torch.Generator().manual_seed(0))
    )
    torch.testing.assert_close(got_mean, draws.mean(0), atol=1e-2, rtol=0)  # 4 sampling sd
    torch.testing.assert_close(got_var, draws.var(0), atol=4e-3, rtol=2e-2)


def test_gelu_gates_products_and_concatenation_follow_measured_moments():
    """A ConvNeXt/EfficientNet-style mix (GELU, SiLU, a sigmoid gate multiplied in, a layer
    scale, concatenation): predicted layer-output moments against those measured on inputs
    the rules' assumptions hold for (independent standard normal features)."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(16, 32), nn.Linear(16, 32)
            self.gate, self.out = nn.Linear(16, 32), nn.Linear(64, 8)

        def forward(self, x):
            left = nn.functional.gelu(self.a(x)) * torch.sigmoid(self.gate(x))
            right = 0.5 * nn.functional.silu(self.b(x))
            return self.out(torch.cat([left, right], 1))

    model = Mixed().eval()
    predicted = propagate(fold_batchnorm(model), (16,))
    x = torch.randn(200_000, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    mean, var = predicted["out"]
    torch.testing.assert_close(mean, out.mean(0), atol=0.02, rtol=0.05)
    torch.testing.assert_close(var, out.var(0), atol=0.02, rtol=0.1)


def test_weight_stats_preset_lowers_its_objective_and_beats_noise_calibration():
    model = trained_no_bn_model()
    data = synthesize(
        model, 64, "weight-stats", input_shape=SHAPE, iterations=60, batch_size=32,
        progress=False,
    )  # fmt: skip
    for shard in data.manifest["shards"]:
        assert shard["final_loss"] < 0.8 * shard["initial_loss"]
    noise = synthesize(model, 64, "noise", input_shape=SHAPE, progress=False)
    assert calibration_error(model, data.images) < 0.5 * calibration_error(model, noise.images)
