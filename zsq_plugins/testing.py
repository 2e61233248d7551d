"""The adapter conformance template: checks every toolkit adapter must pass.

An adapter for a new toolkit is correct when the core's algorithms (synthetic calibration,
accurate activation clipping, adaptive BN, reconstruction) work through its quantizer handles
exactly as the handles' contract says. Each check below builds the adapter's quantized model
of a tiny BatchNorm network and asserts one part of that contract; ``check_adapter`` runs them
all and says which failed and why:

    from zsq_plugins.testing import check_adapter
    failures = check_adapter(MyAdapter())   # {} when the adapter conforms

or, in a pytest suite, one test per check::

    @pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
    def test_my_adapter_conforms(check):
        run_check(check, MyAdapter())

The built-in adapters run the same checks in tests/test_adapter_conformance.py.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from zsq_plugins.adapter import Adapter, QuantizedModel, QuantizerHandle, QuantizerKind
from zsq_plugins.capture import float_weight, plain_tensor
from zsq_plugins.errors import UnsupportedModelError
from zsq_plugins.layers import Normalize
from zsq_plugins.quant.adaptive_bn import adapt_batchnorm, layer_moments
from zsq_plugins.quant.clipping import clip_activations
from zsq_plugins.quant.fakequant import fake_quantize
from zsq_plugins.quant.fold import fold_batchnorm
from zsq_plugins.reconstruction import routine
from zsq_plugins.reconstruction.config import ReconstructionConfig
from zsq_plugins.reconstruction.rounding import LSQActivation
from zsq_plugins.reconstruction.routine import reconstruct
from zsq_plugins.spec import QuantSpec
from zsq_plugins.testing_models import (  # the tiny models, here for the template's users too
    TinyConvNet,
    TinyConvNeXt,
    TinyReLU6Net,
    TinyViT,
    tiny_attention_vit,
    tiny_model,
)

__all__ = [
    "CHECKS",
    "TinyConvNeXt",
    "TinyConvNet",
    "TinyReLU6Net",
    "TinyViT",
    "check_adapter",
    "quantize_tiny",
    "run_check",
    "tiny_model",
]  # fmt: skip


class CheckSkipped(Exception):
    """A check that cannot run here (an optional package is missing); not a failure."""


def quantize_tiny(
    adapter: Adapter, model: nn.Module, spec: QuantSpec, size: int = 8
) -> tuple[QuantizedModel, list[torch.Tensor]]:
    """The adapter's quantized model of ``model``, calibrated on two seeded batches of 16
    random 1 x ``size`` x ``size`` images (returned too).

    Checks that compare the toolkit's model with another runtime (onnxruntime, int8 kernels)
    use an odd ``size``: the global average of an odd number of values on one grid is never
    halfway between two levels, so a runtime that sums in another order rounds every pooled
    value as the toolkit does; over 8 x 8 = 64 values exact ties occur, where either rounding
    is right and the outputs differ by a whole step."""
    generator = torch.Generator().manual_seed(0)
    data = [torch.rand(16, 1, size, size, generator=generator) for _ in range(2)]
    return adapter.quantize(model, spec, data, data[0][:2]), data


def unwrap(value: object) -> torch.Tensor:
    """A quantizer module's output as a tensor (toolkits wrap it in tuples or QuantTensors)."""
    if isinstance(value, tuple | list):
        value = value[0]
    return plain_tensor(value)


def quantizer_io(handle: QuantizerHandle, run: Callable[[], None]) -> tuple[torch.Tensor, ...]:
    """Input and output of the handle's quantizer module during ``run()``."""
    seen: dict[str, torch.Tensor] = {}

    def record(_: nn.Module, args: tuple, output: object) -> None:
        seen.setdefault("input", unwrap(args[0]).detach())
        seen.setdefault("output", unwrap(output).detach())

    hook = handle.module.register_forward_hook(record)
    try:
        run()
    finally:
        hook.remove()
    if not seen:
        raise AssertionError(f"the quantizer module of {handle!r} did not run as a module")
    return seen["input"], seen["output"]


def expected_output(handle: QuantizerHandle, x: torch.Tensor) -> torch.Tensor:
    """What the handle's scale, zero point and grid say its quantizer makes of ``x``."""
    per_channel = handle.axis is not None
    scale, zero_point = handle.scale().flatten(), handle.zero_point().flatten().float()
    return fake_quantize(
        x,
        scale if per_channel else scale[0],
        zero_point if per_channel else zero_point[0],
        handle.quant_min,
        handle.quant_max,
        axis=handle.axis,
    )


def assert_quantizes_like(handle: QuantizerHandle, x: torch.Tensor, y: torch.Tensor) -> None:
    """``y`` is what the handle says its quantizer makes of ``x`` (``expected_output``), but
    for values halfway between two levels, which toolkits round either way (``x * (1 / s)``
    or ``x / s``): there, either neighbouring level is right."""
    expected = expected_output(handle, x)
    wrong = (y - expected).abs() > 1e-6 + 1e-5 * expected.abs()
    if not bool(wrong.any()):
        return
    shape = [1] * x.dim()
    if handle.axis is not None:
        shape[handle.axis] = -1
    scale = handle.scale().flatten().view(shape) if handle.axis is not None else handle.scale()[0]
    steps = x / scale
    at_tie = (steps - steps.floor() - 0.5).abs() < 1e-4
    one_step = ((y - expected).abs() - scale).abs() <= 1e-5 * scale + 1e-7
    unexplained = wrong & ~(at_tie & one_step)
    if bool(unexplained.any()):
        gap = float((y - expected).abs()[unexplained].max())
        raise AssertionError(
            f"{handle!r}: {int(unexplained.sum())} values off its grid (largest gap {gap:.3g})"
        )


def _require(condition: object, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _run(quantized: QuantizedModel, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            quantized.model(x)

    return run


def check_spec_is_honoured(adapter: Adapter) -> None:
    """One weight quantizer per conv/linear at the spec's bits (first and last at 8, or 7
    with the overflow fix: their inputs are 8-bit), per channel on axis 0; per-tensor
    activation quantizers, the model input's at 8 bits; the weight grid full or narrow as the
    spec says."""
    for kind, overflow_fix in (("relu", True), ("relu6", True), ("relu", False)):
        model = tiny_model(kind)
        spec = QuantSpec(weight_bits=3, act_bits=4, overflow_fix=overflow_fix)
        quantized, _ = quantize_tiny(adapter, model, spec)
        folded = fold_batchnorm(model)
        layers = [n for n, m in folded.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        weights = {h.layer: h.bits for h in quantized.weight_handles()}
        _require(sorted(weights) == sorted(layers), f"weight handles {weights} for {layers}")
        first, last = layers[0], layers[-1]
        edge = spec.int8_weight_bits(8, 8)
        _require(
            weights[first] == edge and weights[last] == edge,
            f"first/last not {edge}-bit (overflow_fix={overflow_fix}): {weights}",
        )
        _require(
            all(bits == 3 for layer, bits in weights.items() if layer not in (first, last)),
            f"inner layers not at 3 bits: {weights}",
        )
        _require(all(h.axis == 0 for h in quantized.weight_handles()), "weights not per-channel")
        acts = quantized.activation_handles()
        _require(acts and all(h.axis is None for h in acts), "activations must be per-tensor")
        _require({h.bits for h in acts} == {4, 8}, f"activation bits {[h.bits for h in acts]}")
        normalize = next(n for n, m in model.named_modules() if isinstance(m, Normalize))
        inputs = [h for h in acts if h.layer in ("input", normalize)]
        _require(inputs and all(h.bits == 8 for h in inputs), "the model input must be 8-bit")
    for narrow, grid in ((False, (-4, 3)), (True, (-3, 3))):
        spec = QuantSpec(weight_bits=3, act_bits=4, weight_narrow_range=narrow)
        quantized, _ = quantize_tiny(adapter, tiny_model("relu"), spec)
        grids = {(h.quant_min, h.quant_max) for h in quantized.weight_handles() if h.bits == 3}
        _require(grids == {grid}, f"weight_narrow_range={narrow}: 3-bit weight grids {grids}")


def check_switched_off_equals_folded_fp32(adapter: Adapter) -> None:
    """With every handle disabled the toolkit's model is the BN-folded FP32 model."""
    for kind in ("relu", "relu6"):
        model = tiny_model(kind)
        quantized, data = quantize_tiny(adapter, model, QuantSpec(weight_bits=4, act_bits=4))
        x = data[1]
        with torch.no_grad():
            expected = fold_batchnorm(model)(x)
            _require((quantized.model(x) - expected).abs().max() > 1e-4, "quantization is off")
            for handle in quantized.handles:
                handle.set_enabled(False)
                _require(not handle.enabled, f"{handle!r} still enabled after set_enabled(False)")
            torch.testing.assert_close(quantized.model(x), expected, rtol=1e-5, atol=1e-5)
            for handle in quantized.handles:
                handle.set_enabled(True)
            _require((quantized.model(x) - expected).abs().max() > 1e-4, "re-enabling failed")


def check_handles_describe_the_quantizers(adapter: Adapter) -> None:
    """Each kind's 4-bit quantizer computes what its handle's scale, zero point and grid
    say, before and after ``set_scale``; a step shrunk until values saturate checks the
    grid's ends, the narrow weight grid's too."""
    quantized, data = quantize_tiny(adapter, tiny_model("relu"), QuantSpec.parse("W4A4"))
    for kind in (QuantizerKind.ACTIVATION, QuantizerKind.WEIGHT):
        handle = next(h for h in quantized.handles if h.kind is kind and h.bits == 4)
        x, y = quantizer_io(handle, _run(quantized, data[1]))
        torch.testing.assert_close(y, expected_output(handle, x), rtol=1e-5, atol=1e-6)
        new_scale = handle.scale() * 1.7
        handle.set_scale(new_scale)
        torch.testing.assert_close(handle.scale(), new_scale)
        x2, y2 = quantizer_io(handle, _run(quantized, data[1]))
        torch.testing.assert_close(y2, expected_output(handle, x2), rtol=1e-5, atol=1e-6)
        _require(not torch.allclose(y2, y), f"set_scale did not change {handle!r}'s output")
    narrow = QuantSpec(weight_bits=4, act_bits=4, weight_narrow_range=True)
    full = (quantized, data)  # the model above, on the full grid
    for quantized, data in (full, quantize_tiny(adapter, tiny_model("relu"), narrow)):
        handle = next(h for h in quantized.weight_handles() if h.bits == 4)
        handle.set_scale(handle.scale() * 0.2)
        x, y = quantizer_io(handle, _run(quantized, data[1]))
        torch.testing.assert_close(y, expected_output(handle, x), rtol=1e-5, atol=1e-6)


def check_onnx_export(adapter: Adapter) -> None:
    """The exported QDQ ONNX runs in onnxruntime and matches the toolkit's model (skipped for
    an adapter whose ``export_onnx`` raises NotImplementedError)."""
    try:
        import onnxruntime
    except ImportError:
        raise CheckSkipped("onnxruntime is not installed") from None
    for label in ("W8A8", "W4A4"):
        spec = QuantSpec.parse(label)
        quantized, data = quantize_tiny(adapter, tiny_model("relu6"), spec, size=7)
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = adapter.export_onnx(quantized, Path(folder) / "model.onnx", data[0][:2])
            except NotImplementedError as reason:
                raise CheckSkipped(f"the adapter does not export ONNX: {reason}") from None
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            x = data[1]
            (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = unwrap(quantized.model(x))
        # Float accumulation differs between runtimes, so a value may round to the
        # neighbouring level of a quantizer now and then: allow a few percent of the range.
        tolerance = 0.03 * float(expected.abs().max())
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=tolerance, rtol=0)
        agreement = (torch.from_numpy(got).argmax(1) == expected.argmax(1)).float().mean()
        _require(agreement >= 0.9, f"{label}: ONNX top-1 agrees on {agreement:.0%} only")


U8_MAX, INT16_MAX = 255, 32767


def check_int8_kernels_cannot_overflow(adapter: Adapter) -> None:
    """At W8A8 and W4A4 no weight grid lets a pair of u8 x s8 products overflow int16 (what
    x86 int8 kernels without VNNI add first): the spec's ``overflow_fix``. Without it, W8A8
    has weights that can."""
    for spec in (QuantSpec.parse("W8A8"), QuantSpec.parse("W4A4")):
        quantized, _ = quantize_tiny(adapter, tiny_model("relu6"), spec)
        largest = {
            h.layer: max(abs(h.quant_min), abs(h.quant_max)) for h in quantized.weight_handles()
        }
        unsafe = {layer: q for layer, q in largest.items() if 2 * U8_MAX * q > INT16_MAX}
        _require(not unsafe, f"{spec.label}: weights that can overflow int16 pairs: {unsafe}")
    spec = QuantSpec.parse("W8A8", overflow_fix=False)
    quantized, _ = quantize_tiny(adapter, tiny_model("relu6"), spec)
    full = [h for h in quantized.weight_handles() if max(-h.quant_min, h.quant_max) >= 127]
    _require(full, "overflow_fix=False must keep the full 8-bit weight grid")


def check_identity_overrides_give_fp32_back(adapter: Adapter) -> None:
    """Overriding every quantizer by the identity gives the folded FP32 model; removing the
    overrides restores the quantized model."""
    model = tiny_model("relu6")
    quantized, data = quantize_tiny(adapter, model, QuantSpec.parse("W4A4"))
    x = data[1]
    with torch.no_grad():
        before = quantized.model(x)
        removers = [handle.override(lambda value: value) for handle in quantized.handles]
        try:
            expected = fold_batchnorm(model)(x)
            torch.testing.assert_close(quantized.model(x), expected, rtol=1e-5, atol=1e-5)
        finally:
            for remover in removers:
                remover.remove()
        torch.testing.assert_close(quantized.model(x), before)


def check_gradients_reach_overrides(adapter: Adapter) -> None:
    """Gradients flow into the functions that override a weight and an activation
    quantizer (what learned rounding and step sizes need)."""
    quantized, data = quantize_tiny(adapter, tiny_model("relu"), QuantSpec.parse("W4A4"))
    weight = next(h for h in quantized.weight_handles() if h.bits == 4)
    act = next(h for h in quantized.activation_handles() if h.bits == 4)
    delta = torch.zeros((), requires_grad=True)
    gain = torch.ones((), requires_grad=True)
    removers = [weight.override(lambda w: w + delta), act.override(lambda x: x * gain)]
    try:
        quantized.model(data[1]).pow(2).sum().backward()
    finally:
        for remover in removers:
            remover.remove()
    _require(delta.grad is not None and delta.grad.abs() > 0, "no gradient through a weight")
    _require(gain.grad is not None and gain.grad.abs() > 0, "no gradient through an activation")


def check_override_acts_only_while_enabled(adapter: Adapter) -> None:
    """A disabled quantizer ignores its override."""
    quantized, data = quantize_tiny(adapter, tiny_model("relu"), QuantSpec.parse("W4A4"))
    handle = next(h for h in quantized.activation_handles() if h.bits == 4)
    handle.set_enabled(False)
    with torch.no_grad():
        off = quantized.model(data[1])
        remover = handle.override(lambda x: x * 0)
        try:
            torch.testing.assert_close(quantized.model(data[1]), off)
        finally:
            remover.remove()


def _ties(handle: QuantizerHandle) -> torch.Tensor:
    """The midpoints between the handle's activation levels and their float neighbours: the
    inputs whose rounding depends on the toolkit's arithmetic to the last bit."""
    step, zero_point = handle.scale()[:1], handle.zero_point()[:1].float()
    levels = torch.arange(handle.quant_min, handle.quant_max).float()
    middle = (levels - zero_point + 0.5) * step
    above = below = middle
    points = [middle]
    for _ in range(3):
        above = torch.nextafter(above, torch.full_like(above, math.inf))
        below = torch.nextafter(below, torch.full_like(below, -math.inf))
        points += [above, below]
    return torch.cat(points)


def check_learned_steps_quantize_like_the_toolkit(adapter: Adapter) -> None:
    """With a new step written through its handle, each activation quantizer overridden by
    the routine's learned quantizer (LSQActivation, given the toolkit's output through
    ``override(..., with_output=True)``) gives what the toolkit's own quantizer gives, bit for
    bit, at rounding ties too."""
    quantized, data = quantize_tiny(adapter, tiny_model("relu6"), QuantSpec.parse("W4A4"))
    handles = [h for h in quantized.activation_handles() if h.enabled]
    inputs = [quantizer_io(h, _run(quantized, data[1]))[0] for h in handles]
    for handle, seen in zip(handles, inputs, strict=True):
        handle.set_scale(handle.scale() * 0.83)  # as if learned
        lsq = LSQActivation(handle.scale(), handle.zero_point(), handle.quant_min, handle.quant_max)
        x = torch.cat([seen.flatten(), _ties(handle)]).reshape(1, -1, 1, 1)
        with torch.no_grad():
            own = unwrap(handle.module(x))
            learn = lambda v, out, lsq=lsq: lsq(v, plain_tensor(out))  # noqa: E731
            remover = handle.override(learn, with_output=True)
            try:
                learned = unwrap(handle.module(x))
            finally:
                remover.remove()
        wrong = int((learned != own).sum())
        _require(wrong == 0, f"{handle!r}: LSQActivation differs from the toolkit on {wrong}")


def check_accurate_activation_clipping(adapter: Adapter) -> None:
    """AAC's ranges land on the toolkit's own quantizers, which then compute with them."""
    quantized, data = quantize_tiny(adapter, tiny_model("relu6"), QuantSpec.parse("W4A3"))
    images = torch.cat(data)
    kept = {h.layer: h.scale().clone() for h in quantized.activation_handles()}
    results = clip_activations(quantized, images)
    _require(results and all(r.mse_after < r.mse_before for r in results), f"{results}")
    _require(
        any(r.mse_after < 0.9 * r.mse_before for r in results),
        "3-bit min-max ranges should leave room for a better clip",
    )
    changed = {r.layer: r for r in results}
    for handle in quantized.activation_handles():
        if handle.layer in changed:
            scale = handle.scale().flatten()[0].item()
            torch.testing.assert_close(scale, changed[handle.layer].new_scale, rtol=1e-5, atol=0)
        else:
            torch.testing.assert_close(handle.scale(), kept[handle.layer])
    for handle in quantized.activation_handles():  # the toolkit's own kernels use the range
        x, y = quantizer_io(handle, _run(quantized, data[1]))
        torch.testing.assert_close(y, expected_output(handle, x), rtol=1e-5, atol=1e-6)


def weight_levels(quantized: QuantizedModel, handle: QuantizerHandle, probe: torch.Tensor):
    """The integer levels of ``handle``'s layer weight on its grid."""
    weight = float_weight(quantized.model, handle, probe).detach()
    scale, zero_point = handle.scale(), handle.zero_point()
    if handle.axis is not None:
        shape = [1] * weight.dim()
        shape[handle.axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    levels = torch.round(weight / scale) + zero_point
    return torch.clamp(levels, handle.quant_min, handle.quant_max)


def check_adaptive_bn(adapter: Adapter) -> None:
    """After adaptive BN every layer of the toolkit's model has the FP channel statistics,
    the same integer levels, and its logits' means move toward FP32."""
    model = tiny_model("relu6")
    quantized, data = quantize_tiny(adapter, model, QuantSpec(weight_bits=3, act_bits=4))
    images = torch.cat(data)
    probe = images[:1]
    levels = {h.layer: weight_levels(quantized, h, probe) for h in quantized.weight_handles()}
    folded = fold_batchnorm(model)
    with torch.no_grad():
        fp_logits = folded(images)
        gap_before = (unwrap(quantized.model(images)).mean(0) - fp_logits.mean(0)).abs().max()
    corrections = adapt_batchnorm(quantized, model, images, max_scale_change=10)
    order = [c.layer for c in corrections]
    _require(order == ["stem.0", "body.0", "fc"], f"layers corrected in order {order}")
    _require(max(c.mean_gap_before for c in corrections) > 0.05, "3-bit weights shift means")
    for handle in quantized.weight_handles():  # measured again in the toolkit's model
        (mean_q, std_q), (mean_fp, std_fp) = layer_moments(quantized, folded, handle, images)
        bias = quantized.model.get_submodule(handle.layer).bias.detach().double()
        torch.testing.assert_close(mean_q + bias, mean_fp, atol=1e-4, rtol=1e-4)
        if handle.axis is not None:
            torch.testing.assert_close(std_q, std_fp, atol=1e-4, rtol=1e-4)
        _require(
            torch.equal(weight_levels(quantized, handle, probe), levels[handle.layer]),
            f"adaptive BN changed integer levels of {handle.layer!r}",
        )
    with torch.no_grad():
        gap_after = (unwrap(quantized.model(images)).mean(0) - fp_logits.mean(0)).abs().max()
    _require(gap_after < 0.5 * gap_before, f"logit mean gap {gap_before:.4f} -> {gap_after:.4f}")


def check_reconstruction_lands_on_the_grid(adapter: Adapter) -> None:
    """The shared reconstruction routine runs on the toolkit's model: afterwards the model
    reproduces the routine's block outputs (fidelity <= 1e-5) and every weight sits on its
    quantizer's grid."""
    model = tiny_model("relu6")
    quantized, data = quantize_tiny(adapter, model, QuantSpec.parse("W3A4"))
    images = torch.cat(data)
    config = ReconstructionConfig(iterations=30, batch_size=16, drop_probability=0.5)
    report = reconstruct(quantized, model, images, config, progress=False)
    _require([b.name for b in report.blocks] == ["stem.0", "body.0", "fc"], f"{report.blocks}")
    for block in report.blocks:
        _require(block.fidelity <= 1e-5, f"block {block.name}: fidelity {block.fidelity}")
    for handle in quantized.weight_handles():
        weight = float_weight(quantized.model, handle, images[:1]).detach()
        levels = weight_levels(quantized, handle, images[:1])
        scale = handle.scale().reshape([-1] + [1] * (weight.dim() - 1))
        zero_point = handle.zero_point().reshape(scale.shape)
        torch.testing.assert_close(weight, (levels - zero_point) * scale, atol=1e-6, rtol=1e-5)


def check_reconstruction_learns_every_activation_quantizer(adapter: Adapter) -> None:
    """Every enabled activation quantizer gets a learned step from the routine, whatever the
    toolkit names it and wherever it places it (a ReLU's output, a layer's input, a residual
    branch, the logits)."""
    quantized, data = quantize_tiny(adapter, tiny_model("relu6"), QuantSpec.parse("W4A4"))
    handles = [h for h in quantized.activation_handles() if h.enabled]
    before = [h.scale().clone() for h in handles]
    config = ReconstructionConfig(
        iterations=20, batch_size=16, init_act_ranges=False, init_weight_steps=False
    )
    reconstruct(quantized, tiny_model("relu6"), torch.cat(data), config, progress=False)
    fixed = [h.layer for h, old in zip(handles, before, strict=True) if torch.equal(h.scale(), old)]
    _require(not fixed, f"activation steps not learned: {fixed}")


class _Interrupted(Exception):
    """Stands for a run stopped between two blocks (Ctrl-C, a lost machine)."""


def check_reconstruction_resumes_from_a_checkpoint(adapter: Adapter) -> None:
    """A reconstruction interrupted after its first block, resumed on a newly built model from
    its checkpoint, ends where an uninterrupted run ends: the toolkit's model restores from
    the saved state."""
    spec = QuantSpec.parse("W4A4")
    config = ReconstructionConfig(iterations=15, batch_size=16, drop_probability=0.5)
    reference, data = quantize_tiny(adapter, tiny_model("relu6"), spec)
    images = torch.cat(data)
    reconstruct(reference, tiny_model("relu6"), images, config, progress=False)
    real_block = routine.reconstruct_block
    calls = []

    def stopping_before_the_second_block(*args: object, **kwargs: object) -> object:
        calls.append(None)
        if len(calls) == 2:
            raise _Interrupted
        return real_block(*args, **kwargs)

    with tempfile.TemporaryDirectory() as folder:
        interrupted, _ = quantize_tiny(adapter, tiny_model("relu6"), spec)
        stopping = mock.patch.object(routine, "reconstruct_block", stopping_before_the_second_block)
        with stopping, contextlib.suppress(_Interrupted):
            reconstruct(
                interrupted, tiny_model("relu6"), images, config, progress=False,
                checkpoint_dir=folder,
            )  # fmt: skip
        _require(len(calls) == 2, f"the run was not interrupted ({len(calls)} blocks started)")
        resumed, _ = quantize_tiny(adapter, tiny_model("relu6"), spec)
        report = reconstruct(
            resumed, tiny_model("relu6"), images, config, progress=False, checkpoint_dir=folder
        )
    _require(report.resumed_blocks == 1, f"{report.resumed_blocks} blocks resumed, not 1")
    with torch.no_grad():
        expected = unwrap(reference.model(images))
        got = unwrap(resumed.model(images))
    gap = float((got - expected).abs().max())
    _require(gap <= 1e-6, f"resumed run's logits differ from the uninterrupted run's by {gap}")


def check_deployed_model_reproduces_the_routine(adapter: Adapter) -> None:
    """For an adapter whose toolkit runs outside torch (it has ``deploy``, see
    zsq_plugins.adapter): after reconstruction, the deployed model (what ``apply`` returns)
    gives the top-1 of the routine's final model on every image, and logits within a small
    fraction of what reconstruction changed (a runtime's integer arithmetic may put a value
    on the neighbouring level now and then). Skipped for adapters without ``deploy``."""
    deploy = getattr(adapter, "deploy", None)
    if deploy is None:
        raise CheckSkipped("the adapter's model is the toolkit's own (no deploy step)")
    model = tiny_model("relu6")
    quantized, data = quantize_tiny(adapter, model, QuantSpec.parse("W4A4"), size=7)
    held_out = torch.rand(64, 1, 7, 7, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = unwrap(quantized.model(held_out)).clone()
    config = ReconstructionConfig(iterations=30, batch_size=16, drop_probability=0.5)
    reconstruct(quantized, model, torch.cat(data), config, progress=False)
    deployed = deploy(quantized)
    with torch.no_grad():
        routine_output = unwrap(quantized.model(held_out))
        deployed_output = unwrap(deployed(held_out))
    agreement = (routine_output.argmax(1) == deployed_output.argmax(1)).float().mean()
    _require(agreement == 1, f"the deployed model's top-1 agrees on {agreement:.0%} only")
    gap = (routine_output - deployed_output).abs().mean()
    moved = (routine_output - before).abs().mean()
    _require(gap <= 0.1 * moved, f"deployed logits {gap:.3g} off; reconstruction moved {moved:.3g}")


def check_layer_norm_and_attention_models(adapter: Adapter) -> None:
    """A BN-free ConvNeXt-style CNN (LayerNorm, GELU, channel-last linears, layer scale) and
    two small vision transformers (nn.TransformerEncoder; attention written out with heads):
    each is quantized at W8A8 close to FP32 (every handle describing its quantizer's grid) or
    refused before any work with a typed error that says why (UnsupportedModelError), never a
    toolkit's raw exception. "Close" is 5% of the logits' norm, 10% for the written-out
    attention, where a toolkit may quantize every product, norm and transpose (fx: 41 places,
    none worth more than a point alone)."""
    models = (
        (TinyConvNeXt().eval(), (1, 32, 32), 0.05),
        (TinyViT().eval(), (1, 16, 16), 0.05),
        (tiny_attention_vit(), (1, 16, 16), 0.1),
    )
    for model, shape, limit in models:
        generator = torch.Generator().manual_seed(0)
        data = [torch.rand(16, *shape, generator=generator) for _ in range(2)]
        try:
            quantized = adapter.quantize(model, QuantSpec.parse("W8A8"), data, data[0][:2])
        except UnsupportedModelError as refusal:
            _require(str(refusal), f"{type(model).__name__}: a refusal without a reason")
            continue
        _require(quantized.weight_handles(), f"{type(model).__name__}: no weight quantized")
        with torch.no_grad():
            expected = model(data[1])
            error = (unwrap(quantized.model(data[1])) - expected).norm() / expected.norm()
        _require(error < limit, f"{type(model).__name__}: W8A8 {error:.1%} off FP32")


CHECKS: tuple[Callable[[Adapter], None], ...] = (
    check_spec_is_honoured,
    check_switched_off_equals_folded_fp32,
    check_handles_describe_the_quantizers,
    check_onnx_export,
    check_int8_kernels_cannot_overflow,
    check_identity_overrides_give_fp32_back,
    check_gradients_reach_overrides,
    check_override_acts_only_while_enabled,
    check_learned_steps_quantize_like_the_toolkit,
    check_accurate_activation_clipping,
    check_adaptive_bn,
    check_reconstruction_lands_on_the_grid,
    check_reconstruction_learns_every_activation_quantizer,
    check_reconstruction_resumes_from_a_checkpoint,
    check_deployed_model_reproduces_the_routine,
    check_layer_norm_and_attention_models,
)
"""Every conformance check, in the order ``check_adapter`` runs them."""


def run_check(check: Callable[[Adapter], None], adapter: Adapter) -> None:
    """Runs one check; in pytest, a CheckSkipped becomes a skip."""
    try:
        check(adapter)
    except CheckSkipped as reason:
        import pytest

        pytest.skip(str(reason))


def check_adapter(
    adapter: Adapter, checks: tuple[Callable[[Adapter], None], ...] = CHECKS
) -> dict[str, str]:
    """Runs every check on ``adapter``; returns ``{check name: why it failed}`` for the ones
    that failed (empty when the adapter conforms). Skipped checks are not failures."""
    failures = {}
    for check in checks:
        try:
            check(adapter)
        except CheckSkipped:
            continue
        except Exception as error:  # a check's failure, reported with its kind and message
            failures[check.__name__] = f"{type(error).__name__}: {error}"
    return failures
