"""Our calibration data through ONNX Runtime's own static quantization."""

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import SHAPE, TinyConvNet
from zsq_plugins import synthesize
from zsq_plugins.onnx_calibration import OnnxCalibrationReader

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's ONNX exporter


def test_batches_limit_rewind_and_range():
    images = torch.arange(10 * 2, dtype=torch.float32).reshape(10, 2, 1, 1)
    reader = OnnxCalibrationReader(images, "x", batch_size=4, num_samples=9)
    served = list(reader)
    assert [b["x"].shape[0] for b in served] == [4, 4, 1] and len(reader) == 3
    assert served[0]["x"].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in served]), images[:9].numpy())
    assert reader.get_next() is None  # the end, as ORT expects it
    reader.rewind()
    assert reader.get_next()["x"][0, 0, 0, 0] == 0
    reader.set_range(1, 2)
    assert len(reader) == 1 and reader.get_next()["x"][0, 0, 0, 0] == 8
    assert reader.get_next() is None
    with pytest.raises(ValueError, match="outside"):
        reader.set_range(2, 5)


def test_datasets_and_loaders_of_pairs():
    pairs = torch.utils.data.TensorDataset(torch.rand(5, *SHAPE), torch.zeros(5))
    assert len(OnnxCalibrationReader(pairs, "input", batch_size=2)) == 3
    loader = torch.utils.data.DataLoader(pairs, batch_size=4)
    assert [b["input"].shape[0] for b in OnnxCalibrationReader(loader, "input")] == [4, 1]
    with pytest.raises(ValueError, match="input_name"):
        OnnxCalibrationReader(pairs, "")
    with pytest.raises(TypeError, match="tensor, a Dataset or a DataLoader"):
        OnnxCalibrationReader([1, 2], "input")


def test_quantize_static_with_zero_shot_data(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    quantization = pytest.importorskip("onnxruntime.quantization")
    torch.manual_seed(0)
    model = nn.Sequential(TinyConvNet(), nn.Identity()).eval()
    path, quantized_path = tmp_path / "fp.onnx", tmp_path / "int8.onnx"
    torch.onnx.export(
        model, (torch.rand(1, *SHAPE),), str(path), input_names=["image"], dynamo=False,
        dynamic_axes={"image": {0: "batch"}},
    )  # fmt: skip
    data = synthesize(model, 64, "zeroq", input_shape=SHAPE, iterations=5, progress=False)
    x = torch.rand(32, *SHAPE)
    with torch.no_grad():
        fp = model(x).numpy()

    def error(reader: OnnxCalibrationReader) -> float:
        assert isinstance(reader, quantization.CalibrationDataReader)
        quantization.quantize_static(
            str(path), str(quantized_path), reader, quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
        )  # fmt: skip
        session = ort.InferenceSession(str(quantized_path), providers=["CPUExecutionProvider"])
        return float(np.abs(session.run(None, {"image": x.numpy()})[0] - fp).max())

    zero_shot = error(OnnxCalibrationReader(data, "image", batch_size=16))
    wide = error(OnnxCalibrationReader(torch.randn(64, *SHAPE) * 50, "image", batch_size=16))
    assert 0 < zero_shot < 0.1 * np.abs(fp).max()  # W8A8, quantized, close to FP32
    assert zero_shot < wide / 2  # the reader's images set the ranges ORT calibrates
