"""Per-syscall counters and latency percentiles for `stat`.

Rules: recording is O(1) on the loop thread (a bounded ring of recent latencies
per syscall, and a running total: the mean over any interval is the difference of
two snapshots' total_s over that of their counts); percentiles are computed only
when `stat` asks. A latency runs from the request's dispatch to its last reply frame.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["SyscallStats"]

WINDOW = 2048  # latencies kept per syscall for p50/p99: recent enough to show change, big enough for p99


@dataclass(slots=True)
class _Entry:
    count: int = 0
    errors: int = 0
    total_s: float = 0.0
    recent_s: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


class SyscallStats:
    def __init__(self) -> None:
        self._by_name: dict[str, _Entry] = {}

    def record(self, name: str, seconds: float, ok: bool) -> None:
        e = self._by_name.get(name)
        if e is None:
            e = self._by_name[name] = _Entry()
        e.count += 1
        e.total_s += seconds
        if not ok:
            e.errors += 1
        e.recent_s.append(seconds)

    def snapshot(self) -> dict[str, dict[str, float | int]]:
        out: dict[str, dict[str, float | int]] = {}
        for name, e in self._by_name.items():
            s = sorted(e.recent_s)
            out[name] = {"count": e.count, "errors": e.errors, "total_s": e.total_s,
                         "p50_us": _pct(s, 0.50) * 1e6, "p99_us": _pct(s, 0.99) * 1e6}
        return out
