"""Per-syscall counters and latency percentiles for `stat`.

Rules: recording is O(1) on the loop thread (a ring of the recent latencies per
syscall, in a numpy array that `stat` partitions instead of sorting, and a
running total: the mean over any interval is the difference of two snapshots'
total_s over that of their counts); percentiles are computed only when `stat`
asks, and then only for a syscall with REFRESH_CALLS new calls since they were
last computed, or with any new call once they are REFRESH_S old: a stat polled
in a loop then costs little, and its figures lag the window by at most that. A latency runs from the request's dispatch to its last reply frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["SyscallStats"]

WINDOW = 2048  # latencies kept per syscall for p50/p99: recent enough to show change, big enough for p99
_SLOT = WINDOW - 1  # a power of two: the ring's slot of the n-th latency is n & _SLOT
REFRESH_CALLS = 32  # new calls after which stat computes a syscall's percentiles again
REFRESH_S = 0.5  # age after which it does so for any new call


@dataclass(slots=True)
class _Entry:
    count: int = 0
    errors: int = 0
    total_s: float = 0.0
    recent_s: np.ndarray = field(default_factory=lambda: np.empty(WINDOW))  # [:min(count, WINDOW)] filled
    pct_count: int = -1  # count when p50_us/p99_us were computed (-1: never)
    pct_at: float = 0.0  # clock then
    p50_us: float = 0.0
    p99_us: float = 0.0


def _percentiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """The `qs` quantiles of `values`, interpolated between order statistics as a sorted list's would be.
    A partition of a copy, not a sort: a full window sorted in Python cost stat ~0.2 ms per syscall name."""
    n = len(values)
    if not n:
        return [0.0] * len(qs)
    a = values.copy()
    spots = [(n - 1) * q for q in qs]
    a.partition(sorted({i for k in spots for i in (int(k), min(int(k) + 1, n - 1))}))
    return [float(a[int(k)] + (a[min(int(k) + 1, n - 1)] - a[int(k)]) * (k - int(k))) for k in spots]


class SyscallStats:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._by_name: dict[str, _Entry] = {}
        self._clock = clock

    def record(self, name: str, seconds: float, ok: bool) -> None:
        e = self._by_name.get(name)
        if e is None:
            e = self._by_name[name] = _Entry()
        e.recent_s[e.count & _SLOT] = seconds
        e.count += 1
        e.total_s += seconds
        if not ok:
            e.errors += 1

    def snapshot(self) -> dict[str, dict[str, float | int]]:
        out: dict[str, dict[str, float | int]] = {}
        now = self._clock()
        for name, e in self._by_name.items():
            new = e.count - e.pct_count
            if new >= REFRESH_CALLS or e.pct_count < 0 or (new and now - e.pct_at >= REFRESH_S):
                p50, p99 = _percentiles(e.recent_s[:min(e.count, WINDOW)], (0.50, 0.99))
                e.p50_us, e.p99_us, e.pct_count, e.pct_at = p50 * 1e6, p99 * 1e6, e.count, now
            out[name] = {"count": e.count, "errors": e.errors, "total_s": e.total_s,
                         "p50_us": e.p50_us, "p99_us": e.p99_us}
        return out
