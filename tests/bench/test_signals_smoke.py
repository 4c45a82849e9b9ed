"""Smoke test of `python -m bench signals --quick`: every mode runs and records sane fields.

The daemons run in threads of this process (the real `serve()`, one per mode, as bench.common.daemon
would start them) so that the test does not pay a process boot per mode. No timing value is checked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import pytest

from bench import signals
from bench.common import add_common_args
from djinn.kernel.config import load_config
from tests.daemon import LiveDaemon


@contextlib.contextmanager
def thread_daemon(*flags: str) -> Iterator[str]:
    path = os.path.join(tempfile.mkdtemp(prefix="djinn-signals-"), "djinnd.sock")
    d = LiveDaemon(load_config([*flags, "--socket", path, "--log-level", "warning"], env={})).start()
    try:
        yield d.path
    finally:
        d.stop()


def _args(tmp_path: Path) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_common_args(p)
    signals.add_args(p)
    return p.parse_args(["--quick", "--output-dir", str(tmp_path), "--duration-s", "0.6", "--agents", "1x,2x",
                         "--wakeup-cycles", "2"])


@pytest.mark.slow
def test_quick_run_records_every_mode(tmp_path: Path) -> None:
    assert signals.run(_args(tmp_path), launch=thread_daemon) == 0
    records = [json.loads(line) for line in (tmp_path / "signals.jsonl").read_text().splitlines()]
    by_kind: dict[str, list[dict]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    probes = by_kind["probe"]
    assert {p["mode"] for p in probes} == set(signals.MODES)
    assert {d["mode"] for d in by_kind["density"]} == set(signals.MODES)
    for p in probes:
        assert p["agents"] >= 1 and p["model"] == "demo" and p["quick"] is True
        assert 0.0 <= p["success_rate"] <= 1.0
        assert p["steps"] >= 1 and p["sessions_opened"] >= 1
        assert p["step_p50_ms"] <= p["step_p99_ms"]
        assert p["resident_capacity"] == 2 and p["arena_nbytes"] > 0
        mem = p["memory"]
        assert mem["samples"] >= 1 and mem["timeline"]
        assert 0 <= mem["data_used_max_nbytes"] <= mem["data_capacity_nbytes"]
        assert p["bytes_paged_out"] >= 0 and p["bytes_paged_in"] >= 0
        assert p["client"]["cpu_frac"] >= 0 and p["slo_p99_ms"] == 1000.0
        assert p["worker_wait_per_call_ms"] > 0 and p["swap"]["worker_calls"] > 0
        assert p["room_wait_s"] == p["swap"]["room_waits"]["wait_s"] >= 0
        bd = p["batched_decode"]
        assert bd["sequences"] >= bd["passes"] >= 0 and bd["captures"] == 0  # no graphs on the CPU
        assert bd["tokens_per_pass"] is None if not bd["passes"] else bd["tokens_per_pass"] >= 1
        assert "--policy" in p["daemon_flags"] and not any("/" in f for f in p["daemon_flags"])
        if p["mode"] in ("none", "recompute"):
            assert p["bytes_paged_out"] == 0
        if p["mode"] == "proactive":
            assert p["swap"]["by_cause"]["signal"] >= 1 and p["bytes_paged_out"] > 0
    for d in by_kind["density"]:
        assert d["density"] in [0, *(p["agents"] for p in probes if p["mode"] == d["mode"])]
    assert {w["variant"] for w in by_kind["wakeup"]} == set(signals.WAKE_VARIANTS)
    never = next(w for w in by_kind["wakeup"] if w["variant"] == "never_paged")
    assert never["n"] == 2 and never["out_ops"] == 0
    [verdict] = by_kind["targets"]
    assert set(verdict["densities"]) == set(signals.MODES)
    compares = {c["mode"]: c for c in by_kind["compare"]}  # the longer probes the p99 target is judged on
    assert set(compares) == {"proactive", "recompute"}
    n = max({p["agents"] for p in probes if p["mode"] == "proactive"}
            & {p["agents"] for p in probes if p["mode"] == "recompute"})
    assert all(c["agents"] == n and c["duration_s"] == 2.0 for c in compares.values())
    assert verdict["recompute_compared_at_agents"] == n and verdict["recompute_compared_on"].startswith("compare")
    assert verdict["proactive_step_p99_ms"] == compares["proactive"]["step_p99_ms"]
    for name in ("signals_cliff_demo.svg", "signals_memory_demo.svg"):
        assert ET.parse(tmp_path / name).getroot().tag.endswith("svg")


# -- the pure workload model --------------------------------------------------------------------------------


def test_tool_times_parse_and_sample(tmp_path: Path) -> None:
    import random

    from bench.agents import ToolTimes

    rng = random.Random(0)
    uniform = ToolTimes.parse("uniform:1:10")
    assert all(1 <= uniform.sample(rng) <= 10 for _ in range(100)) and uniform.mean_s == 5.5
    assert ToolTimes.parse("const:0.5").sample(rng) == 0.5
    (tmp_path / "t.txt").write_text("# seconds\n0.25\n\n0.75  # slow\n")
    from_file = ToolTimes.parse(f"file:{tmp_path / 't.txt'}")
    assert from_file.sample(rng) in (0.25, 0.75) and from_file.describe()["n"] == 2
    assert str(tmp_path) not in json.dumps(from_file.describe())
    for bad in ("uniform:3:1", "const:-1", "exp", "gauss:1:2", "uniform:a:b", f"file:{tmp_path / 'none'}"):
        with pytest.raises(ValueError):
            ToolTimes.parse(bad)


def test_arrivals_budget_and_agents_spec() -> None:
    import random

    from bench.agents import AgentsSpec, TokenBudget, arrival_times

    times = arrival_times(50, 10.0, random.Random(1))
    assert times[0] == 0.0 and times == sorted(times) and len(times) == 50
    assert arrival_times(3, 0.0, random.Random(1)) == [0.0, 0.0, 0.0]
    assert TokenBudget(64, 4, 2, 256).steps_per_life == 31
    with pytest.raises(ValueError):
        TokenBudget(250, 4, 2, 256)
    assert AgentsSpec.parse("1x,3x,2").resolve(2) == [2, 6]
    assert AgentsSpec.parse("1x:8x").resolve(4) == [4, 32]
    for bad in ("", "0", "a,b", "8:2", "1:2:3"):
        with pytest.raises(ValueError):
            AgentsSpec.parse(bad)


def test_density_search() -> None:
    from bench.agents import DensitySearch

    listed = DensitySearch("list", [2, 4, 6, 8])
    for n, ok in ((2, True), (4, True), (6, False)):
        assert listed.next_probe() == n
        listed.record(n, ok)
    assert listed.next_probe() is None and listed.density == 4
    full = DensitySearch("list", [2, 4], exhaustive=True)
    full.record(2, False)
    assert full.next_probe() == 4
    ranged = DensitySearch("range", [4, 64], resolution=0.25)
    capacity = 21
    while (probe := ranged.next_probe()) is not None:
        ranged.record(probe, probe <= capacity)
    assert capacity - max(1, capacity // 4) <= ranged.density <= capacity
    assert max(ranged.results) <= 64


def test_summary_and_targets() -> None:
    from bench.agents import ProbeLog, summarize_probe, targets

    log = ProbeLog(agents=2, step_s=[0.1, 2.0], first_step_s=[0.3], wake_s=[0.05])
    log.agent_done(0.3, failed=False)
    log.agent_done(2.0, failed=False)
    got = summarize_probe(log, slo_p99_ms=1000.0)
    assert got["success"] is False and got["success_rate"] == 0.5 and got["steps"] == 3
    assert summarize_probe(log, slo_p99_ms=3000.0)["success"] is True
    log.fail("ENOMEM")
    assert summarize_probe(log, 1000.0)["success"] is False
    probes = [{"mode": m, "agents": 4, "step_p99_ms": p99, "tool_step_p99_ms": tool}
              for m, p99, tool in (("proactive", 50.0, 40.0), ("recompute", 80.0, 70.0))]
    wake = [{"variant": "hint", "wake_p50_ms": 5.4, "wake_p99_ms": 7.0},
            {"variant": "never_paged", "wake_p50_ms": 5.0, "wake_p99_ms": 6.0}]
    v = targets({"proactive": 12, "reactive": 4, "none": 4}, probes, wake, {"proactive": False})
    assert v["proactive_vs_reactive"] == 3 and v["proactive_vs_none_met"] is True
    assert v["wake_within_1ms_met"] is True and v["beats_recompute_p99_met"] is True
    assert v["density_lower_bound"] == ["proactive"]
    assert (v["proactive_tool_step_p99_ms"], v["recompute_tool_step_p99_ms"]) == (40.0, 70.0)
    assert v["recompute_compared_on"] == "density probes"
    longer = [{"mode": m, "agents": 4, "step_p99_ms": p99, "duration_s": 45.0}
              for m, p99 in (("proactive", 90.0), ("recompute", 60.0))]
    judged = targets({"proactive": 12}, probes, wake, compares=longer)  # the longer probes decide
    assert judged["beats_recompute_p99_met"] is False and judged["recompute_compared_on"] == "compare probes of 45.0 s"
    assert targets({"proactive": 12}, probes, wake, compares=longer[:1])["beats_recompute_p99_met"] is True
    assert targets({"proactive": 4}, [], [])["proactive_vs_reactive_met"] is None


def test_svg_skips_missing_points() -> None:
    from bench.svg import Panel, Series, figure

    text = figure([Panel("t", "x", "y", (Series("a", ((1, None), (2, float("nan")), (3, 5.0))),
                                         Series("b", ())), log_y=True)], "title <&>")
    assert ET.fromstring(text).tag.endswith("svg")
