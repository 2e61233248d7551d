"""A user's own model, defined in a file outside the repository, quantized in each toolkit,
saved, reloaded in a fresh process with identical outputs, and exported to ONNX; and the bad
inputs around it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from zsq_plugins import QuantSpec, apply
from zsq_plugins.adapter import installed_adapters
from zsq_plugins.errors import (
    CacheMismatchError,
    ChecksumMismatchError,
    UnsupportedModelError,
    ZSQError,
)
from zsq_plugins.model_source import load_model
from zsq_plugins.saving import export_onnx, load_quantized, save_quantized

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

USER_MODEL = '''
import torch
from torch import nn


class SmallNet(nn.Module):
    """A user's CNN: normalization outside the layers, BN, ReLU, a residual sum."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5]).view(1, 1, 1, 1))
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x - self.mean)
        x = x + self.body(x)
        return self.head(x.mean((2, 3)))


def build():
    torch.manual_seed(1)
    return SmallNet()
'''

RELOAD = """
import sys, warnings
import torch
from safetensors.torch import load_file, save_file
warnings.simplefilter("ignore")
from zsq_plugins.saving import load_quantized
model, quantized = load_quantized(sys.argv[1])
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    save_file({"y": model(x).contiguous()}, sys.argv[3])
"""


def reloaded_outputs(folder, x: torch.Tensor, scratch) -> torch.Tensor:
    """The outputs on ``x`` of the model saved in ``folder``, loaded in a fresh process."""
    save_file({"x": x}, str(scratch / "x.safetensors"))
    subprocess.run(
        [sys.executable, "-c", RELOAD, str(folder), str(scratch / "x.safetensors"),
         str(scratch / "y.safetensors")],
        check=True, timeout=300,
    )  # fmt: skip
    return load_file(str(scratch / "y.safetensors"))["y"]


@pytest.fixture
def user_source(tmp_path):
    path = tmp_path / "elsewhere" / "my_model.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(USER_MODEL))
    return f"{path}:build"


@pytest.mark.parametrize("toolkit", ["fx", "pt2e", "nncf", "brevitas"])
def test_a_saved_model_reloads_in_a_fresh_process_with_identical_outputs(
    toolkit, user_source, tmp_path
):
    if toolkit not in installed_adapters():
        pytest.skip(f"{toolkit} is not installed")
    images = torch.rand(48, 1, 7, 7, generator=torch.Generator().manual_seed(0))
    fp_model = load_model(user_source)
    model, report = apply(fp_model, toolkit, QuantSpec.parse("W4A4"), data=images, progress=False)
    folder = save_quantized(
        model, report, tmp_path / "saved", fp_model=fp_model, source=user_source, onnx=True
    )
    x = torch.rand(16, 1, 7, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(reloaded_outputs(folder, x, tmp_path), expected)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["toolkit"] == toolkit and manifest["spec"]["weight_bits"] == 4
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    # 7 x 7 images: no pooled value at a rounding tie (zsq_plugins.testing.quantize_tiny)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)


def test_export_onnx_at_the_top_level(user_source, tmp_path):
    fp_model = load_model(user_source)
    model, report = apply(
        fp_model, "fx", QuantSpec.parse("W8A8"), data=torch.rand(8, 1, 7, 7), progress=False
    )
    path = export_onnx(model, report, tmp_path / "out" / "model.onnx")
    assert path.is_file() and path.stat().st_size > 0
    with pytest.raises(ZSQError, match="not the toolkit model of this report"):
        export_onnx(fp_model, report, tmp_path / "other.onnx")


@pytest.fixture
def saved(user_source, tmp_path):
    fp_model = load_model(user_source)
    model, report = apply(
        fp_model, "fx", QuantSpec.parse("W4A4"), data=torch.rand(16, 1, 7, 7), progress=False
    )
    folder = save_quantized(model, report, tmp_path / "saved", fp_model=fp_model)
    return fp_model, model, report, folder


def test_bad_loads_fail_with_what_to_do(saved):
    fp_model, model, _, folder = saved
    with pytest.raises(ZSQError, match="records no source"):
        load_quantized(folder)  # saved without a source: the FP model must be given
    reloaded, _ = load_quantized(folder, fp_model)
    x = torch.rand(4, 1, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))
    with pytest.raises(CacheMismatchError, match="holds a 'fx' model, not a 'nncf' one"):
        load_quantized(folder, fp_model, toolkit="nncf")
    with pytest.raises(CacheMismatchError, match="architecture"):
        load_quantized(folder, torch.nn.Sequential(torch.nn.Linear(3, 3)))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["versions"]["torch"] = "1.0.0"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match=r"saved with torch 1.0.0; this is torch"):
        load_quantized(folder, fp_model)


def test_a_damaged_state_is_refused(saved):
    fp_model, _, _, folder = saved
    with open(folder / "state.safetensors", "r+b") as file:
        file.seek(-1, 2)
        last = file.read(1)[0]
        file.seek(-1, 2)
        file.write(bytes([last ^ 0xFF]))
    with pytest.raises(ChecksumMismatchError, match=r"state\.safetensors"):
        load_quantized(folder, fp_model)


def test_saving_never_overwrites_or_half_writes(saved, tmp_path):
    fp_model, model, report, folder = saved
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ZSQError, match="exists"):
        save_quantized(model, report, folder, fp_model=fp_model)
    assert sorted(p.name for p in folder.iterdir()) == before
    report.toolkit_options = {"qconfig_mapping": object()}
    with pytest.raises(ZSQError, match="hold toolkit objects"):
        save_quantized(model, report, tmp_path / "new", fp_model=fp_model)
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".new")] == []


def test_model_sources_fail_clearly(tmp_path):
    missing = tmp_path / "nothing.py"
    with pytest.raises(UnsupportedModelError, match="no Python file"):
        load_model(f"{missing}:build")
    broken = tmp_path / "broken.py"
    broken.write_text("def build():\n    raise RuntimeError('no GPU here')\n")
    with pytest.raises(UnsupportedModelError, match="raised RuntimeError: no GPU here"):
        load_model(f"{broken}:build")
    with pytest.raises(UnsupportedModelError, match=r"has no callable 'make'.*build"):
        load_model(f"{broken}:make")
    with pytest.raises(UnsupportedModelError, match=r"cannot import 'no_such_package\.models'"):
        load_model("no_such_package.models:build")


def test_weights_files_fail_clearly(user_source, tmp_path):
    model = load_model(user_source)
    pickled = tmp_path / "whole_model.pt"
    torch.save(model, pickled)  # a pickled module, not a state dict
    with pytest.raises(UnsupportedModelError, match="never unpickled"):
        load_model(user_source, pickled)
    state = tmp_path / "state.pt"
    torch.save(model.state_dict(), state)
    reloaded = load_model(user_source, state)
    torch.testing.assert_close(reloaded.head.weight, model.head.weight)
    other = tmp_path / "other.safetensors"
    save_file({"head.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(UnsupportedModelError, match="does not fit"):
        load_model(user_source, other)


@pytest.mark.parametrize("toolkit", ["fx", "pt2e", "nncf", "brevitas"])
def test_the_command_line_saves_a_user_model_that_reloads_elsewhere(toolkit, user_source, tmp_path):
    """zsq quantize --save --onnx on a model from a file outside the repository; the saved
    model reloads in a fresh process with the outputs of the ONNX export's toolkit model."""
    if toolkit not in installed_adapters():
        pytest.skip(f"{toolkit} is not installed")
    from zsq_plugins.cli import main

    saved, onnx = tmp_path / "saved", tmp_path / "model.onnx"
    argv = ["quantize", user_source, "--toolkit", toolkit, "--spec", "W4A4", "--data", "noise"]
    argv += ["--input-shape", "1,7,7", "--num-samples", "32", "--eval-samples", "8"]
    argv += ["--out", str(tmp_path / "out"), "--save", str(saved), "--onnx", str(onnx)]
    assert main([*argv, "--no-progress"]) == 0
    x = torch.rand(8, 1, 7, 7, generator=torch.Generator().manual_seed(2))
    reloaded = reloaded_outputs(saved, x, tmp_path)
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(onnx))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    # NNCF quantizes with its own arithmetic ((x - low) * levels / range), QDQ with x / s + z:
    # a value within float error of a level boundary may round apart, as the conformance
    # template allows (zsq_plugins.testing.check_onnx_export)
    tolerance = 0.03 * float(reloaded.abs().max())
    torch.testing.assert_close(torch.from_numpy(got), reloaded, atol=tolerance, rtol=0)
    assert (torch.from_numpy(got).argmax(1) == reloaded.argmax(1)).float().mean() >= 0.9
