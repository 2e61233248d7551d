"""The GPU path: generation and reconstruction on CUDA. Skipped without a CUDA device."""

import pytest
import torch

from tests.conftest import SHAPE, zoo_style_bn_model
from tests.test_adapter_conformance import quantize, tiny_model
from zsq_plugins import QuantSpec, synthesize
from zsq_plugins.reconstruction.config import ReconstructionConfig
from zsq_plugins.reconstruction.routine import reconstruct

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]


@pytest.mark.parametrize("preset", ["zeroq", "genie"])
def test_generation_runs_on_cuda_and_returns_cpu_images(preset):
    data = synthesize(
        zoo_style_bn_model(),
        8,
        preset,
        input_shape=SHAPE,
        iterations=5,
        batch_size=4,
        device="cuda",
        progress=False,
    )
    assert data.images.device.type == "cpu" and data.images.shape == (8, *SHAPE)
    first = data.manifest["shards"][0]
    assert first["final_loss"] <= first["initial_loss"] * 1.5


def test_reconstruction_runs_on_cuda():
    model = tiny_model("relu6")
    quantized, data = quantize("fx", model, QuantSpec.parse("W4A4"))
    quantized.model.to("cuda")
    report = reconstruct(
        quantized,
        model.to("cuda"),
        torch.cat(data),
        ReconstructionConfig(iterations=10, batch_size=8),
        progress=False,
    )
    assert all(block.fidelity <= 1e-5 for block in report.blocks)
