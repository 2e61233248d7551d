"""torchao PT2E specifics: the q/dq graph, any batch size, names from the FP model."""

import pytest
import torch

from tests.test_adapter_conformance import quantize, tiny_model
from zsq_plugins import QuantSpec
from zsq_plugins.adapter import get_adapter
from zsq_plugins.quant.fold import fold_batchnorm
from zsq_plugins.quant.reference import quantizable_layers
from zsq_plugins.reconstruction.config import ReconstructionConfig
from zsq_plugins.reconstruction.routine import reconstruct

pytestmark = [pytest.mark.pt2e, pytest.mark.filterwarnings("ignore::UserWarning")]


def _ops(graph_module: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("spec", ["W8A8", "W4A4"])
def test_reconstructed_model_converts_to_a_qdq_graph_that_computes_the_same(spec):
    model = tiny_model("relu6")
    quantized, data = quantize("pt2e", model, QuantSpec.parse(spec))
    config = ReconstructionConfig(iterations=20, batch_size=16)
    reconstruct(quantized, model, torch.cat(data), config, progress=False)
    converted = get_adapter("pt2e").convert(quantized)
    ops = _ops(converted)
    assert "quantized_decomposed.quantize_per_tensor.default" in ops
    assert "quantized_decomposed.dequantize_per_channel.default" in ops
    assert not any(m is not converted and isinstance(m, torch.nn.Module) and
                   type(m).__name__ == "FakeQuantize" for m in converted.modules())  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(converted(data[1]), quantized.model(data[1]))
    # the adapter's own model is left as it was: still reconstructable and hookable
    assert type(quantized.model.get_submodule("stem.0")).__name__ == "LayerInput"


def test_any_batch_size_runs():
    quantized, data = quantize("pt2e", tiny_model("relu"), QuantSpec.parse("W4A4"))
    with torch.no_grad():
        whole = quantized.model(data[1])
        for size in (1, 3):
            torch.testing.assert_close(quantized.model(data[1][:size]), whole[:size])


def test_handles_are_named_after_the_fp_model():
    model = tiny_model("relu6")
    quantized, _ = quantize("pt2e", model, QuantSpec.parse("W4A4"))
    layers = [name for name, _ in quantizable_layers(fold_batchnorm(model))]
    assert [h.layer for h in quantized.weight_handles()] == layers
    names = [h.layer for h in quantized.activation_handles()]
    assert names == ["normalize", "stem.2", "flatten"]  # the X86 recipe: layer inputs
    # each layer's container takes a forward pre-hook that sees the layer's input
    seen = []
    hook = quantized.model.get_submodule("body.0").register_forward_pre_hook(
        lambda _, args: seen.append(args[0].shape)
    )
    with torch.no_grad():
        quantized.model(torch.rand(2, 1, 8, 8))
    hook.remove()
    assert seen == [torch.Size([2, 4, 8, 8])]


def test_per_channel_activations_are_refused_with_the_alternative():
    spec = QuantSpec.parse("W4A4", act_granularity="per_channel")
    with pytest.raises(ValueError, match="use 'per_tensor'"):
        quantize("pt2e", tiny_model("relu"), spec)
