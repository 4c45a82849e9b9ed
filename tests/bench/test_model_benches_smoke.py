"""Smoke tests of the model benchmarks: each runs with --quick (CPU, demo model, a real djinnd process) and
writes the JSON-lines records the report reads. No timing is asserted, only that every figure is there."""

from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.common import add_common_args

pytestmark = pytest.mark.slow

STAMP = ("bench", "run_id", "quick", "git_commit", "torch", "device", "time_unix")
FIGURE = ("metric", "unit", "djinn", "baseline", "baseline_value", "target")


def _run(tmp_path: Path, bench: str, *extra: str, config: bool = True) -> list[dict[str, Any]]:
    """Parse the arguments as `python -m bench <bench>` does, then call the module's run(). `config`: the
    bench records its configuration once (the model benches do)."""
    mod = importlib.import_module(f"bench.{bench.replace('-', '_')}")
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    mod.add_args(parser)
    assert mod.run(parser.parse_args(["--quick", "--output-dir", str(tmp_path), *extra])) == 0
    path = tmp_path / f"{bench.replace('-', '_')}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert records, f"{path} is empty"
    for r in records:
        assert all(k in r for k in STAMP), r
        assert r["quick"] is True
    assert sum(r["metric"] == "config" for r in records) == (1 if config else 0)
    return records


def _figures(records: list[dict[str, Any]], metric: str, fields: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    found = [r for r in records if r["metric"] == metric]
    assert found, f"no {metric!r} record"
    for r in found:
        missing = [k for k in FIGURE + fields if k not in r]
        assert not missing, f"{metric}: missing {missing}"
        assert isinstance(r["djinn"], (int, float)) and math.isfinite(r["djinn"]), r
    return found


def test_os_tax_quick(tmp_path: Path) -> None:
    records = _run(tmp_path, "os-tax")
    for metric in ("micro_op", "one_layer", "full_forward"):
        found = _figures(records, metric, ("ratio", "overhead_pct", "mode"))
        assert {r["mode"] for r in found} == {"cold", "warm"}
        assert all(r["ratio"] > 0 for r in found)
    warm = [r for r in records if r["metric"] in ("one_layer", "full_forward") and r["mode"] == "warm"]
    for r in warm:
        assert r["driver_inprocess_ms"] > 0 and r["n"] > 0
        assert 0 < r["worker_wait_per_call_mean_ms"] < r["worker_per_forward_mean_ms"]
        assert r["same_work_max_abs_logit_diff"] < 1e-3  # same weights, same work on both sides (fp32 CPU)
    assert all(r["client_busy_poll_us"] == 0 for r in records)  # the default: a blocking client


def test_plan_cache_quick(tmp_path: Path) -> None:
    records = _run(tmp_path, "plan-cache")
    (cw,) = _figures(records, "decode_step_cold_vs_warm", ("ratio", "cold_n", "warm_n", "cold_positions"))
    assert cw["cold_n"] > 0 and cw["warm_n"] > 0
    rates = _figures(records, "decode_tokens_per_s", ("ratio", "mode", "same_tokens_frac"))
    assert {r["mode"] for r in rates} == {"steady", "e2e"}
    assert all(r["same_tokens_frac"] == 1.0 for r in rates)  # greedy, same weights, fp32: the same tokens


def test_breakpoint_quick(tmp_path: Path) -> None:
    records = _run(tmp_path, "breakpoint")
    for r in _figures(records, "pause_resume_accuracy", ("layer", "token_accuracy_pct", "bitwise")):
        assert r["token_accuracy_pct"] == 100.0 and r["bitwise"]
    for r in _figures(records, "pause_resume_extra", ("layer", "extra_ms", "extra_p50_diff_ms", "ratio")):
        assert r["extra_p50_diff_ms"] == pytest.approx(r["djinn"] - r["baseline_value"])  # the p50s' difference
        assert r["split_n"] >= 2 and all(math.isfinite(r[f"extra_{part}_ms"]) for part in ("client", "in_djinnd", "on_worker"))
    _figures(records, "checkpoint_dispatch", ("ratio", "nbytes"))
    _figures(records, "checkpoint_copy_done", ("ratio", "server_copy_ms"))
    (restore,) = _figures(records, "restore", ("ratio", "restore_exact"))
    assert restore["restore_exact"]
    steer = _figures(records, "steering", ("mode", "token_divergence_pct", "logit_change_max_abs",
                                           "logit_change_rel_l2"))
    assert {r["mode"] for r in steer} == {"resume_activation", "set_steering"}
    assert all(r["output_changed"] for r in steer)
    _figures(records, "steered_resume", ("ratio",))
    _figures(records, "concurrent_b_latency", ("ratio",))
    (mem,) = _figures(records, "paused_memory_given_back", ("data_used_before_nbytes", "data_used_after_nbytes"))
    assert mem["djinn"] > 0 and mem["a_resume_exact"]
    assert all(r["client_busy_poll_us"] == 0 for r in records)
