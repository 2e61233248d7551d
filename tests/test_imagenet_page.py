"""The ImageNet page's single-factor experiments (benchmarks/imagenet.py), on made-up cells."""

from __future__ import annotations

import pytest

from tests.conftest import benchmark_script


@pytest.fixture(scope="module")
def page():
    with benchmark_script("imagenet", "imagenet_page") as module:
        yield module


def _cell(data, toolkit, top1, seconds, resumed_total=None):
    cell = {
        "data": data,
        "spec": "W4A8",
        "toolkit": toolkit,
        "top1": top1,
        "agreement": top1 + 5,
        "timings_s": {"reconstruct": seconds},
    }
    if resumed_total is not None:
        cell["reconstruction_seconds"] = resumed_total
    return cell


def test_each_variant_cell_stands_beside_its_own_baseline_cell(page):
    baseline = [
        _cell("genie", "fx", 77.0, 1400.0),
        _cell("real", "fx", 84.0, 2000.0, resumed_total=2100.0),
        _cell("genie", "pt2e", 78.0, 1100.0),
    ]
    variant = [_cell("real", "fx", 85.5, 1900.0), _cell("genie", "fx", 76.0, 1500.0)]
    rows = page._experiment_rows(baseline, variant)
    real, genie = rows
    assert (real["data"], real["baseline top1"], real["top1"]) == ("real", 84.0, 85.5)
    assert real["change"] == pytest.approx(1.5)
    assert real["baseline reconstruct s"] == 2100.0  # restored blocks included
    assert genie["change"] == pytest.approx(-1.0) and genie["baseline agreement"] == 82.0
    lone = page._experiment_rows(baseline, [_cell("noise", "fx", 10.0, 1.0)])[0]
    assert lone["baseline top1"] is None and lone["change"] is None


def test_each_generator_is_judged_by_its_pipeline_cell(page):
    generation = [
        {"preset": "genie", "minutes": 20.0, "images/s": 0.2},
        {"preset": "zeroq", "minutes": 8.0, "images/s": 0.5},
        {"preset": "dsg", "minutes": 9.0, "images/s": 0.4},  # no cell yet: left out
    ]
    pipeline = {"spec": "W4A8", "toolkit": "fx", "reconstruct": "genie-m", "agreement": 1.0}
    cells = [
        {**pipeline, "data": "genie", "top1": 77.0, "kl": 0.3},
        {**pipeline, "data": "zeroq", "top1": 70.0, "kl": 0.5},
        {**pipeline, "data": "real", "top1": 84.0, "kl": 0.1},
        {**pipeline, "data": "zeroq", "top1": 99.0, "kl": 0.0, "toolkit": "nncf"},
        {**pipeline, "data": "zeroq", "top1": 99.0, "kl": 0.0, "reconstruct": "none"},
    ]
    rows = page.generator_rows(generation, cells)
    assert [(r["data"], r["top1"], r["generation minutes"]) for r in rows] == [
        ("real", 84.0, None),
        ("genie", 77.0, 20.0),
        ("zeroq", 70.0, 8.0),
    ]
    assert page.generator_rows(generation, cells[2:3]) == []  # real alone is no comparison
