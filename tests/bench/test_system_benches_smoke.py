"""Smoke tests of the system benchmarks (rpc, arena, swap): each runs with --quick on CPU and writes the
JSON-lines records the report reads. No timing is asserted, only that every figure is there and sane."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.bench.test_model_benches_smoke import _run

pytestmark = pytest.mark.slow


def _of(records: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    found = [r for r in records if r["metric"] == metric]
    assert found, f"no {metric!r} record"
    return found


def _positive(r: dict[str, Any], *keys: str) -> None:
    for k in keys:
        assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, (k, r)


def test_rpc_quick(tmp_path: Path) -> None:
    records = _run(tmp_path, "rpc", "--n", "400", "--block", "100")
    [null] = _of(records, "null_round_trip")
    _positive(null, "djinn_p50", "baseline_p50", "ratio_p50")
    [pipelined] = _of(records, "pipelined_syscalls_per_s")
    _positive(pipelined, "djinn")
    [bulk] = _of(records, "tensor_echo_bandwidth")
    _positive(bulk, "djinn", "baseline_value", "ratio")
    control = _of(records, "control_syscall_while_worker_busy")
    assert {r["syscall"] for r in control} == {"stat", "hello", "nop"}
    for r in control:
        _positive(r, "djinn_p50", "djinn_p99", "baseline_p99", "n", "worker_busy_frac")


def test_arena_quick(tmp_path: Path) -> None:
    records = _run(tmp_path, "arena", "--arena-sizes", "64,4096", "--n-sessions", "1,100", "--n-trials", "300",
                   "--rounds", "3", config=False)
    rows = _of(records, "arena_free_alloc")
    assert {(r["path"], r["arena_mib"], r["n_live"]) for r in rows} >= {
        (path, mib, n) for path in ("vmu", "allocator", "tlsf") for mib in (64, 4096) for n in (1, 100)}
    for r in rows:
        assert r["n_trials"] == 300 and r["rounds"] == 3  # the rounds' trials pooled
        assert r["n_pair_trials"] == 150  # every other trial times the pair as one interval
        _positive(r, "alloc_p50_us", "free_p50_us", "pair_p50_us", "pair_p99_us")
        assert r["pair_p99_us"] >= r["pair_p50_us"]
    [clock] = _of(records, "arena_clock")
    _positive(clock, "clock_p50_us")
    assert {(r["path"], r["arena_nbytes"]) for r in _of(records, "arena_scaling")} == {
        (path, mib << 20) for path in ("vmu", "allocator", "tlsf") for mib in (64, 4096)}


def test_swap_quick(tmp_path: Path) -> None:
    records = _run(tmp_path, "swap", config=False)
    for r in _of(records, "swap_bandwidth"):
        _positive(r, "out_GBps", "in_GBps", "baseline_out_GBps", "baseline_in_GBps", "out_ratio", "in_ratio")
    _of(records, "swap_bandwidth_pipelined")
    [interference] = _of(records, "swap_interference")
    assert math.isfinite(interference["slowdown"])
