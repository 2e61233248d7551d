"""x86 int8 kernels without VNNI, and the overflow fix that keeps them exact.

Without VNNI (AVX2, AVX-512 before Cascade Lake), fbgemm (torch's int8 kernels) and
onnxruntime's U8S8 kernels multiply u8 activations by s8 weights with VPMADDUBSW, which adds
each pair of neighbouring products in saturating int16; VPMADDWD then sums the pairs in int32.
2 x 255 x 128 does not fit int16, 2 x 255 x 64 does: ``QuantSpec.overflow_fix`` gives 7-bit
weights to the layers whose weights and input are both 8-bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_adapter_conformance import quantize_resnet20
from zsq_plugins.adapter import QuantizedModel, QuantizerHandle
from zsq_plugins.testing import expected_output

pytestmark = [pytest.mark.fx, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

INT16 = torch.iinfo(torch.int16)


def avx2_u8s8_dot(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Dot products of the rows of u8 ``a`` (N, K) and s8 ``w`` (M, K) as VPMADDUBSW then
    VPMADDWD compute them: products of neighbouring k added in pairs, each pair saturated to
    int16, the pairs summed exactly."""
    if a.shape[1] % 2:
        a, w = (torch.nn.functional.pad(t, (0, 1)) for t in (a, w))
    products = a.long()[:, None, :] * w.long()[None, :, :]
    pairs = products.unflatten(-1, (-1, 2)).sum(-1).clamp(INT16.min, INT16.max)
    return pairs.sum(-1)


def integer_weights(quantized: QuantizedModel, handle: QuantizerHandle) -> torch.Tensor:
    """A conv/linear layer's weight as the integers its quantizer holds, one row per output
    channel, in the order an NHWC int8 kernel reads them (kernel rows, columns, channels)."""
    weight = quantized.model.get_submodule(handle.layer).weight.detach()
    scale = handle.scale().reshape(-1, *[1] * (weight.dim() - 1))
    zero_point = handle.zero_point().reshape(scale.shape).float()
    integers = torch.round(expected_output(handle, weight) / scale + zero_point).long()
    return integers.permute(0, *range(2, weight.dim()), 1).flatten(1)


def test_the_emulation_saturates_as_avx2_does():
    a = torch.tensor([[255, 255, 255, 0]])
    full = torch.tensor([[127, 127, -128, 5]])
    assert avx2_u8s8_dot(a, full).item() == INT16.max - 255 * 128  # first pair clipped
    assert (a.long() @ full.long().T).item() == 2 * 255 * 127 - 255 * 128
    seven_bit = torch.tensor([[63, 63, -64, 5]])
    assert avx2_u8s8_dot(a, seven_bit).item() == (a.long() @ seven_bit.long().T).item()


@pytest.mark.parametrize("overflow_fix", [True, False])
def test_worst_case_inputs_overflow_int16_only_without_the_fix(overflow_fix):
    """For each output channel, the input that pushes its positive pairs highest (255 where the
    weight is positive): the emulated AVX2 kernel differs from exact int32 arithmetic in some
    layer of resnet20 at W8A8 without the fix, and in none with it."""
    _, _, quantized, _ = quantize_resnet20("fx", "W8A8", overflow_fix=overflow_fix)
    wrong = []
    for handle in quantized.weight_handles():
        w = integer_weights(quantized, handle)
        worst = 255 * (w > 0).long()  # one worst input per output channel
        exact = (worst * w).sum(1)
        emulated = torch.diagonal(avx2_u8s8_dot(worst, w))
        if not torch.equal(exact, emulated):
            wrong.append(handle.layer)
    if overflow_fix:
        assert wrong == []
    else:
        assert len(wrong) > 1, wrong


AVX2_RUN = """
import json, sys, warnings
import torch
warnings.simplefilter("ignore")
from zsq_plugins import QuantSpec
from zsq_plugins.adapter import get_adapter
from zsq_plugins.testing import quantize_tiny, tiny_model
adapter = get_adapter("fx")
spec = QuantSpec.parse("W8A8", overflow_fix=sys.argv[1] == "on")
quantized, data = quantize_tiny(adapter, tiny_model("relu6"), spec, size=7)
converted = adapter.convert(quantized)
with torch.no_grad():
    gap = (converted(data[1]) - quantized.model(data[1])).abs().max()
step = quantized.activation_handles()[-1].scale().item()
print(json.dumps({"steps": float(gap) / step, "engine": torch.backends.quantized.engine}))
"""


def _has_avx2() -> bool:
    try:
        return "avx2" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx2(), reason="needs an x86 CPU with AVX2 (fbgemm's int8 path)")
@pytest.mark.parametrize("overflow_fix", ["on", "off"])
def test_fbgemm_avx2_kernels_match_the_simulation_with_the_fix(overflow_fix):
    """fbgemm's own AVX2 kernels (FBGEMM_ENABLE_INSTRUCTIONS caps a VNNI CPU at AVX2; on an
    AVX2-only CPU they are what runs anyway), in a fresh process: the converted W8A8 model
    computes what the fake-quantized one does with the fix, and overflows without it."""
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    run = subprocess.run(
        [sys.executable, "-c", AVX2_RUN, overflow_fix],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["engine"] in ("x86", "fbgemm")
    if overflow_fix == "on":
        assert result["steps"] <= 1e-3
    else:
        assert result["steps"] > 3
