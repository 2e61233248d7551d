import pytest
import torch

from zsq_plugins.quant.fakequant import affine_params, fake_quantize
from zsq_plugins.reconstruction.config import ReconstructionConfig
from zsq_plugins.reconstruction.rounding import AdaRoundWeight, LSQActivation, drop_mask


def _weight():
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3)
    flat = weight.flatten(1)
    scale, zero, qmin, qmax = affine_params(flat.min(1).values, flat.max(1).values, 4, True)
    return weight, scale, zero, qmin, qmax


def test_soft_weight_starts_at_the_fp_weight_and_hard_is_on_the_grid():
    weight, scale, zero, qmin, qmax = _weight()
    ada = AdaRoundWeight(weight, scale, zero, qmin, qmax)
    torch.testing.assert_close(ada(), weight, atol=1e-3 * scale.max().item(), rtol=0)
    hard = ada(hard=True)
    nearest = fake_quantize(weight, scale, zero, qmin, qmax, axis=0)
    torch.testing.assert_close(hard, nearest)  # initial rounding = round to nearest
    levels = ada.levels(hard=True)
    assert torch.equal(levels, levels.round()) and levels.min() >= qmin and levels.max() <= qmax


def test_regularizer_is_zero_only_at_hard_decisions():
    weight, scale, zero, qmin, qmax = _weight()
    ada = AdaRoundWeight(weight, scale, zero, qmin, qmax)
    assert ada.regularizer(2.0) > 0
    with torch.no_grad():
        ada.rounding.copy_(torch.where(ada.rounding > 0, 10.0, -10.0))
    assert ada.regularizer(2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_learned_rounding_beats_rounding_to_nearest_on_correlated_inputs():
    # Correlated inputs let rounding errors of different weights cancel: AdaRound's premise.
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    scale, zero, qmin, qmax = affine_params(weight.min(1).values, weight.max(1).values, 3, True)
    x = torch.randn(256, 2) @ torch.randn(2, 16) + 0.01 * torch.randn(256, 16)
    target = x @ weight.T
    config = ReconstructionConfig()
    ada = AdaRoundWeight(weight, scale, zero, qmin, qmax, config.zeta, config.gamma)

    def error(w):
        return (x @ w.T - target).pow(2).mean().item()

    nearest = error(ada(hard=True))
    optimizer = torch.optim.Adam([ada.rounding], lr=1e-2)
    steps = 500
    for step in range(steps):
        loss = (x @ ada().T - target).pow(2).sum(1).mean()
        if step >= config.warmup * steps:
            progress = (step - config.warmup * steps) / ((1 - config.warmup) * steps)
            beta = config.beta_start + (config.beta_end - config.beta_start) * progress
            loss = loss + config.rounding_weight * ada.regularizer(beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert error(ada(hard=True)) < 0.5 * nearest


def test_learned_step_size_gets_gradients_only_when_asked():
    weight, scale, zero, qmin, qmax = _weight()
    fixed = AdaRoundWeight(weight, scale, zero, qmin, qmax)
    learned = AdaRoundWeight(weight, scale, zero, qmin, qmax, learn_scale=True)
    assert not fixed.scale.requires_grad
    learned().sum().backward()
    assert learned.scale.grad is not None and learned.scale.grad.abs().sum() > 0


def test_lsq_activation_matches_fake_quant_and_learns_its_step():
    x = torch.rand(8, 4, 5, 5) * 3
    scale, zero, qmin, qmax = affine_params(x.min(), x.max(), 4, False)
    lsq = LSQActivation(scale, zero, qmin, qmax)
    torch.testing.assert_close(lsq(x), fake_quantize(x, scale, zero, qmin, qmax))
    (lsq(x) - x).pow(2).sum().backward()
    assert lsq.scale.grad is not None and lsq.scale.grad.abs() > 0


def _recorded_lsq(x, exact, keep, step, zero, qmin, qmax):
    """LSQ with the toolkit's value and QDrop written as recorded elementwise operations, the
    way the routine once did it: the reference for the one-pass gradient."""
    factor = 1.0 / (x.numel() / x.shape[0] * qmax) ** 0.5
    scale = step.detach() + (step * factor - (step * factor).detach())
    levels = torch.clamp(
        x / scale + (torch.round(x / scale) - x / scale).detach() + zero, qmin, qmax
    )
    quantized = (levels - zero) * scale
    value = quantized + (exact - quantized).detach()
    return value if keep is None else torch.where(keep, x, value)


@pytest.mark.parametrize("qdrop", [False, True])
@pytest.mark.parametrize(("qmin", "qmax", "zero"), [(0, 15, 3.0), (-128, 127, 0.0)])
def test_lsq_gradients_match_the_recorded_operations(qdrop, qmin, qmax, zero):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 6, 6, generator=generator) * 2  # beyond the range: clamps too
    keep = torch.rand(x.shape, generator=generator) < 0.5 if qdrop else None
    step = torch.tensor([0.11])
    exact = fake_quantize(x, step, torch.tensor([zero]), qmin, qmax)
    upstream = torch.randn(x.shape, generator=generator)
    grads = []
    for fused in (True, False):
        xi = x.clone().requires_grad_(True)
        lsq = LSQActivation(step, torch.tensor([zero]), qmin, qmax)
        if fused:
            out = lsq(xi, exact, keep)
        else:
            out = _recorded_lsq(xi, exact, keep, lsq.scale, lsq.zero_point, qmin, qmax)
        (out * upstream).sum().backward()
        grads.append((out.detach(), xi.grad, lsq.scale.grad))
    (value, grad_x, grad_step), (value_ref, grad_x_ref, grad_step_ref) = grads
    assert torch.equal(value, value_ref)
    torch.testing.assert_close(grad_x, grad_x_ref)
    torch.testing.assert_close(grad_step, grad_step_ref, rtol=1e-4, atol=1e-6)
    assert grad_step.abs() > 0


@pytest.mark.parametrize("probability", [0.1, 0.5, 0.9])
def test_drop_mask_keeps_each_element_independently_with_its_probability(probability):
    shape = (3, 7, 101, 53)  # an element count that is not a multiple of 4
    mask = drop_mask(shape, probability, torch.Generator().manual_seed(0))
    assert mask.shape == shape and mask.dtype == torch.bool
    flat = mask.flatten().float()
    assert abs(flat.mean() - probability) < 0.01
    # elements drawn from the same 64-bit word and neighbours: no correlation
    for lag in (1, 2, 3, 4):
        both = (flat[:-lag] * flat[lag:]).mean()
        assert abs(both - probability**2) < 0.01
    again = drop_mask(shape, probability, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert not torch.equal(mask, drop_mask(shape, probability, torch.Generator().manual_seed(1)))


def test_lsq_forward_uses_its_step_exactly():
    # LSQ's gradient scaling must not perturb the forward step by even one ulp: the written-back
    # step must reproduce the routine's output bit for bit in the toolkit (fidelity 0), and an
    # activation near a rounding tie would otherwise land one level off
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        scale = torch.rand(1, generator=generator) * 0.1 + 1e-3
        channels = int(torch.randint(1, 64, (1,), generator=generator))
        x = torch.rand(2, channels, 3, 3, generator=generator)
        lsq = LSQActivation(scale, torch.zeros(1), 0, 15)
        assert torch.equal(lsq(x), fake_quantize(x, lsq.scale.detach(), torch.zeros(1), 0, 15))


def test_config_validation_and_round_trip():
    config = ReconstructionConfig(drop_probability=0.5, weight_scale_lr=1e-4)
    assert ReconstructionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="drop_probability"):
        ReconstructionConfig(drop_probability=1.0)
    with pytest.raises(ValueError, match="granularity"):
        ReconstructionConfig(granularity="model")
    with pytest.raises(ValueError, match="unknown reconstruction option"):
        config.replace(lr=1.0)


def test_the_bare_config_is_brecq_at_the_paper_budget_learned_jointly():
    """What ReconstructionConfig's docstring says; the entry points default to genie-m."""
    import inspect

    from zsq_plugins.reconstruction import RECONSTRUCTIONS, reconstruct

    brecq = RECONSTRUCTIONS.get("brecq").config("paper")
    assert ReconstructionConfig() == brecq.replace(schedule="joint")
    assert brecq.schedule.value == "two_stage"
    defaults = inspect.signature(reconstruct).parameters
    assert (defaults["preset"].default, defaults["budget"].default) == ("genie-m", "auto")
