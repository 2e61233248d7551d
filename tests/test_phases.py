"""Per-phase wall time and peak resident memory."""

import mmap
import time

import pytest

from zsq_plugins.phases import PhaseMeter, rss_mib

pytestmark = pytest.mark.skipif(rss_mib() is None, reason="no /proc/self/statm here")


def _hold_64_mib(meter: PhaseMeter, seconds: float, sample: bool) -> None:
    # A fresh anonymous mapping, touched page by page, then unmapped: the resident set grows and
    # shrinks by 64 MiB whatever the allocator holds. A tensor would not do: after earlier tests
    # the allocator may hand back a free hole that is already resident (CI once saw +0 MiB).
    size = 64 * 2**20
    with mmap.mmap(-1, size) as block:
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        if sample:
            meter.sample()
        time.sleep(seconds)


def test_each_phase_records_its_own_peak():
    meter = PhaseMeter()
    with meter.phase("small"):
        time.sleep(0.05)
    with meter.phase("large"):
        _hold_64_mib(meter, 0.1, sample=True)
    with meter.phase("after"):
        time.sleep(0.05)
    assert set(meter.seconds) == set(meter.peak_rss_mib) == {"small", "large", "after"}
    assert meter.seconds["large"] >= 0.1
    assert meter.peak_rss_mib["large"] >= meter.peak_rss_mib["small"] + 60
    assert meter.peak_rss_mib["after"] < meter.peak_rss_mib["large"] - 30


def test_the_sampling_thread_sees_memory_nobody_reported():
    # A whole second gives the 20 ms sampler ~50 chances: a loaded CI machine once starved it
    # through a 0.1 s hold, which is why code at a known high point calls meter.sample().
    meter = PhaseMeter()
    with meter.phase("before"):
        pass
    with meter.phase("held"):
        _hold_64_mib(meter, 1.0, sample=False)
    assert meter.peak_rss_mib["held"] >= meter.peak_rss_mib["before"] + 60


def test_phases_do_not_nest():
    meter = PhaseMeter()
    with pytest.raises(RuntimeError, match="do not nest"), meter.phase("outer"), meter.phase("in"):
        pass
    assert "outer" in meter.seconds


def test_a_phase_that_raises_is_still_recorded():
    meter = PhaseMeter()
    with pytest.raises(RuntimeError), meter.phase("broken"):
        raise RuntimeError("boom")
    assert "broken" in meter.seconds and "broken" in meter.peak_rss_mib
