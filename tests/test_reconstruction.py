"""The shared reconstruction routine on each toolkit's own model (tiny models, few steps)."""

import pytest
import torch
from torch import nn

from tests.test_adapter_conformance import BUILT_IN, quantize, tiny_model
from zsq_plugins import QuantSpec, apply
from zsq_plugins.adapter import get_adapter
from zsq_plugins.errors import CacheMismatchError, ChecksumMismatchError
from zsq_plugins.phases import rss_mib
from zsq_plugins.quant.fold import fold_batchnorm
from zsq_plugins.reconstruction.config import ReconstructionConfig
from zsq_plugins.reconstruction.routine import reconstruct

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

FAST = ReconstructionConfig(iterations=150, batch_size=16, drop_probability=0.5)
THOROUGH = FAST.replace(iterations=400)


def _error(quantized, reference, x):
    with torch.no_grad():
        return (quantized.model(x) - reference).pow(2).mean().item()


@pytest.mark.parametrize("weight_scale_lr", [0.0, 1e-3], ids=["rounding", "rounding+weight-steps"])
@pytest.mark.parametrize("name", BUILT_IN)
def test_toolkit_model_reproduces_the_routine(name, weight_scale_lr):
    """The written-back model computes what the routine computed: learned rounding, and with
    Genie-M's learned weight steps the steps too (each toolkit's quantizer must take them)."""
    model = tiny_model("relu6")  # a residual block
    quantized, data = quantize(name, model, QuantSpec.parse("W2A4"))
    config = FAST.replace(weight_scale_lr=weight_scale_lr)
    report = reconstruct(quantized, model, torch.cat(data), config, progress=False)
    assert [b.name for b in report.blocks] == ["stem.0", "body.0", "fc"]
    assert all(block.fidelity <= 1e-5 for block in report.blocks), report.blocks


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILT_IN)
def test_reconstruction_beats_plain_calibration(name):
    # ReLU: plain calibration loses accuracy in every toolkit. With the ReLU6 model, PT2E's
    # X86 recipe leaves the residual sum float, plain calibration is within 7e-5 (MSE) of
    # FP32 already, and there is nothing for reconstruction to win.
    model = tiny_model("relu")
    quantized, data = quantize(name, model, QuantSpec.parse("W2A4"))
    x = torch.cat(data)
    with torch.no_grad():
        reference = fold_batchnorm(model)(x)
    plain = _error(quantized, reference, x)
    reconstruct(quantized, model, x, THOROUGH, progress=False)
    assert _error(quantized, reference, x) < 0.9 * plain


def test_fx_still_converts_to_int8_after_reconstruction():
    model = tiny_model("relu6")
    quantized, data = quantize("fx", model, QuantSpec.parse("W8A8"), size=7)  # no pooling ties
    reconstruct(quantized, model, torch.cat(data), FAST.replace(iterations=20), progress=False)
    converted = get_adapter("fx").convert(quantized)
    with torch.no_grad():
        difference = (converted(data[1]) - quantized.model(data[1])).abs()
    # int8 kernels requantize after every layer, so an output may land a few levels of the
    # output quantizer away from the fake-quantized model, but rarely
    step = quantized.activation_handles()[-1].scale().item()
    assert difference.max() <= 4 * step and difference.mean() <= 0.5 * step


def test_layer_granularity_reconstructs_each_layer():
    model = tiny_model("relu")
    quantized, data = quantize("fx", model, QuantSpec.parse("W4A4"))
    config = FAST.replace(granularity="layer", iterations=20, learn_act_scales=False)
    report = reconstruct(quantized, model, torch.cat(data), config, progress=False)
    assert len(report.blocks) == len(quantized.weight_handles())


def test_each_block_reports_its_steps_apart_from_its_set_up_and_its_peak_memory():
    model = tiny_model("relu")
    quantized, data = quantize("fx", model, QuantSpec.parse("W4A4"))
    report = reconstruct(quantized, model, torch.cat(data), FAST, progress=False)
    for block in report.blocks:
        assert block.iterations == FAST.iterations
        assert 0 < block.step_seconds < block.seconds  # set-up (targets, write-back) is apart
        # the meter's own accuracy is tested in test_phases.py; here, that each block has one
        assert (block.peak_rss_mib is None) == (rss_mib() is None)
        assert block.peak_rss_mib is None or block.peak_rss_mib > 0


@pytest.mark.parametrize("name", BUILT_IN)
def test_cached_block_inputs_change_no_result(name):
    """Replaying cached block inputs (in RAM or in a memory-mapped file) runs every block of
    each toolkit's model, residual skip included, on the values a full forward pass gives."""
    model = tiny_model("relu6")
    config = FAST.replace(iterations=30)
    outputs, reports = {}, {}
    for cache in ("off", "memory", "disk"):
        torch.manual_seed(0)
        quantized, data = quantize(name, model, QuantSpec.parse("W4A4"))
        x = torch.cat(data)
        reports[cache] = reconstruct(
            quantized, model, x, config.replace(block_inputs=cache), progress=False
        )
        with torch.no_grad():
            outputs[cache] = quantized.model(x)
    assert not any(b.cached_inputs for b in reports["off"].blocks)
    # The stem may learn the quantizer of its own input, which rules a cache out. PT2E's X86
    # recipe leaves this model's skip branch float, so the residual block's sum reads a tensor
    # that is not the one replayed: the runner must notice and recompute the prefix.
    expected = [name != "pt2e", True]
    for cache in ("memory", "disk"):
        cached = [b.cached_inputs for b in reports[cache].blocks[1:]]
        assert cached == expected, reports[cache].blocks
        losses = [b.final_loss for b in reports[cache].blocks]
        assert losses == pytest.approx([b.final_loss for b in reports["off"].blocks], rel=1e-4)
        assert torch.allclose(outputs[cache], outputs["off"], atol=1e-5)


def test_each_blocks_inputs_and_targets_are_replayed_from_the_block_before():
    """Every image passes the stem about once, not once per block: each block's inputs are
    the block before's replayed (its targets likewise, in the FP model)."""
    from zsq_plugins import zoo

    model = zoo.load("resnet20_fmnist")
    images = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    quantized = get_adapter("fx").quantize(model, QuantSpec.parse("W4A4"), [images], images[:2])
    seen = []
    stem = quantized.weight_handles()[0].layer
    hook = quantized.model.get_submodule(stem).register_forward_pre_hook(
        lambda _, args: seen.append(len(args[0]))
    )
    try:
        report = reconstruct(
            quantized, model, images, FAST.replace(iterations=2, batch_size=8), progress=False
        )
    finally:
        hook.remove()
    blocks = report.blocks
    assert len(blocks) > 10 and all(b.cached_inputs for b in blocks[1:])
    # From the image, every block's cache alone would pass all images through the stem; a
    # replay passes one image per batch, and each block's checks and probes one batch.
    assert sum(seen) < len(blocks) * len(images) / 2, sum(seen)


class _ReadsInputEarly(torch.nn.Module):
    """Reads the block's input before the block's first layer runs: a replay cannot swap
    that read, so the runner must notice and recompute the prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skip = x * 2
        return self.conv(x) + skip


def test_block_runner_replays_only_when_it_matches_a_full_pass():
    from zsq_plugins.graph.block_inputs import BlockRunner

    images = torch.randn(20, 1, 6, 6)
    index = torch.tensor([3, 7, 19, 0])
    early = _ReadsInputEarly().eval()
    runner = BlockRunner(early, "conv", None, images, batch_size=8)
    assert not runner.replays
    with torch.no_grad():
        assert torch.allclose(runner(index), early(images[index]))
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(2, 3, 1))
    runner = BlockRunner(plain.eval(), "2", None, images, batch_size=8, cache="disk")
    assert runner.replays
    with torch.no_grad():
        assert torch.allclose(runner(index), plain(images[index]))
    runner.close()


def test_auto_block_input_cache_goes_to_disk_above_its_limit(monkeypatch):
    from zsq_plugins.graph import block_inputs

    mapped = []
    original = block_inputs._mapped_tensor
    monkeypatch.setattr(
        block_inputs, "_mapped_tensor", lambda *args: mapped.append(args) or original(*args)
    )
    images = torch.randn(20, 1, 6, 6)
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(2, 3, 1))
    block_inputs.BlockRunner(plain.eval(), "2", None, images, batch_size=8, cache="auto")
    assert not mapped  # 20 x 2 x 4 x 4 floats: far below 1 GiB
    monkeypatch.setattr(block_inputs, "AUTO_MEMORY_LIMIT", 20 * 2 * 4 * 4 * 4 - 1)
    runner = block_inputs.BlockRunner(plain.eval(), "2", None, images, batch_size=8, cache="auto")
    assert len(mapped) == 1 and mapped[0][0] == (20, 2, 4, 4) and runner.replays


def _checkpointed(tmp_path, seed=0, config=None):
    model = tiny_model("relu6")
    quantized, data = quantize("fx", model, QuantSpec.parse("W4A4"))
    config = config or FAST.replace(iterations=10)
    report = reconstruct(
        quantized, model, torch.cat(data), config, seed=seed, progress=False,
        checkpoint_dir=tmp_path,
    )  # fmt: skip
    return quantized, data, report


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_finished_checkpoint_is_restored_not_rerun(tmp_path):
    first, data, report = _checkpointed(tmp_path)
    assert report.resumed_blocks == 0
    again, _, resumed = _checkpointed(tmp_path)
    assert resumed.resumed_blocks == 3
    assert [b.name for b in resumed.blocks] == [b.name for b in report.blocks]
    assert [b.final_loss for b in resumed.blocks] == [b.final_loss for b in report.blocks]
    assert [b.step_seconds for b in resumed.blocks] == [b.step_seconds for b in report.blocks]
    with torch.no_grad():
        torch.testing.assert_close(again.model(data[1]), first.model(data[1]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "named"),
    [({"seed": 1}, "seed: stored 0, now 1"), ({"config": FAST.replace(iterations=11)}, "config.")],
)
def test_a_checkpoint_of_another_run_is_refused_and_kept(tmp_path, change, named):
    _checkpointed(tmp_path)
    kept = _files(tmp_path)
    with pytest.raises(CacheMismatchError, match="another reconstruction") as error:
        _checkpointed(tmp_path, **change)
    assert named in str(error.value)
    assert _files(tmp_path) == kept


def test_a_corrupted_checkpoint_says_so(tmp_path):
    _checkpointed(tmp_path)
    state = next(tmp_path.glob("state-*.safetensors"))
    state.write_bytes(state.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ChecksumMismatchError, match="Delete the folder"):
        _checkpointed(tmp_path)
    (tmp_path / "progress.json").write_text('{"identity": ')
    with pytest.raises(CacheMismatchError, match="not valid JSON"):
        _checkpointed(tmp_path)


def test_apply_refuses_a_checkpoint_without_reconstruction(tmp_path):
    with pytest.raises(TypeError, match="reconstruct_checkpoint need reconstruct="):
        apply(tiny_model("relu6"), data=torch.rand(4, 1, 8, 8), reconstruct_checkpoint=tmp_path)


@pytest.mark.parametrize(
    "change",
    [
        {"drop_probability": 0.0},  # QDrop's rate
        {"weight_scale_lr": 0.0},  # Genie-M's learned weight steps
        {"beta_start": 4.0},  # AdaRound's temperature schedule
        {"rounding_weight": 0.0},  # AdaRound's regularizer
    ],
    ids=lambda change: next(iter(change)),
)
def test_each_ingredient_of_the_presets_changes_the_result(change):
    """An option the routine ignored would leave the toolkit's model as it was."""
    model = tiny_model("relu")
    genie_m = FAST.replace(weight_scale_lr=1e-4)
    states = []
    for config in (genie_m, genie_m.replace(**change)):
        quantized, data = quantize("fx", model, QuantSpec.parse("W2A4"))
        reconstruct(quantized, model, torch.cat(data), config, progress=False)
        weights = [h.scale() for h in quantized.weight_handles()]
        states.append(torch.cat([w.flatten() for w in weights] + [
            p.detach().flatten() for p in quantized.model.parameters()
        ]))  # fmt: skip
    assert not torch.equal(*states)


def test_spatial_mean_loss_averages_positions_and_sums_channels():
    """BRECQ's, QDrop's and Genie's reduction: per image, the squared error summed over
    channels and averaged over positions; ``sum`` adds every element. They differ by the
    number of positions on feature maps and agree on logits."""
    from zsq_plugins.reconstruction.config import LossReduction
    from zsq_plugins.reconstruction.routine import block_loss

    output, target = torch.randn(4, 3, 5, 7), torch.zeros(4, 3, 5, 7)
    summed = block_loss(output, target, LossReduction.SUM)
    averaged = block_loss(output, target, LossReduction.SPATIAL_MEAN)
    torch.testing.assert_close(summed, averaged * 35)
    torch.testing.assert_close(averaged, output.pow(2).sum(1).mean())
    logits = torch.randn(4, 10)
    torch.testing.assert_close(
        block_loss(logits, 0 * logits, LossReduction.SUM),
        block_loss(logits, 0 * logits, LossReduction.SPATIAL_MEAN),
    )


def test_the_loss_reduction_changes_the_result_and_old_records_stay_current():
    from zsq_plugins.compare import same_reconstruction
    from zsq_plugins.reconstruction.config import ReconstructionConfig

    quantized = {}
    for loss in ("sum", "spatial_mean"):
        quantized[loss], data = quantize("fx", tiny_model("relu6"), QuantSpec.parse("W3A4"))
        config = ReconstructionConfig(iterations=30, batch_size=16, loss=loss)
        reconstruct(quantized[loss], tiny_model("relu6"), torch.cat(data), config, progress=False)
    with torch.no_grad():
        gap = (quantized["sum"].model(data[1]) - quantized["spatial_mean"].model(data[1])).abs()
    assert gap.max() > 1e-4
    current = ReconstructionConfig().to_dict()
    recorded_before_the_field = {k: v for k, v in current.items() if k != "loss"}
    assert same_reconstruction(recorded_before_the_field, current)
    assert not same_reconstruction(recorded_before_the_field, {**current, "loss": "spatial_mean"})
    with pytest.raises(ValueError, match="loss must be"):
        ReconstructionConfig(loss="mean")


def test_a_checkpoint_resumes_across_result_neutral_and_later_added_fields(tmp_path):
    """A checkpoint saved by a run whose configuration lacked a field added since (at the
    value that run had) or kept its block inputs elsewhere resumes; another learning rate
    does not."""
    from zsq_plugins.reconstruction.checkpoint import ReconstructionCheckpoint, checkpoint_identity
    from zsq_plugins.reconstruction.routine import BlockReport

    model, images = nn.Linear(3, 2), torch.rand(4, 3)
    current = {**ReconstructionConfig().to_dict(), "routine_revision": 2}
    older = {k: v for k, v in current.items() if k != "loss"} | {"block_inputs": "disk"}
    saved = ReconstructionCheckpoint(tmp_path, checkpoint_identity(older, 0, images, ["a"], model))
    saved.save(model, torch.Generator(), [BlockReport("a", 1, 0.0, 0.0, 0.0, 0.0)])
    same = checkpoint_identity(current, 0, images, ["a"], model)
    assert len(ReconstructionCheckpoint(tmp_path, same).restore(model, torch.Generator())) == 1
    other = checkpoint_identity({**current, "rounding_lr": 1.0}, 0, images, ["a"], model)
    with pytest.raises(CacheMismatchError, match="rounding_lr"):
        ReconstructionCheckpoint(tmp_path, other).restore(model, torch.Generator())


def test_brecqs_two_stages_learn_rounding_with_float_activations_then_steps():
    """BRECQ's schedule: every block's rounding with the activation quantizers off, then every
    block's activation steps with the rounding fixed (a quarter of the steps); the result
    lands on the grid and differs from learning both at once."""
    from unittest import mock

    from zsq_plugins.reconstruction import routine
    from zsq_plugins.reconstruction.config import ReconstructionConfig

    seen = []
    real_block = routine.reconstruct_block

    def recording(quantized, block, point, images, targets, config, *args, **kwargs):
        activations = quantized.activation_handles()
        seen.append((kwargs["learn_rounding"], any(h.enabled for h in activations), config))
        return real_block(quantized, block, point, images, targets, config, *args, **kwargs)

    results = {}
    for schedule in ("joint", "two_stage"):
        seen.clear()
        quantized, data = quantize("fx", tiny_model("relu6"), QuantSpec.parse("W3A4"))
        config = ReconstructionConfig(iterations=40, batch_size=16, schedule=schedule)
        with mock.patch.object(routine, "reconstruct_block", recording):
            report = reconstruct(quantized, tiny_model("relu6"), torch.cat(data), config,
                                 progress=False)  # fmt: skip
        results[schedule] = (quantized, report, list(seen))
    _, joint, joint_calls = results["joint"]
    quantized, two_stage, calls = results["two_stage"]
    assert [b.name for b in joint.blocks] == ["stem.0", "body.0", "fc"]
    assert [b.name for b in two_stage.blocks] == [
        "rounding:stem.0", "rounding:body.0", "rounding:fc",
        "activations:stem.0", "activations:body.0", "activations:fc",
    ]  # fmt: skip
    assert [(r, a) for r, a, _ in calls] == [(True, False)] * 3 + [(False, True)] * 3
    assert all(c.iterations == 40 for _, _, c in calls[:3])
    assert all(c.iterations == 10 for _, _, c in calls[3:])
    assert all(h.enabled for h in quantized.activation_handles())
    assert all(b.fidelity <= 1e-5 for b in two_stage.blocks)
    with torch.no_grad():
        x = data[1]
        gap = (quantized.model(x) - results["joint"][0].model(x)).abs().max()
    assert gap > 1e-4
    assert [(r, a) for r, a, _ in joint_calls] == [(True, True)] * 3


@pytest.mark.parametrize("stop_at", [2, 5])
def test_brecqs_two_stages_resume_from_a_checkpoint(tmp_path, stop_at):
    """Stopped in the rounding stage (its activations off) or in the activation stage, a
    two-stage reconstruction resumed from its checkpoint ends where an uninterrupted one
    ends."""
    from unittest import mock

    from zsq_plugins.reconstruction import routine
    from zsq_plugins.reconstruction.config import ReconstructionConfig

    config = ReconstructionConfig(iterations=16, batch_size=16, schedule="two_stage")
    reference, data = quantize("fx", tiny_model("relu6"), QuantSpec.parse("W4A4"))
    images = torch.cat(data)
    reconstruct(reference, tiny_model("relu6"), images, config, progress=False)
    real_block, calls = routine.reconstruct_block, []

    class Stopped(Exception):
        pass

    def stopping(*args, **kwargs):
        calls.append(None)
        if len(calls) == stop_at:
            raise Stopped
        return real_block(*args, **kwargs)

    interrupted, _ = quantize("fx", tiny_model("relu6"), QuantSpec.parse("W4A4"))
    with mock.patch.object(routine, "reconstruct_block", stopping), pytest.raises(Stopped):
        reconstruct(interrupted, tiny_model("relu6"), images, config, progress=False,
                    checkpoint_dir=tmp_path)  # fmt: skip
    resumed, _ = quantize("fx", tiny_model("relu6"), QuantSpec.parse("W4A4"))
    report = reconstruct(resumed, tiny_model("relu6"), images, config, progress=False,
                         checkpoint_dir=tmp_path)  # fmt: skip
    assert report.resumed_blocks == stop_at - 1
    with torch.no_grad():
        gap = (resumed.model(images) - reference.model(images)).abs().max()
    assert gap <= 1e-6, float(gap)
