"""djinn-top's view model: a pure function from stat snapshots to what the screen shows.

Rules: no I/O, no textual, no clock. `build_view(prev, cur, dt_s)` turns two
`stat` snapshots (docs/INTERNALS.md, "The stat snapshot") into frozen records
(`query` then sorts and filters the session rows). A snapshot is untrusted input: missing
or ill-typed fields become defaults, never exceptions. Rates need two
snapshots of the same daemon; without them they are averages since boot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = [
    "SEGMENTS",
    "ModelRow",
    "Header",
    "SegmentBar",
    "Rates",
    "SyscallRow",
    "SessionRow",
    "View",
    "build_view",
    "same_daemon",
]

SEGMENTS = ("text", "data", "stack", "host")
SEGMENT_LABELS = {"text": "Text", "data": "Data", "stack": "Stack", "host": "Host"}


@dataclass(frozen=True, slots=True)
class ModelRow:
    name: str
    spec: str
    dtype: str
    params: int
    text_nbytes: int
    sessions: int


@dataclass(frozen=True, slots=True)
class Header:
    version: str
    pid: int | None
    uptime_s: float
    device: str
    policy: str
    models: tuple[ModelRow, ...]
    session_count: int
    checkpoint_count: int


@dataclass(frozen=True, slots=True)
class SegmentBar:
    """One memory segment. `fraction` is used/capacity in [0, 1]; 0 when the capacity is unknown."""

    name: str
    label: str
    used_nbytes: int
    capacity_nbytes: int
    largest_free_nbytes: int

    @property
    def fraction(self) -> float:
        if self.capacity_nbytes <= 0:
            return 0.0
        return min(1.0, max(0.0, self.used_nbytes / self.capacity_nbytes))


@dataclass(frozen=True, slots=True)
class Rates:
    """Per-second rates. `window_s` is the interval they cover; `since_boot` marks averages over the uptime.

    A rate is None when it cannot be known (no interval, or a zero-length one).
    """

    window_s: float
    since_boot: bool
    page_in_bps: float | None
    page_out_bps: float | None
    syscalls_per_s: float | None
    errors_per_s: float | None
    swap_in_nbytes: int
    swap_out_nbytes: int
    by_cause: tuple[tuple[str, int], ...]
    prefetch_pending: int
    prefetch_late: int
    prefetch_on_time: int


@dataclass(frozen=True, slots=True)
class SyscallRow:
    """One syscall's counters. p50/p99 are the kernel's figures in microseconds (None when absent)."""

    name: str
    count: int
    errors: int
    per_s: float | None
    p50_us: float | None
    p99_us: float | None


@dataclass(frozen=True, slots=True)
class SessionRow:
    id: str
    uid: int | None
    pid: int | None
    model: str
    state: str
    paused_at: int | None
    phase: str
    residency: str
    arena_used_nbytes: int
    arena_nbytes: int
    tokens: int
    max_tokens: int | None
    idle_s: float
    age_s: float
    checkpoints: int

    @property
    def state_label(self) -> str:
        """The state as shown: PAUSED carries its layer, `PAUSED@6`."""
        if self.state == "PAUSED" and self.paused_at is not None:
            return f"PAUSED@{self.paused_at}"
        return self.state


@dataclass(frozen=True, slots=True)
class View:
    header: Header
    bars: tuple[SegmentBar, ...]
    rates: Rates
    syscalls: tuple[SyscallRow, ...]
    sessions: tuple[SessionRow, ...]


def _num(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    f = float(value)
    return f if math.isfinite(f) else default


def _int(value: Any, default: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    if isinstance(value, float) and not math.isfinite(value):
        return default
    return int(value)


def _opt_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(value)


def _opt_num(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _str(value: Any, default: str = "") -> str:
    if value is None:
        return default
    return value if isinstance(value, str) else str(value)


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def same_daemon(prev: Mapping[str, Any] | None, cur: Mapping[str, Any]) -> bool:
    """True when both snapshots come from one daemon run (same pid, uptime not gone backwards)."""
    if prev is None:
        return False
    if _opt_int(prev.get("pid")) != _opt_int(cur.get("pid")):
        return False
    return _num(cur.get("uptime_s")) >= _num(prev.get("uptime_s"))


def _header(snap: Mapping[str, Any]) -> Header:
    models = tuple(
        ModelRow(
            name=_str(m.get("name"), "?"),
            spec=_str(m.get("spec")),
            dtype=_str(m.get("dtype")),
            params=_int(m.get("params")),
            text_nbytes=_int(m.get("text_nbytes")),
            sessions=_int(m.get("sessions")),
        )
        for m in map(_map, _list(snap.get("models")))
    )
    return Header(
        version=_str(snap.get("version")),
        pid=_opt_int(snap.get("pid")),
        uptime_s=max(0.0, _num(snap.get("uptime_s"))),
        device=_str(snap.get("device"), "?"),
        policy=_str(snap.get("policy"), "?"),
        models=models,
        session_count=len(_list(snap.get("sessions"))),
        checkpoint_count=len(_list(snap.get("checkpoints"))),
    )


def _bars(snap: Mapping[str, Any]) -> tuple[SegmentBar, ...]:
    segments = _map(_map(snap.get("memory")).get("segments"))
    bars = []
    for name in SEGMENTS:
        seg = _map(segments.get(name))
        bars.append(
            SegmentBar(
                name=name,
                label=SEGMENT_LABELS[name],
                used_nbytes=max(0, _int(seg.get("used_nbytes"))),
                capacity_nbytes=max(0, _int(seg.get("capacity_nbytes"))),
                largest_free_nbytes=max(0, _int(seg.get("largest_free_nbytes"))),
            )
        )
    return tuple(bars)


def _swap_bytes(snap: Mapping[str, Any], direction: str) -> int:
    return _int(_map(_map(_map(snap.get("memory")).get("swap")).get(direction)).get("bytes"))


def _syscall_totals(snap: Mapping[str, Any]) -> tuple[int, int]:
    count = errors = 0
    for entry in _map(snap.get("syscalls")).values():
        entry = _map(entry)
        count += _int(entry.get("count"))
        errors += _int(entry.get("errors"))
    return count, errors


def _per_s(delta: float, window_s: float) -> float | None:
    if window_s <= 0:
        return None
    return max(0.0, delta) / window_s


def _rates(prev: Mapping[str, Any] | None, cur: Mapping[str, Any], dt_s: float) -> Rates:
    since_boot = not same_daemon(prev, cur) or dt_s <= 0
    if since_boot:
        base: Mapping[str, Any] = {}
        window_s = max(0.0, _num(cur.get("uptime_s")))
    else:
        assert prev is not None
        base = prev
        window_s = dt_s
    calls, errors = _syscall_totals(cur)
    prev_calls, prev_errors = _syscall_totals(base)
    memory = _map(cur.get("memory"))
    swap = _map(memory.get("swap"))
    prefetch = _map(memory.get("prefetch"))
    causes = tuple((str(k), _int(v)) for k, v in _map(swap.get("by_cause")).items())
    return Rates(
        window_s=window_s,
        since_boot=since_boot,
        page_in_bps=_per_s(_swap_bytes(cur, "in") - _swap_bytes(base, "in"), window_s),
        page_out_bps=_per_s(_swap_bytes(cur, "out") - _swap_bytes(base, "out"), window_s),
        syscalls_per_s=_per_s(calls - prev_calls, window_s),
        errors_per_s=_per_s(errors - prev_errors, window_s),
        swap_in_nbytes=_swap_bytes(cur, "in"),
        swap_out_nbytes=_swap_bytes(cur, "out"),
        by_cause=causes,
        prefetch_pending=_int(prefetch.get("pending")),
        prefetch_late=_int(prefetch.get("late")),
        prefetch_on_time=_int(prefetch.get("on_time")),
    )


def _syscalls(prev: Mapping[str, Any] | None, cur: Mapping[str, Any], rates: Rates) -> tuple[SyscallRow, ...]:
    before = {} if rates.since_boot or prev is None else _map(prev.get("syscalls"))
    rows = []
    for name, entry in _map(cur.get("syscalls")).items():
        entry = _map(entry)
        count = _int(entry.get("count"))
        prev_count = _int(_map(before.get(name)).get("count"))
        rows.append(
            SyscallRow(
                name=_str(name),
                count=count,
                errors=_int(entry.get("errors")),
                per_s=_per_s(count - prev_count, rates.window_s),
                p50_us=_opt_num(entry.get("p50_us")),
                p99_us=_opt_num(entry.get("p99_us")),
            )
        )
    rows.sort(key=lambda r: (-(r.per_s or 0.0), -r.count, r.name))
    return tuple(rows)


def _session(s: Mapping[str, Any]) -> SessionRow:
    return SessionRow(
        id=_str(s.get("id"), "?"),
        uid=_opt_int(s.get("uid")),
        pid=_opt_int(s.get("pid")),
        model=_str(s.get("model")),
        state=_str(s.get("state"), "?"),
        paused_at=_opt_int(s.get("paused_at")),
        phase=_str(s.get("phase")),
        residency=_str(s.get("residency"), "none"),
        arena_used_nbytes=max(0, _int(s.get("arena_used_nbytes"))),
        arena_nbytes=max(0, _int(s.get("arena_nbytes"))),
        tokens=max(0, _int(s.get("tokens"))),
        max_tokens=_opt_int(s.get("max_tokens")),
        idle_s=max(0.0, _num(s.get("idle_s"))),
        age_s=max(0.0, _num(s.get("age_s"))),
        checkpoints=max(0, _int(s.get("checkpoints"))),
    )


def build_view(prev: Mapping[str, Any] | None, cur: Mapping[str, Any], dt_s: float) -> View:
    """The whole screen's data for snapshot `cur`, with rates over the `dt_s` seconds since `prev`.

    `prev` None, a snapshot from another daemon run, or `dt_s <= 0` gives averages
    since boot. Never raises on a malformed snapshot (a non-mapping counts as empty).
    """
    cur = _map(cur)
    prev = _map(prev) if prev is not None else None
    rates = _rates(prev, cur, dt_s)
    return View(
        header=_header(cur),
        bars=_bars(cur),
        rates=rates,
        syscalls=_syscalls(prev, cur, rates),
        sessions=tuple(_session(_map(s)) for s in _list(cur.get("sessions"))),
    )
