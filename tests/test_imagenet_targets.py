"""The ImageNet page's target verdicts (benchmarks/imagenet_targets.py), on made-up cells."""

from __future__ import annotations

import pytest

from tests.conftest import benchmark_script

FP32 = 90.0


@pytest.fixture(scope="module")
def targets():
    with benchmark_script("imagenet_targets") as module:
        yield module


def _cell(data, spec, toolkit, top1, seed=0, reconstruct="genie-m", agreement=90.0):
    return {
        "data": data,
        "spec": spec,
        "toolkit": toolkit,
        "reconstruct": reconstruct,
        "seed": seed,
        "top1": top1,
        "agreement": agreement,
    }


def _row(rows, spec, toolkit):
    return next(r for r in rows if r["spec"] == spec and r["toolkit"] == toolkit)


def test_a_target_is_met_only_when_every_criterion_holds(targets):
    cells = [
        # W4A8: within 2.0 of FP32 and 0.5 of real -> met on both seeds (means 88.5, real 88.8)
        _cell("genie", "W4A8", "fx", 88.0, seed=0),
        _cell("genie", "W4A8", "fx", 89.0, seed=1),
        _cell("real", "W4A8", "fx", 88.8, seed=0),
        _cell("real", "W4A8", "fx", 88.8, seed=1),
        # close to FP32 but 1.5 below real: missed by 1.0 (the real-data criterion)
        _cell("genie", "W4A8", "pt2e", 88.0, seed=0),
        _cell("genie", "W4A8", "pt2e", 88.0, seed=1),
        _cell("real", "W4A8", "pt2e", 89.5, seed=0),
        _cell("real", "W4A8", "pt2e", 89.5, seed=1),
    ]
    rows = targets.target_rows(cells, FP32, "genie")
    fx, pt2e = _row(rows, "W4A8", "fx"), _row(rows, "W4A8", "pt2e")
    assert fx["verdict"] == "met" and fx["genie"] == pytest.approx(88.5)
    assert fx["spread"] == pytest.approx(1.0)
    assert pt2e["verdict"] == "missed by 1.00"
    assert pt2e["below real"] == pytest.approx(1.5)


def test_agreement_and_seed_count_enter_the_verdict(targets):
    cells = [
        _cell("genie", "W8A8", "nncf", 89.8, reconstruct="none", agreement=96.0),
        _cell("genie", "W8A8", "brevitas", 89.8, reconstruct="none", agreement=98.0),
    ]
    rows = targets.target_rows(cells, FP32, "genie")
    assert _row(rows, "W8A8", "nncf")["verdict"] == "missed by 1.00 (1 of 2 seeds)"
    assert _row(rows, "W8A8", "brevitas")["verdict"] == "met (1 of 2 seeds)"
    assert _row(rows, "W8A8", "brevitas")["spread"] is None  # one seed has no spread
    assert _row(rows, "W8A8", "fx")["verdict"] == "not measured"


def test_real_data_missing_is_said_not_judged(targets):
    rows = targets.target_rows([_cell("genie", "W4A4", "fx", 89.0)], FP32, "genie")
    assert _row(rows, "W4A4", "fx")["verdict"] == "real data not measured"


def test_the_toolkit_spread_uses_every_measured_toolkit(targets):
    cells = [
        _cell("genie", "W4A8", toolkit, top1, seed=seed)
        for toolkit, top1 in [("fx", 80.0), ("pt2e", 80.5), ("nncf", 81.5), ("brevitas", 80.2)]
        for seed in (0, 1)
    ]
    spread = _row(targets.target_rows(cells, FP32, "genie"), "W4A8", "spread over toolkits")
    assert spread["spread"] == pytest.approx(1.5)
    assert spread["verdict"] == "missed by 0.50"
    cells = [c for c in cells if c["toolkit"] != "nncf"]
    spread = _row(targets.target_rows(cells, FP32, "genie"), "W4A8", "spread over toolkits")
    assert spread["verdict"] == "met, without nncf"


def test_each_calibration_pipeline_is_judged_on_its_own_cells(targets):
    cells = [
        _cell("genie", "W8A8", "fx", 88.0, reconstruct="none", agreement=98.0),
        {**_cell("genie", "W8A8", "fx", 89.8, reconstruct="none", agreement=98.0),
         "calibration": "aac"},
    ]  # fmt: skip
    rows = [r for r in targets.target_rows(cells, FP32, "genie") if r["toolkit"] == "fx"]
    verdicts = {r["calibration"]: r["verdict"] for r in rows if r["spec"] == "W8A8"}
    assert verdicts == {
        "plain": "missed by 1.50 (1 of 2 seeds)",
        "aac": "met (1 of 2 seeds)",
        "aac+abn": "not measured",
    }
