"""SyscallStats: counts, errors, a running total for interval means, percentiles of a bounded window."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from djinn.kernel.stats import REFRESH_CALLS, REFRESH_S, WINDOW, SyscallStats


def test_counts_errors_total_and_percentiles() -> None:
    stats = SyscallStats()
    for ms in (1, 2, 3, 4):
        stats.record("forward", ms / 1e3, ok=ms != 4)
    snap = stats.snapshot()["forward"]
    assert snap["count"] == 4 and snap["errors"] == 1
    assert snap["total_s"] == pytest.approx(0.010)
    assert snap["p50_us"] == pytest.approx(2500.0)
    assert snap["p99_us"] == pytest.approx(3970.0)


def test_interval_mean_from_two_snapshots_survives_the_window() -> None:
    stats = SyscallStats()
    for _ in range(WINDOW + 10):  # more than the percentile window holds
        stats.record("nop", 1e-3, ok=True)
    before = stats.snapshot()["nop"]
    for _ in range(3):
        stats.record("nop", 4e-3, ok=True)
    after = stats.snapshot()["nop"]
    mean_s = (after["total_s"] - before["total_s"]) / (after["count"] - before["count"])
    assert mean_s == pytest.approx(4e-3)
    assert after["p50_us"] == pytest.approx(1000.0)  # the window still holds mostly the older calls


def test_names_are_kept_apart_and_empty_stats_snapshot_empty() -> None:
    stats = SyscallStats()
    assert stats.snapshot() == {}
    stats.record("a", 1.0, ok=True)
    stats.record("b", 2.0, ok=False)
    snap = stats.snapshot()
    assert snap["a"]["total_s"] == 1.0 and snap["a"]["errors"] == 0
    assert snap["b"]["total_s"] == 2.0 and snap["b"]["errors"] == 1


def _sorted_percentile(values: list[float], q: float) -> float:
    """The reference: linear interpolation between the order statistics of a sorted list."""
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@given(st.lists(st.floats(min_value=0.0, max_value=10.0, allow_nan=False), min_size=1, max_size=2 * WINDOW + 3))
@settings(max_examples=60, deadline=None)
def test_percentiles_are_those_of_the_most_recent_window(latencies: list[float]) -> None:
    stats = SyscallStats()
    for s in latencies:
        stats.record("x", s, ok=True)
    snap = stats.snapshot()["x"]
    window = latencies[-WINDOW:]
    assert snap["count"] == len(latencies)
    assert snap["p50_us"] == pytest.approx(_sorted_percentile(window, 0.50) * 1e6, rel=1e-12, abs=1e-9)
    assert snap["p99_us"] == pytest.approx(_sorted_percentile(window, 0.99) * 1e6, rel=1e-12, abs=1e-9)


def test_percentiles_lag_the_window_by_at_most_refresh_calls_or_refresh_s() -> None:
    clock = [100.0]
    stats = SyscallStats(clock=lambda: clock[0])
    for _ in range(100):
        stats.record("x", 1e-3, ok=True)
    assert stats.snapshot()["x"]["p50_us"] == pytest.approx(1000.0)
    for _ in range(REFRESH_CALLS - 1):
        stats.record("x", 1.0, ok=True)
    snap = stats.snapshot()["x"]
    assert snap["count"] == 100 + REFRESH_CALLS - 1  # counts are always current
    assert snap["p99_us"] == pytest.approx(1000.0)  # fewer than REFRESH_CALLS new calls: the last figures
    clock[0] += REFRESH_S
    assert stats.snapshot()["x"]["p99_us"] == pytest.approx(1e6)  # old enough: computed again
    for _ in range(REFRESH_CALLS):
        stats.record("x", 2.0, ok=True)
    assert stats.snapshot()["x"]["p99_us"] == pytest.approx(2e6)  # REFRESH_CALLS new calls: computed again
    clock[0] += REFRESH_S
    assert stats.snapshot()["x"]["p99_us"] == pytest.approx(2e6)  # nothing new: the same figures
