"""Wall time and peak resident memory of each phase of a long run.

The process's lifetime peak (``ru_maxrss``) only grows, so it cannot say which phase needed
the memory; a thread samples the resident set size while a phase runs instead. Sampling
every 20 ms misses nothing that lives long enough to matter (a 224 px batch takes longer
than that to compute) and costs nothing measurable. A thread can be starved on a loaded
machine, so code that knows when it holds the most (a batch's activations, a block's cache)
can also record the moment itself with ``meter.sample()``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

SAMPLE_INTERVAL_S = 0.02
_PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 0.0


def rss_mib() -> float | None:
    """Resident memory of this process now, in MiB (None where /proc is not available)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE_MIB
    except (OSError, ValueError, IndexError):
        return None


class PhaseMeter:
    """``with meter.phase("generate"): ...`` records that phase's seconds and peak RSS."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss_mib: dict[str, float] = {}
        self._peak: list[float | None] | None = None  # the running phase's peak so far

    def sample(self) -> None:
        """Records the resident memory now in the running phase's peak (no-op outside one)."""
        peak = self._peak
        now = rss_mib()
        if peak is not None and now is not None and (peak[0] is None or now > peak[0]):
            peak[0] = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._peak is not None:
            raise RuntimeError(f"phase {name!r} started inside another phase; phases do not nest")
        peak: list[float | None] = [rss_mib()]
        self._peak = peak
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(SAMPLE_INTERVAL_S):
                self.sample()

        sampler = threading.Thread(target=sample, name=f"rss-{name}", daemon=True)
        started = time.perf_counter()
        if peak[0] is not None:
            sampler.start()
        try:
            yield
        finally:
            stop.set()
            if sampler.is_alive():
                sampler.join()
            self.sample()
            self._peak = None
            self.seconds[name] = round(time.perf_counter() - started, 3)
            if peak[0] is not None:
                self.peak_rss_mib[name] = round(peak[0], 1)
