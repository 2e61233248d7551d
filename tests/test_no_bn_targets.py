"""The BN-free models' target verdicts (benchmarks/no_bn_targets.py), on made-up cells."""

from __future__ import annotations

import pytest

from tests.conftest import benchmark_script


@pytest.fixture(scope="module")
def targets():
    with benchmark_script("no_bn_targets") as module:
        yield module


def _cells(toolkit, real, noise, weight_stats=None, adversarial=None, **where):
    values = {
        "real": real,
        "noise": noise,
        "weight-stats": weight_stats,
        "adversarial": adversarial,
    }
    base = {"model": "m", "toolkit": toolkit, "spec": "W4A4", "reconstruct": "genie-m", **where}
    return [{**base, "data": d, "top1": v} for d, v in values.items() if v is not None]


def test_the_better_preset_must_recover_half_the_gap(targets):
    cells = [
        *_cells("fx", real=90.0, noise=50.0, weight_stats=65.0, adversarial=71.0),  # 52.5%
        *_cells("nncf", real=90.0, noise=50.0, weight_stats=60.0, adversarial=68.0),  # 45%
        *_cells("pt2e", real=90.0, noise=89.5, weight_stats=80.0),
        *_cells("brevitas", real=90.0, noise=50.0, weight_stats=75.0),
        *_cells("onnxruntime", real=90.0, noise=None, weight_stats=75.0),
    ]
    rows = {r["toolkit"]: r for r in targets.target_rows(cells)}
    assert rows["fx"]["verdict"] == "met"
    assert rows["fx"]["adversarial %"] == pytest.approx(52.5)
    assert rows["nncf"]["verdict"] == "missed by 5.0 points"
    assert rows["pt2e"]["verdict"] == "no gap to recover (real leads noise by 0.50)"
    assert rows["brevitas"]["verdict"] == "met (weight-stats only)"
    assert rows["onnxruntime"]["verdict"] == "not measured (noise)"


def test_only_the_target_setting_counts(targets):
    cells = [
        *_cells("fx", real=90.0, noise=50.0, weight_stats=80.0),
        *_cells("fx", real=90.0, noise=50.0, weight_stats=51.0, spec="W4A8"),
        *_cells("fx", real=90.0, noise=50.0, weight_stats=51.0, reconstruct="none"),
    ]
    (row,) = targets.target_rows(cells)
    assert row["weight-stats %"] == pytest.approx(75.0)
    assert "model" in targets.render([row], "grid/results.md")
