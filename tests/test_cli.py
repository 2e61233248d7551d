import json

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
