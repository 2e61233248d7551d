"""Per-phase wall time and peak resident memory."""

import time

import pytest
import torch

from zsq_plugins.phases import PhaseMeter, rss_mib

pytestmark = pytest.mark.skipif(rss_mib() is None, reason="no /proc/self/statm here")


def test_each_phase_records_its_own_peak():
    meter = PhaseMeter()
    with meter.phase("small"):
        time.sleep(0.05)
    with meter.phase("large"):
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then released
        time.sleep(0.1)
        del block
    with meter.phase("after"):
        time.sleep(0.05)
    assert set(meter.seconds) == set(meter.peak_rss_mib) == {"small", "large", "after"}
    assert meter.seconds["large"] >= 0.1
    assert meter.peak_rss_mib["large"] >= meter.peak_rss_mib["small"] + 60
    assert meter.peak_rss_mib["after"] < meter.peak_rss_mib["large"] - 30


def test_a_phase_that_raises_is_still_recorded():
    meter = PhaseMeter()
    with pytest.raises(RuntimeError), meter.phase("broken"):
        raise RuntimeError("boom")
    assert "broken" in meter.seconds and "broken" in meter.peak_rss_mib
