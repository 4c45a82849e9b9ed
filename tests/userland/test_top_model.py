"""djinn-top's pure layer: snapshots to rows and rates (model), strings (fmt), plain text (plain)."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from djinn.top.fake import synthetic_snapshot
from djinn.top.fmt import COLUMNS, bar, fmt_bytes, fmt_count, fmt_duration, fmt_us, format_line, session_cells
from djinn.top.model import build_view, same_daemon
from djinn.top.plain import render_text
from djinn.top.query import SORT_KEYS, parse_filter, select

MiB = 1 << 20


def seg(capacity: int, used: int) -> dict[str, int]:
    return {"capacity_nbytes": capacity, "used_nbytes": used, "free_nbytes": capacity - used,
            "largest_free_nbytes": capacity - used}


def session(sid: str, **kw: Any) -> dict[str, Any]:
    row = {"id": sid, "uid": 1000, "pid": 4321, "model": "demo", "state": "READY", "paused_at": None,
           "phase": "COMPUTE", "phase_s": 1.0, "expected_ms": None, "residency": "device",
           "arena_nbytes": 64 * MiB, "arena_used_nbytes": MiB, "tokens": 37, "max_tokens": 512,
           "age_s": 30.0, "idle_s": 0.4, "checkpoints": 0}
    row.update(kw)
    return row


def snapshot(uptime_s: float = 100.0, *, pid: int = 1234, swap_in: int = 0, swap_out: int = 0,
             calls: dict[str, int] | None = None, sessions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    calls = {"forward": 10, "stat": 5} if calls is None else calls
    return {
        "version": "0.1.0", "protocol": 1, "pid": pid, "uptime_s": uptime_s,
        "device": "cuda:0 (NVIDIA H100 80GB HBM3)", "policy": "proactive",
        "models": [{"name": "demo", "spec": "demo", "dtype": "float32", "params": 1234567,
                    "text_nbytes": 4938268, "sessions": 2}],
        "sessions": [session("s-1"), session("s-2", uid=0, state="PAUSED", paused_at=6)] if sessions is None
        else sessions,
        "syscalls": {name: {"count": n, "errors": 1 if name == "forward" else 0, "p50_us": 812.0, "p99_us": 1500.0}
                     for name, n in calls.items()},
        "memory": {
            "segments": {"text": seg(16 * MiB, 4938268), "data": seg(128 * MiB, 64 * MiB),
                         "stack": seg(0, 0), "host": seg(256 * MiB, 0)},
            "swap": {"out": {"bytes": swap_out, "ops": 1, "seconds": 0.1},
                     "in": {"bytes": swap_in, "ops": 1, "seconds": 0.1},
                     "by_cause": {"signal": 2, "idle": 0, "pressure": 0, "syscall": 0, "prefetch": 1}},
            "prefetch": {"pending": 1, "late": 0, "on_time": 3},
        },
        "checkpoints": [{"id": "c-1", "session": "s-1", "nbytes": MiB, "ready": True}],
    }


# -- build_view ---------------------------------------------------------------------------


def test_header_bars_and_rows_from_one_snapshot():
    view = build_view(None, snapshot(), 0.0)
    h = view.header
    assert (h.pid, h.uptime_s, h.policy, h.session_count, h.checkpoint_count) == (1234, 100.0, "proactive", 2, 1)
    assert h.device.startswith("cuda:0") and h.models[0].name == "demo" and h.models[0].params == 1234567
    assert [b.name for b in view.bars] == ["text", "data", "stack", "host"]
    data = view.bars[1]
    assert data.used_nbytes == 64 * MiB and data.fraction == pytest.approx(0.5)
    assert view.bars[2].fraction == 0.0  # no capacity: no division by zero
    assert [r.id for r in view.sessions] == ["s-1", "s-2"]
    assert view.sessions[1].state_label == "PAUSED@6" and view.sessions[0].state_label == "READY"


def test_rates_over_the_interval():
    prev = snapshot(100.0, swap_in=0, swap_out=10 * MiB, calls={"forward": 10, "stat": 5})
    cur = snapshot(100.5, swap_in=4 * MiB, swap_out=12 * MiB, calls={"forward": 30, "stat": 7})
    view = build_view(prev, cur, 0.5)
    r = view.rates
    assert not r.since_boot and r.window_s == 0.5
    assert r.page_in_bps == pytest.approx(8 * MiB)
    assert r.page_out_bps == pytest.approx(4 * MiB)
    assert r.syscalls_per_s == pytest.approx(44.0)
    assert r.errors_per_s == pytest.approx(0.0)
    by_name = {s.name: s for s in view.syscalls}
    assert by_name["forward"].per_s == pytest.approx(40.0) and by_name["stat"].per_s == pytest.approx(4.0)
    assert by_name["forward"].p50_us == 812.0 and by_name["forward"].p99_us == 1500.0
    assert [s.name for s in view.syscalls] == ["forward", "stat"]  # busiest first


def test_first_snapshot_gives_averages_since_boot():
    r = build_view(None, snapshot(10.0, swap_in=100, calls={"forward": 50}), 0.25).rates
    assert r.since_boot and r.window_s == 10.0
    assert r.page_in_bps == pytest.approx(10.0) and r.syscalls_per_s == pytest.approx(5.0)


@pytest.mark.parametrize("cur", [snapshot(5.0), snapshot(200.0, pid=999)], ids=["uptime-went-back", "new-pid"])
def test_a_restarted_daemon_is_not_diffed_against_the_old_one(cur):
    prev = snapshot(100.0, swap_in=50 * MiB, calls={"forward": 1000})
    assert not same_daemon(prev, cur)
    r = build_view(prev, cur, 0.25).rates
    assert r.since_boot and r.page_in_bps is not None and r.page_in_bps >= 0


def test_counters_going_backwards_never_give_negative_rates():
    prev = snapshot(100.0, swap_in=10 * MiB, calls={"forward": 100})
    cur = snapshot(100.25, swap_in=MiB, calls={"forward": 3})
    r = build_view(prev, cur, 0.25).rates
    assert r.page_in_bps == 0.0 and r.syscalls_per_s == 0.0


def test_zero_uptime_and_zero_interval_give_unknown_rates():
    r = build_view(None, snapshot(0.0), 0.0).rates
    assert r.page_in_bps is None and r.syscalls_per_s is None
    assert "-" in render_text(build_view(None, snapshot(0.0), 0.0))


def test_a_new_syscall_counts_from_zero():
    prev = snapshot(1.0, calls={"stat": 1})
    cur = snapshot(2.0, calls={"stat": 2, "forward": 8})
    by_name = {s.name: s for s in build_view(prev, cur, 1.0).syscalls}
    assert by_name["forward"].per_s == 8.0


def test_missing_and_ill_typed_fields_become_defaults():
    view = build_view(None, {"sessions": [{"id": "s-x", "uid": "root", "tokens": None, "idle_s": float("nan"),
                                           "state": "PAUSED", "paused_at": "six"}, "junk"],
                             "memory": {"segments": {"data": "no"}}, "syscalls": {"stat": None}, "uptime_s": -3},
                      0.25)
    assert view.header.uptime_s == 0.0 and view.header.device == "?" and view.header.models == ()
    s = view.sessions[0]
    assert (s.uid, s.tokens, s.idle_s, s.state_label) == (None, 0, 0.0, "PAUSED")
    assert view.sessions[1].id == "?"
    assert view.syscalls[0].count == 0 and view.syscalls[0].p50_us is None
    assert render_text(view)  # and it still renders


json_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5)
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=4), max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["pid", "uptime_s", "device", "policy", "models", "sessions", "syscalls",
                                        "memory", "checkpoints", "version"]), json_value), st.floats())
def test_any_snapshot_builds_and_renders(snap, dt):
    view = build_view(snapshot(), snap, dt)
    for r in (view.rates.page_in_bps, view.rates.page_out_bps, view.rates.syscalls_per_s):
        assert r is None or (math.isfinite(r) and r >= 0)
    render_text(view)
    for key in SORT_KEYS:
        select(view.sessions, key)


def test_build_view_does_not_touch_its_inputs():
    prev, cur = snapshot(1.0), snapshot(2.0)
    before = copy.deepcopy((prev, cur))
    build_view(prev, cur, 1.0)
    assert (prev, cur) == before


# -- select: sort and filter -----------------------------------------------------------------


def rows() -> tuple:
    return build_view(None, snapshot(sessions=[
        session("s-a", uid=1000, pid=10, state="IO_WAIT", tokens=5, idle_s=3.0, arena_used_nbytes=3 * MiB),
        session("s-b", uid=0, pid=20, state="RUNNING", tokens=50, idle_s=0.1, model="gpt2", arena_used_nbytes=MiB),
        session("s-c", uid=1000, pid=11, state="PAUSED", paused_at=6, tokens=20, idle_s=9.0, residency="host",
                arena_used_nbytes=2 * MiB),
        session("s-d", uid=1001, pid=12, state="SWAPPED", tokens=20, idle_s=1.0, residency="host",
                arena_used_nbytes=2 * MiB),
    ]), 0.0).sessions


@pytest.mark.parametrize("key,expected", [
    ("id", ["s-a", "s-b", "s-c", "s-d"]),
    ("owner", ["s-b", "s-a", "s-c", "s-d"]),
    ("state", ["s-b", "s-c", "s-a", "s-d"]),
    ("tokens", ["s-b", "s-c", "s-d", "s-a"]),  # descending, ties by id
    ("arena", ["s-a", "s-c", "s-d", "s-b"]),
    ("last", ["s-b", "s-d", "s-a", "s-c"]),
    ("residency", ["s-a", "s-b", "s-c", "s-d"]),
    ("model", ["s-a", "s-c", "s-d", "s-b"]),
])
def test_sort_keys(key, expected):
    assert [r.id for r in select(rows(), key)] == expected


@pytest.mark.parametrize("key", ["id", "last", "owner"])
def test_reverse_flips_an_order_without_ties(key):
    assert [r.id for r in select(rows(), key, reverse=True)] == [r.id for r in select(rows(), key)][::-1]


def test_ties_stay_in_id_order_when_reversed():
    assert [r.id for r in select(rows(), "residency", reverse=True)] == ["s-c", "s-d", "s-a", "s-b"]


def test_unknown_sort_key_raises():
    with pytest.raises(KeyError):
        select(rows(), "cpu")


@pytest.mark.parametrize("text,expected", [
    ("", ["s-a", "s-b", "s-c", "s-d"]),
    ("uid:1000", ["s-a", "s-c"]),
    ("owner:0", ["s-b"]),
    ("pid:1", []),  # pid is exact
    ("state:io", ["s-a"]),
    ("state:paused@6", ["s-c"]),
    ("res:host", ["s-c", "s-d"]),
    ("res:host uid:1001", ["s-d"]),
    ("gpt2", ["s-b"]),
    ("RUNNING", ["s-b"]),
    ("1000", ["s-a", "s-c"]),
    ("nothing-matches", []),
    ("bogus:x", []),
])
def test_filters(text, expected):
    assert [r.id for r in select(rows(), "id", filter=parse_filter(text))] == expected


# -- formatting ---------------------------------------------------------------------------


@pytest.mark.parametrize("value,text", [(0, "0B"), (999, "999B"), (1536, "1.5K"), (64 * MiB, "64.0M"),
                                        (300 * MiB, "300M"), (5 << 40, "5.0T"), (None, "-")])
def test_fmt_bytes(value, text):
    assert fmt_bytes(value) == text


@pytest.mark.parametrize("value,text", [(0.43, "0.4s"), (12.9, "12s"), (75, "1m15s"), (7300, "2h01m"),
                                        (200000, "2d07h"), (-1, "0.0s"), (None, "-")])
def test_fmt_duration(value, text):
    assert fmt_duration(value) == text


def test_fmt_count_and_us():
    assert [fmt_count(v) for v in (0, 4.5, 812, 12345, 2.5e6, None)] == ["0", "4.5", "812", "12.3k", "2.5M", "-"]
    assert [fmt_us(v) for v in (40, 1500, 2.5e6, None)] == ["40us", "1.5ms", "2.5s", "-"]


def test_bar():
    assert bar(0.5, 10) == "|||||     "
    assert bar(0.001, 10) == "|         "  # anything non-zero shows
    assert bar(2.0, 4) == "||||" and bar(-1, 4) == "    " and bar(0.5, 0) == ""


def test_session_cells_and_lines():
    r = rows()[2]
    cells = session_cells(r)
    assert len(cells) == len(COLUMNS)
    assert cells[0] == "s-c" and cells[4] == "PAUSED@6" and cells[6] == "2.0M/64.0M" and cells[8] == "20/512"
    line = format_line(cells, tuple(max(c.min_width, len(c.title)) for c in COLUMNS))
    assert line.startswith("s-c ") and "9.0s" in line
    assert format_line(("a-very-long-session-id",) + cells[1:], (6,) + (12,) * 9).startswith("a-ver… ")


def test_render_text_has_every_part():
    view = build_view(snapshot(99.0, swap_in=0), snapshot(100.0, swap_in=2 * MiB), 1.0)
    text = render_text(view)
    for part in ("up 1m40s", "cuda:0", "policy proactive", "demo (float32, 1.2M params",
                 "Text ", "Data ", "Stack", "Host ", "page-in     2.0M/s", "syscalls", "forward", "812us",
                 "1.5ms", "ID", "UID", "PID", "STATE", "PAUSED@6", "ARENA", "TOKENS", "LAST", "s-1", "s-2"):
        assert part in text, part
    assert "\x1b" not in text
    assert "no sessions" in render_text(build_view(None, snapshot(sessions=[]), 0.0))
    assert "match the filter" in render_text(view, rows=())


def test_synthetic_snapshot_counters_only_grow():
    a, b = synthetic_snapshot(200, 10.0), synthetic_snapshot(200, 10.25)
    assert len(b["sessions"]) == 200
    r = build_view(a, b, 0.25).rates
    assert not r.since_boot and r.page_in_bps > 0 and r.syscalls_per_s > 0


def test_every_syscall_name_fits_the_syscall_column_whole():
    from djinn.syscalls.table import TABLE
    from djinn.top.model import SyscallRow
    from djinn.top.plain import syscall_lines

    rows = tuple(SyscallRow(name, 1, 0, 1.0, 10.0, 20.0) for name in TABLE)
    lines = syscall_lines(rows)
    for name, line in zip(TABLE, lines[1:]):
        assert line.split()[0] == name
