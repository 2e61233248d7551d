"""Pieces of the engine: statistics capture, objectives, swing convolution, augmentation."""

import pytest
import torch
from torch import nn

from zsq_plugins.synthesis.config import Distance, SynthesisConfig
from zsq_plugins.synthesis.engine import batch_seed
from zsq_plugins.synthesis.hooks import (
    StatisticsCapture,
    batchnorm_targets,
    frozen,
    swing_convolution,
)
from zsq_plugins.synthesis.objectives import (
    bn_loss_terms,
    decorrelation,
    expected_deviation,
    plan_batch,
)
from zsq_plugins.synthesis.parameterization import LatentGenerator


def test_bn_capture_matches_direct_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    x = torch.randn(5, 3, 4, 4) * 2 + 1
    capture = StatisticsCapture(batchnorm_targets([("bn", bn)]))
    with capture:
        bn(x)
    (stat,) = capture.collected()
    torch.testing.assert_close(stat.batch_mean, x.mean((0, 2, 3)))
    expected_std = torch.sqrt(x.var((0, 2, 3), unbiased=False) + bn.eps)
    torch.testing.assert_close(stat.batch_std, expected_std)
    torch.testing.assert_close(stat.sample_mean, x.mean((2, 3)))
    assert stat.positions == 16
    assert not bn._forward_pre_hooks  # hooks removed on exit


@pytest.mark.parametrize("offset", [0.0, 30.0, 600.0])
def test_bn_capture_values_and_gradients_match_var_mean(offset):
    """The capture computes the variance from shifted raw moments (for speed); it and its
    gradients must be torch.var_mean's, for data centred or far from zero (mean/std 300)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    x = (torch.randn(6, 4, 7, 7) * 2 + offset).requires_grad_()
    weights = torch.randn(4), torch.randn(6, 4)
    with StatisticsCapture(batchnorm_targets([("bn", bn)])) as capture:
        bn(x)
    (stat,) = capture.collected()
    ours = stat.batch_std @ weights[0] + (stat.sample_std * weights[1]).sum()
    ours = ours + (stat.sample_mean * weights[1]).sum()
    (grad,) = torch.autograd.grad(ours, x)
    var, mean = torch.var_mean(x.flatten(2), dim=2, correction=0)
    batch_var = x.var((0, 2, 3), unbiased=False)
    direct = torch.sqrt(batch_var + bn.eps) @ weights[0]
    direct = direct + (torch.sqrt(var + bn.eps) * weights[1]).sum() + (mean * weights[1]).sum()
    (expected,) = torch.autograd.grad(direct, x)
    torch.testing.assert_close(stat.sample_mean, mean)
    torch.testing.assert_close(stat.sample_std, torch.sqrt(var + bn.eps))
    torch.testing.assert_close(stat.batch_std, torch.sqrt(batch_var + bn.eps))
    torch.testing.assert_close(grad, expected)


def test_slack_ignores_deviations_inside_the_margin():
    target_std = torch.ones(4)
    margin = expected_deviation(target_std, 16, Distance.NORM, of_std=False)
    assert margin == pytest.approx((4 / 16) ** 0.5)
    bn = nn.BatchNorm2d(4).eval()  # mean 0, std ~1
    capture = StatisticsCapture(batchnorm_targets([("bn", bn)]))
    x = torch.randn(1, 4, 4, 4)
    x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True, unbiased=False)
    x = x + 0.1  # every channel's mean off by 0.1: distance 0.2 < margin 0.5
    with capture:
        bn(x)
    plan = plan_batch(1, 1, 10, torch.Generator().manual_seed(0))
    strict = SynthesisConfig(bn_distance="norm", bn_sample_weight=1.0, bn_batch_weight=0.0)
    slacked = strict.replace(slack=1.0)
    stats, targets = capture.collected(), capture.targets
    assert bn_loss_terms(stats, targets, strict, plan)["bn_sample"] > 0.1
    assert bn_loss_terms(stats, targets, slacked, plan)["bn_sample"] == 0.0


def _sample_term(offsets: list[float], config: SynthesisConfig) -> float:
    """The per-sample term of one image whose channels' means are off by ``offsets``
    (exact standard deviations, BN targets mean 0 and std ~1, 16 positions)."""
    bn = nn.BatchNorm2d(len(offsets)).eval()
    capture = StatisticsCapture(batchnorm_targets([("bn", bn)]))
    x = torch.randn(1, len(offsets), 4, 4, generator=torch.Generator().manual_seed(0))
    x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True, unbiased=False)
    with capture:
        bn(x + torch.tensor(offsets)[None, :, None, None])
    plan = plan_batch(1, 1, 10, torch.Generator().manual_seed(0))
    return float(bn_loss_terms(capture.collected(), capture.targets, config, plan)["bn_sample"])


def test_per_channel_slack_pushes_one_channel_the_aggregate_margin_hides():
    """Each channel's margin is 1/sqrt(16) = 0.25; the margin on the distance over four
    channels is sqrt(4/16) = 0.5. One channel off by 0.4 is inside the second, outside the
    first; all four off by 0.2 are inside both."""
    config = SynthesisConfig(
        bn_distance="norm", bn_sample_weight=1.0, bn_batch_weight=0.0, slack=1.0
    )
    per_channel = config.replace(slack_per_channel=True)
    assert _sample_term([0.4, 0, 0, 0], config) == 0.0
    assert _sample_term([0.4, 0, 0, 0], per_channel) == pytest.approx(0.15, abs=1e-3)
    assert _sample_term([0.2] * 4, config) == 0.0
    assert _sample_term([0.2] * 4, per_channel) == 0.0
    # without slack the option changes nothing
    strict = config.replace(slack=0.0)
    assert _sample_term([0.4, 0, 0, 0], strict) == _sample_term(
        [0.4, 0, 0, 0], strict.replace(slack_per_channel=True)
    )


def test_a_field_added_later_leaves_cached_configs_keys_alone():
    config = SynthesisConfig(slack=1.0)
    assert "slack_per_channel" not in config.to_dict()
    assert SynthesisConfig.from_dict(config.to_dict()) == config
    changed = config.replace(slack_per_channel=True)
    assert changed.to_dict()["slack_per_channel"] is True
    assert SynthesisConfig.from_dict(changed.to_dict()) == changed


def test_layer_emphasis_adds_the_chosen_layers_loss():
    bns = [nn.BatchNorm2d(2).eval(), nn.BatchNorm2d(2).eval()]
    capture = StatisticsCapture(batchnorm_targets([("a", bns[0]), ("b", bns[1])]))
    with capture:
        bns[0](torch.randn(3, 2, 4, 4))
        bns[1](torch.randn(3, 2, 4, 4) * 3)
    plan = plan_batch(3, 2, 10, torch.Generator().manual_seed(0))
    base = SynthesisConfig(bn_sample_weight=1.0, bn_batch_weight=0.0)
    plain = bn_loss_terms(capture.collected(), capture.targets, base, plan)["bn_sample"]
    emphasized = bn_loss_terms(
        capture.collected(), capture.targets, base.replace(layer_emphasis=1.0), plan
    )["bn_sample"]
    assert emphasized > plain


def test_decorrelation_extremes():
    same = torch.ones(4, 5)
    assert decorrelation(same).item() == pytest.approx(1.0)
    orthogonal = torch.eye(4)
    assert decorrelation(orthogonal).item() == pytest.approx(0.0)


def test_swing_convolution_shifts_only_strided_convs_and_cleans_up():
    torch.manual_seed(0)
    strided = nn.Conv2d(1, 1, 3, stride=2, padding=1)
    plain = nn.Conv2d(1, 1, 3, padding=1)
    model = nn.Sequential(plain, strided)
    x = torch.randn(1, 1, 8, 8)
    before = model(x)
    outputs = []
    with swing_convolution(model, 1, torch.Generator().manual_seed(0)):
        assert not plain._forward_pre_hooks and strided._forward_pre_hooks
        for _ in range(8):
            outputs.append(model(x))
    assert any(not torch.equal(out, before) for out in outputs)
    assert all(out.shape == before.shape for out in outputs)
    assert not strided._forward_pre_hooks
    torch.testing.assert_close(model(x), before)


def test_frozen_restores_mode_and_gradients():
    model = nn.Linear(2, 2).train()
    model.bias.requires_grad_(False)
    with frozen(model):
        assert not model.training and not model.weight.requires_grad
    assert model.training and model.weight.requires_grad and not model.bias.requires_grad


def test_batch_seeds_are_independent_of_order():
    seeds = [batch_seed(0, i) for i in range(100)]
    assert len(set(seeds)) == 100
    assert batch_seed(0, 5) == seeds[5] and batch_seed(1, 5) != seeds[5]


def test_a_saturated_tanh_caps_the_generators_standardized_output():
    """Genie's tanh + standardizing BN is nearly two-valued once saturated: its brightest
    value sits near mean + 1 std, below the top of a [0, 1] image's normalized range
    (about +2 std for Fashion-MNIST). Without the tanh the tail is free to reach it."""
    maxima = {}
    for tanh in (True, False):
        torch.manual_seed(0)
        net = LatentGenerator(16, (1, 12, 12), channels=(8, 4), tanh=tanh)
        with torch.no_grad():
            net.body[6].weight.mul_(1000.0)  # the output conv: drive tanh into saturation
            out = net(torch.randn(32, 16))
        assert out.mean().abs() < 1e-4 and (out.std() - 1).abs() < 1e-2
        maxima[tanh] = float(out.max())
    assert maxima[True] < 1.6
    assert maxima[False] > 2.5
