"""python -m bench signals: agent density under proactive / reactive / none / recompute (ablation 4).

What it measures: for each mode, the largest number of concurrent Poisson agents (bench/agents.py)
that meet the SLO (no failed agent, p99 step latency under --slo-p99-ms) when the Data segment holds
only a few arenas; per probe also wake-up latency, bytes paged, Data-segment use over time, and the
client's own CPU and event-loop lag (so a saturated client is visible, not mistaken for the kernel).

Modes (each against its own djinnd, started with the policy flags below):
- proactive: --policy proactive; IO_WAIT(expected_ms) before a tool call, COMPUTE on its return
  (posted: the agent goes straight on to its generate, which the session runs after the signal);
- proactive-lazy: the same signals with --proactive-mode lazy (page out only under pressure);
- reactive: --policy reactive, no signals (idle sessions are paged out under pressure, LRU);
- none: --policy none, no signals (nothing is paged; admission fails when the Data segment is full);
- recompute: --policy none; the session is closed at the tool call and reopened on return with the
  whole context prefilled again (what vLLM does).
A wake-up experiment (one agent alone: IO_WAIT with expected_ms, IO_WAIT without, no signal) runs on
the proactive daemon before its first probe. Wake-up is from COMPUTE (the tool's return) to the first
token; COMPUTE is posted, as by the agents, so it is not a round trip of its own. It takes 60 cycles of
each variant by default, for p50s tight enough to judge against a 1 ms target.
After the searches, proactive and recompute run once more each, at the largest agent count both were
probed at, for --compare-s (45 s by default), each against a daemon of its own; the p99-step target is
judged on these longer probes (a density probe's p99 is about its third-largest step). The targets
record also carries, for the record, both modes' p99 over the steps after a tool call.
Rules: a fresh djinnd per probe (or per mode with --daemon-per mode: counters are then taken as
deltas and the daemon must be idle between probes); retryable ENOMEM is retried with bounded backoff
and an agent that exhausts it has failed; every mode runs the same workload, seeds and SLO.
CPUs (bench/cpus.py): on CUDA every daemon's device worker runs on the fastest CPU by the run's probe, its
loop on the second and the agents on the third; `--cpus off` leaves every thread to the scheduler.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from bench.agents import (AgentsSpec, Backoff, DensitySearch, ProbeLog, TokenBudget, ToolTimes, arrival_times,
                          cliff_svg, compared_count, memory_svg, slug, summarize_probe, summary_lines,
                          targets)
from bench.common import Recorder, daemon, percentile
from bench.cpus import add_cpus_arg, placement

Launcher = Callable[..., ContextManager[str]]

CLIENT_CPU_LIMIT = 0.8  # of one core: above it the one-threaded client may be what limits the agents
CLIENT_LAG_LIMIT_MS = 20.0  # p99 event-loop lag above which the client's own timing is suspect
HANG_S = 60.0  # past the deadline and the worst backoff, agents still running are stuck: failed, daemon dropped


@dataclass(frozen=True, slots=True)
class Mode:
    """How a mode's agents behave, and the policy flags of its daemon."""

    name: str
    flags: tuple[str, ...]
    signals: bool = False
    recompute: bool = False


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("proactive", ("--policy", "proactive", "--proactive-mode", "eager"), signals=True),
    Mode("proactive-lazy", ("--policy", "proactive", "--proactive-mode", "lazy"), signals=True),
    Mode("reactive", ("--policy", "reactive")),
    Mode("none", ("--policy", "none")),
    Mode("recompute", ("--policy", "none"), recompute=True),
)}

FULL = dict(model="dummy:llama-1b", device="auto", modes=",".join(MODES), agents="1x:16x", slo_p99_ms=2000.0,
            tool_time="uniform:1:10", arrival_rate=10.0, context_tokens=1024, tool_tokens=32, decode_tokens=16,
            duration_s=30.0, max_tokens=2048, resident_arenas=8, sample_ms=250.0, wakeup_cycles=60,
            wakeup_tool_ms=400.0, daemon_per="probe", compare_s=45.0)
QUICK = dict(model="demo", device="cpu", modes=",".join(MODES), agents="1x,3x", slo_p99_ms=1000.0,
             tool_time="uniform:0.05:0.2", arrival_rate=100.0, context_tokens=64, tool_tokens=4, decode_tokens=2,
             duration_s=1.5, max_tokens=256, resident_arenas=2, sample_ms=100.0, wakeup_cycles=6,
             wakeup_tool_ms=100.0, daemon_per="mode", idle_timeout_s=0.1, vmu_text="64MiB", vmu_stack="64MiB",
             vmu_host="256MiB", compare_s=2.0)


def _defaults(key: str) -> str:
    full = FULL.get(key, "the daemon's")
    return f"(default {full}; --quick {QUICK[key]})" if key in QUICK else f"(default {full})"


def add_args(p: argparse.ArgumentParser) -> None:
    def a(flag: str, help_: str, **kw: Any) -> None:
        key = flag[2:].replace("-", "_")
        p.add_argument(flag, help=f"{help_} {_defaults(key)}" if key in FULL or key in QUICK else help_, **kw)

    a("--model", "djinnd --model: demo, dummy:gpt2, dummy:llama-1b, dummy:llama-8b or a local HF directory")
    a("--device", "djinnd --device: auto, cpu, cuda or cuda:N")
    a("--dtype", "djinnd --dtype (default: the daemon's choice)")
    a("--modes", f"comma list of {', '.join(MODES)}")
    a("--agents", "counts to probe: a list '4,8,16' (ascending, stops at the first failure) or a search range "
                  "'lo:hi' (doubling, then bisection); '2x' is twice the resident capacity")
    a("--resolution", "range search: stop when the gap is within this fraction of the pass", type=float,
      default=0.125)
    a("--exhaustive", "list: probe every count, also past a failure (the whole cliff)", action="store_true")
    a("--slo-p99-ms", "SLO bound on the p99 step latency", type=float)
    a("--tool-time", "tool-call seconds: uniform:A:B, const:X, exp:MEAN or file:PATH (one number a line)")
    a("--hint", "expected_ms the proactive agents send: the tool's own time, the distribution's mean, or none",
      choices=("exact", "mean", "none"), default="exact")
    a("--arrival-rate", "Poisson agent arrivals per second", type=float)
    a("--context-tokens", "each agent's initial context, prefilled at its first step", type=int)
    a("--tool-tokens", "tokens of each tool result, prefilled on the tool's return", type=int)
    a("--decode-tokens", "tokens decoded per step", type=int)
    a("--duration-s", "seconds the workload runs after the last arrival", type=float)
    a("--max-tokens", "each session's context length, which sizes its arena", type=int)
    a("--vmu-data", "djinnd --vmu-data in bytes (e.g. 2GiB); default: room for --resident-arenas arenas")
    a("--resident-arenas", "size the Data segment for this many arenas (a built-in model)", type=int)
    a("--vmu-text", "djinnd --vmu-text")
    a("--vmu-stack", "djinnd --vmu-stack")
    a("--vmu-host", "djinnd --vmu-host (paged-out arenas live there)")
    a("--idle-timeout-s", "djinnd --idle-timeout-s: how idle a session must be for reactive to page it out",
      type=float)
    a("--memory-wait-ms", "djinnd --memory-wait-ms, for every mode alike: how long a syscall that finds no room, and "
                          "nothing the policy may page out, waits for memory before ENOMEM", type=float)
    a("--daemon-arg", "one more djinnd flag, repeatable (e.g. --daemon-arg=--cpu-threads=8)", action="append",
      default=[])
    a("--daemon-per", "a fresh djinnd per probe, or one per mode (counters then taken as deltas)",
      choices=("probe", "mode"))
    add_cpus_arg(p)
    a("--enomem-retries", "retries of a retryable ENOMEM before the agent fails", type=int, default=8)
    a("--backoff-ms", "first ENOMEM backoff; it doubles up to 500 ms, jittered", type=float, default=20.0)
    a("--sample-ms", "stat sampling period of the memory timeline", type=float)
    a("--wakeup-cycles", "wake-up experiment cycles per variant (0: skip it)", type=int)
    a("--compare-s", "seconds of each of the two longer probes that compare proactive's p99 step with "
      "recompute's at the largest agent count both probed (0: compare the density probes)", type=float)
    a("--wakeup-tool-ms", "tool time of the wake-up experiment", type=float)
    a("--replot", "render the figures and tables again from the output dir's signals.jsonl; run nothing",
      action="store_true")
    a("--seed", "seed of arrivals, tool times and token ids", type=int, default=0)


@dataclass(frozen=True, slots=True)
class Workload:
    """What every agent of a run does, and the SLO it is held to."""

    model: str
    budget: TokenBudget
    tools: ToolTimes
    hint: str
    arrival_rate: float
    duration_s: float
    slo_p99_ms: float
    backoff: Backoff
    sample_s: float

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, **asdict(self.budget), "tool_time": self.tools.describe(), "hint": self.hint,
                "arrival_rate_per_s": self.arrival_rate, "duration_s": self.duration_s,
                "slo_p99_ms": self.slo_p99_ms, "backoff": asdict(self.backoff), "sample_s": self.sample_s}


def _settings(args: argparse.Namespace) -> argparse.Namespace:
    """args with every unset option filled from the quick or full defaults."""
    out = argparse.Namespace(**vars(args))
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(out, key) is None:
            setattr(out, key, value)
    return out


def arena_nbytes_per_token(model: str, device: str, dtype: str | None) -> int:
    """Bytes one token takes in a session arena of a built-in model: K and V of every layer plus the
    paused-activation slot, in the dtype the daemon will pick. ValueError for other models."""
    from djinn.drivers.model.presets import preset_for

    preset = preset_for(model)
    if preset is None:
        raise ValueError(f"--resident-arenas needs a built-in model; give --vmu-data for {model!r}")
    cfg = preset.make_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if dtype:
        itemsize = 4 if dtype in ("float32", "fp32") else 2
    else:
        import torch

        on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        itemsize = 4 if on_cpu else 2
    return (cfg.num_hidden_layers * 2 * kv_heads * head_dim + cfg.hidden_size) * itemsize


def memory_plan(s: argparse.Namespace) -> tuple[str, int | None]:
    """(--vmu-data flag value, expected resident capacity in arenas or None when unknown)."""
    from djinn.kernel.config import parse_size

    if s.vmu_data is not None:
        size = parse_size(s.vmu_data)
        try:
            arena = arena_nbytes_per_token(s.model, s.device, s.dtype) * s.max_tokens
        except ValueError:
            return s.vmu_data, None
        return s.vmu_data, int(size // arena) if isinstance(size, int) else None
    arena = arena_nbytes_per_token(s.model, s.device, s.dtype) * s.max_tokens
    return str(s.resident_arenas * arena + min(arena // 4, 1 << 20)), s.resident_arenas


def daemon_flags(s: argparse.Namespace, mode: Mode, vmu_data: str) -> list[str]:
    flags = ["--model", s.model, "--device", s.device, "--max-tokens", str(s.max_tokens), "--vmu-data", vmu_data,
             "--grace-s", "0", *mode.flags]
    for key in ("dtype", "vmu_text", "vmu_stack", "vmu_host", "idle_timeout_s", "memory_wait_ms"):
        if getattr(s, key) is not None:
            flags += [f"--{key.replace('_', '-')}", str(getattr(s, key))]
    for extra in s.daemon_arg:
        flags += extra.split("=", 1) if extra.startswith("--") and "=" in extra else [extra]
    return flags


class Daemons:
    """djinnd sockets for the modes: a fresh daemon for each use (per "probe"), or one per mode, kept until
    released (per "mode"). Modes never share one, though none and recompute have the same flags: each
    mode's first probe then meets a daemon as cold as every other mode's."""

    def __init__(self, launch: Launcher, per: str) -> None:
        self.launch, self.per = launch, per
        self._live: dict[str, tuple[ContextManager[str], str]] = {}

    @contextlib.contextmanager
    def use(self, mode: str, flags: tuple[str, ...]) -> Iterator[str]:
        if self.per == "probe":
            with self.launch(*flags) as path:
                yield path
            return
        if mode not in self._live:
            cm = self.launch(*flags)
            self._live[mode] = (cm, cm.__enter__())
        yield self._live[mode][1]

    def release(self, mode: str) -> None:
        live = self._live.pop(mode, None)
        if live is not None:
            live[0].__exit__(None, None, None)

    def __enter__(self) -> Daemons:
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in list(self._live):
            self.release(mode)


# -- one probe ----------------------------------------------------------------------------------------


def _now() -> float:
    return time.perf_counter()


class ProbeOver(Exception):
    """The probe's deadline came while the agent waited for memory; its step is abandoned."""


class Agent:
    """One agent's life loop on its own connection. Owned by the probe's event loop."""

    def __init__(self, kernel: Any, mode: Mode, w: Workload, log: ProbeLog, rng: random.Random, vocab: int,
                 deadline: float, arena_seen: list[int]) -> None:
        self.k, self.mode, self.w, self.log, self.rng = kernel, mode, w, log, rng
        self.vocab, self.deadline, self.arena_seen = vocab, deadline, arena_seen
        self.session: Any = None
        self.worst_s = 0.0

    def _ids(self, n: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    async def run(self, arrive_at: float) -> None:
        from djinn.errors import KernelError

        await asyncio.sleep(max(0.0, arrive_at - _now()))
        failure = None
        try:
            while _now() < self.deadline and await self._life():
                pass
        except KernelError as e:
            failure = e.errno
        except (ConnectionError, OSError) as e:
            failure = type(e).__name__
        finally:
            await self._close()
        if failure is not None:
            self.log.fail(failure)
        self.log.agent_done(self.worst_s, failed=failure is not None)

    async def _life(self) -> bool:
        """One session's life; False once the probe is over."""
        b = self.w.budget
        history = self._ids(b.context_tokens)
        out = await self._step(history, _now(), first=True, reopen=True)
        if out is None:
            return False
        history += out
        for _ in range(b.steps_per_life):
            t_back = await self._tool()
            if t_back is None:
                return False
            prompt = self._ids(b.tool_tokens)
            if self.mode.recompute:
                history += prompt
                prompt = list(history)
            out = await self._step(prompt, t_back, first=False, reopen=self.mode.recompute)
            if out is None:
                return False
            history += out
        await self._close()
        return True

    async def _tool(self) -> float | None:
        """The tool call; the time it returned, or None when the probe ended during it."""
        tool_s = self.w.tools.sample(self.rng)
        if self.mode.recompute:
            await self._close()
        elif self.mode.signals:
            hint = {"exact": tool_s * 1e3, "mean": self.w.tools.mean_s * 1e3, "none": None}[self.w.hint]
            await self.session.signal_phase("IO_WAIT", expected_ms=hint)
        left = self.deadline - _now()
        await asyncio.sleep(max(0.0, min(tool_s, left)))
        if tool_s >= left:
            return None
        t_back = _now()
        if self.mode.signals:
            await self.session.signal_phase("COMPUTE", wait=False)  # the generate follows it on the session
        return t_back

    async def _step(self, prompt: list[int], t0: float, *, first: bool, reopen: bool) -> list[int] | None:
        """Open a session first if `reopen`, then generate; the new tokens, or None if abandoned at
        the deadline (its latency so far is kept: a lower bound, never flattering)."""
        retries = self.log.enomem_retries

        async def once() -> tuple[float, list[int]]:
            t_first, tokens = 0.0, list[int]()
            async for token in self.session.generate_stream(prompt, self.w.budget.decode_tokens):
                if not tokens:
                    t_first = _now()
                tokens.append(token)
            return t_first, tokens

        samples = self.log.first_step_s if first else self.log.step_s
        try:
            if reopen:
                await self._open()
            t_first, tokens = await self._retry("generate", once)
        except ProbeOver:
            self._took(samples, _now() - t0)
            self.log.abandoned_steps += 1
            return None
        self._took(samples, _now() - t0)
        if not first:
            self.log.wake_s.append(t_first - t0)
        self.log.retried_steps += self.log.enomem_retries > retries
        return tokens

    def _took(self, samples: list[float], latency_s: float) -> None:
        samples.append(latency_s)
        self.worst_s = max(self.worst_s, latency_s)

    async def _retry(self, call: str, fn: Callable[[], Any]) -> Any:
        """fn(), retrying a retryable ENOMEM with backoff. The last ENOMEM propagates once the retries
        are spent; ProbeOver when the next wait would end after the deadline."""
        from djinn.errors import ENOMEM

        for attempt in range(self.w.backoff.retries + 1):
            try:
                return await fn()
            except ENOMEM as e:
                if not e.retryable or attempt == self.w.backoff.retries:
                    raise
                self.log.refused(call, e.message)
                delay_s = self.w.backoff.delay_s(attempt, self.rng)
                if _now() + delay_s > self.deadline:
                    raise ProbeOver from None
                await asyncio.sleep(delay_s)
        raise AssertionError("unreachable")

    async def _open(self) -> None:
        await self._close()
        self.session = await self._retry(
            "open_session", lambda: self.k.open_session(max_tokens=self.w.budget.max_tokens))
        self.log.sessions_opened += 1
        if not self.arena_seen:
            self.arena_seen.append(int(self.session.info.get("arena_nbytes", 0)))

    async def _close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            with contextlib.suppress(Exception):
                await session.close()


async def _sample_memory(k: Any, period_s: float, t0: float, stop: asyncio.Event, rows: list[list[float]]) -> None:
    """Append [t_s, data used, host used, resident sessions, swapped sessions] every period until stop."""
    while not stop.is_set():
        st = await k.stat()
        seg = st["memory"]["segments"]
        places = [s.get("residency") for s in st["sessions"]]
        rows.append([round(_now() - t0, 3), seg["data"]["used_nbytes"], seg["host"]["used_nbytes"],
                     places.count("device"), places.count("host")])
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), period_s)


async def _loop_lag(period_s: float, stop: asyncio.Event) -> list[float]:
    lags = []
    while not stop.is_set():
        t = _now()
        await asyncio.sleep(period_s)
        lags.append(_now() - t - period_s)
    return lags


def _daemon_cpu_s(pid: int) -> float | None:
    """User+system CPU seconds of process `pid` (Linux /proc), None where unreadable."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


async def _wait_idle(k: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    """The daemon's stat once no session is left (a reused daemon must start each probe empty)."""
    deadline = _now() + timeout_s
    while True:
        st = await k.stat()
        if not st["sessions"] and st["memory"]["segments"]["data"]["used_nbytes"] == 0 or _now() > deadline:
            return st
        await asyncio.sleep(0.05)


async def _warm_up(k: Any, w: Workload) -> None:
    """One step of each shape the agents use, so that cold plans are not measured as latency."""
    b = w.budget
    s = await k.open_session(max_tokens=b.max_tokens)
    try:
        await s.generate([1 + i % 200 for i in range(b.context_tokens)], b.decode_tokens)
        await s.generate([1 + i % 200 for i in range(b.tool_tokens)], b.decode_tokens)
    finally:
        await s.close()


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Counter differences of two stat snapshots: swap bytes/ops/seconds, causes, prefetches, the worker
    (busy, waited, calls) and the waits for memory."""
    sa, sb = after["memory"]["swap"], before["memory"]["swap"]
    pa, pb = after["memory"]["prefetch"], before["memory"]["prefetch"]
    out: dict[str, Any] = {f"{d}_{f}": sa[d][f] - sb[d][f] for d in ("out", "in") for f in ("bytes", "ops", "seconds")}
    out["by_cause"] = {c: n - sb["by_cause"].get(c, 0) for c, n in sa["by_cause"].items()}
    out["prefetch"] = {key: pa[key] - pb[key] for key in ("on_time", "late", "cancelled", "scheduled")}
    out["worker_busy_s"] = after["worker"]["busy_s"] - before["worker"]["busy_s"]
    out["worker_wait_s"] = after["worker"]["wait_s"] - before["worker"]["wait_s"]
    out["worker_calls"] = after["worker"]["calls"] - before["worker"]["calls"]
    ra, rb = after["memory"]["room_waits"], before["memory"]["room_waits"]
    out["room_waits"] = {key: ra[key] - rb[key] for key in ("waits", "admitted", "timed_out", "abandoned", "wait_s")}
    return out


def _batched_decode(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """The default model's batched decode passes during the probe (from `models` before and after): passes,
    the tokens they made (sequences), graph captures and replays, and the mean tokens per pass. Decode
    steps that ran alone are not among them."""
    def counters(models: dict[str, Any]) -> dict[str, int]:
        return next(m["batched_decode"] for m in models["models"] if m["name"] == models["default"])

    a, b = counters(after), counters(before)
    out = {key: a[key] - b[key] for key in ("steps", "sequences", "captures", "replays")}
    out["passes"] = out.pop("steps")
    out["tokens_per_pass"] = out["sequences"] / out["passes"] if out["passes"] else None
    return out


def _memory_summary(rows: list[list[float]], capacity: int) -> dict[str, Any]:
    used = [r[1] for r in rows] or [0]
    stride = max(1, len(rows) // 60)
    return {"data_capacity_nbytes": capacity, "samples": len(rows), "data_used_min_nbytes": min(used),
            "data_used_mean_nbytes": sum(used) / len(used), "data_used_max_nbytes": max(used),
            "data_used_p50_nbytes": percentile(used, 50),
            "resident_sessions_max": max((r[3] for r in rows), default=0),
            "swapped_sessions_max": max((r[4] for r in rows), default=0),
            "timeline_columns": ["t_s", "data_used_nbytes", "host_used_nbytes", "resident", "swapped"],
            "timeline": rows[::stride]}


def _client(cpu_s: float, wall_s: float, lags: list[float], connections: int) -> dict[str, Any]:
    """The bench process's own load; `saturated` when it may have slowed the agents down."""
    lag_p99_ms = percentile(lags, 99) * 1e3
    return {"cpu_s": cpu_s, "cpu_frac": cpu_s / wall_s, "loop_lag_p50_ms": percentile(lags, 50) * 1e3,
            "loop_lag_p99_ms": lag_p99_ms, "connections": connections,
            "saturated": cpu_s / wall_s > CLIENT_CPU_LIMIT or lag_p99_ms > CLIENT_LAG_LIMIT_MS}


async def run_probe(path: str, mode: Mode, agents: int, w: Workload, seed: int) -> dict[str, Any]:
    """One density probe: `agents` agents of `mode` against the daemon at `path`; the record's fields."""
    from djinn import aio

    ctl = await aio.connect(path, client="bench-signals")
    try:
        await asyncio.wait_for(_warm_up(ctl, w), 4 * HANG_S)
        before = await _wait_idle(ctl)
        models = await ctl.syscall("models")
        vocab = next(m["vocab_size"] for m in models["models"] if m["name"] == models["default"])
        rng = random.Random(seed)
        arrivals = arrival_times(agents, w.arrival_rate, rng)
        kernels = await asyncio.gather(*(aio.connect(path, client="bench-agent") for _ in range(agents)))
        log, arena_seen, stop, rows = ProbeLog(agents), list[int](), asyncio.Event(), list[list[float]]()
        t0 = _now() + 0.01
        deadline = t0 + arrivals[-1] + w.duration_s
        sampler = asyncio.create_task(_sample_memory(ctl, w.sample_s, t0, stop, rows))
        lag = asyncio.create_task(_loop_lag(0.01, stop))
        cpu0, dcpu0 = time.process_time(), _daemon_cpu_s(before["pid"])
        tasks = [asyncio.create_task(Agent(k, mode, w, log, random.Random(seed * 1_000_003 + i), min(vocab, 32000),
                                           deadline, arena_seen).run(t0 + arrivals[i])) for i, k in enumerate(kernels)]
        _, hung = await asyncio.wait(tasks, timeout=deadline - _now() + w.backoff.worst_s + HANG_S)
        wall_s = _now() - t0
        cpu_s, dcpu1 = time.process_time() - cpu0, _daemon_cpu_s(before["pid"])
        for task in hung:
            task.cancel()
            log.fail("TIMEOUT")
            log.agent_done(math.inf, failed=True)
        for k in kernels:
            await k.close()
        stop.set()
        lags = await lag
        if (await asyncio.wait({sampler}, timeout=HANG_S))[1]:
            sampler.cancel()
        after = before if hung else await asyncio.wait_for(ctl.stat(), HANG_S)
        models_after = models if hung else await asyncio.wait_for(ctl.syscall("models"), HANG_S)
    finally:
        await ctl.close()
    capacity = before["memory"]["segments"]["data"]["capacity_nbytes"]
    arena = arena_seen[0] if arena_seen else None
    delta = _delta(after, before)
    return {
        **summarize_probe(log, w.slo_p99_ms),
        "arena_nbytes": arena, "resident_capacity": capacity // arena if arena else None,
        "arrival_span_s": arrivals[-1], "wall_s": wall_s, "leftover_sessions": len(before["sessions"]),
        "hung_agents": len(hung),
        "swap": delta, "bytes_paged_out": delta["out_bytes"], "bytes_paged_in": delta["in_bytes"],
        "worker_busy_frac": delta["worker_busy_s"] / wall_s,
        # queueing on the device worker (each call's submission to start), and requests' waits for memory
        "worker_wait_per_call_ms": delta["worker_wait_s"] / max(1, delta["worker_calls"]) * 1e3,
        "room_wait_s": delta["room_waits"]["wait_s"],
        "batched_decode": _batched_decode(models_after, models),
        "memory": _memory_summary(rows, capacity),
        "client": _client(cpu_s, wall_s, lags, agents + 1),
        "daemon_cpu_frac": (dcpu1 - dcpu0) / wall_s if dcpu0 is not None and dcpu1 is not None else None,
    }


# -- the wake-up experiment -------------------------------------------------------------------------------

WAKE_VARIANTS = ("no_hint", "hint", "never_paged")


async def run_wakeup(path: str, w: Workload, cycles: int, tool_s: float, seed: int) -> list[dict[str, Any]]:
    """One agent alone on a proactive daemon, round robin over: IO_WAIT with expected_ms (paged out,
    prefetched), IO_WAIT without it (paged out, paged in on COMPUTE), and no signal (never paged).
    Wake-up = tool return to first token. The first round warms up and is not kept."""
    from djinn import aio

    rng = random.Random(seed)
    k = await aio.connect(path, client="bench-signals-wakeup")
    lat: dict[str, list[float]] = {v: [] for v in WAKE_VARIANTS}
    moved: dict[str, dict[str, int]] = {v: {"out_ops": 0, "in_ops": 0, "on_time": 0, "late": 0} for v in WAKE_VARIANTS}
    try:
        s = await k.open_session(max_tokens=w.budget.max_tokens)
        await s.generate([rng.randrange(256) for _ in range(w.budget.context_tokens)], 1)
        room = (w.budget.max_tokens - w.budget.context_tokens - 2) // (2 * len(WAKE_VARIANTS)) - 1
        for i in range(len(WAKE_VARIANTS) * (1 + min(cycles, room))):
            v = WAKE_VARIANTS[i % len(WAKE_VARIANTS)]
            before = await k.stat()
            if v != "never_paged":
                await s.signal_phase("IO_WAIT", expected_ms=tool_s * 1e3 if v == "hint" else None)
            await asyncio.sleep(tool_s)
            t_back = _now()
            if v != "never_paged":
                await s.signal_phase("COMPUTE", wait=False)
            async for _ in s.generate_stream([rng.randrange(256)], 1):
                t_first = _now()
            if i < len(WAKE_VARIANTS):
                continue
            lat[v].append(t_first - t_back)
            d = _delta(await k.stat(), before)
            for key, value in (("out_ops", d["out_ops"]), ("in_ops", d["in_ops"]),
                               ("on_time", d["prefetch"]["on_time"]), ("late", d["prefetch"]["late"])):
                moved[v][key] += value
        await s.close()
    finally:
        await k.close()
    return [{"variant": v, "n": len(lat[v]), "tool_ms": tool_s * 1e3, "wake_p50_ms": percentile(lat[v], 50) * 1e3,
             "wake_p99_ms": percentile(lat[v], 99) * 1e3, "wake_mean_ms": sum(lat[v]) / max(1, len(lat[v])) * 1e3,
             **moved[v]} for v in WAKE_VARIANTS]


# -- the run ----------------------------------------------------------------------------------------------


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _workload(s: argparse.Namespace) -> Workload:
    return Workload(
        model=s.model, budget=TokenBudget(s.context_tokens, s.tool_tokens, s.decode_tokens, s.max_tokens),
        tools=ToolTimes.parse(s.tool_time), hint=s.hint, arrival_rate=s.arrival_rate, duration_s=s.duration_s,
        slo_p99_ms=s.slo_p99_ms, backoff=Backoff(s.enomem_retries, s.backoff_ms / 1e3), sample_s=s.sample_ms / 1e3)


def run(args: argparse.Namespace, launch: Launcher = daemon) -> int:
    """Search each mode's density; record probes, densities, the wake-up experiment and the targets."""
    s = _settings(args)
    if s.replot:
        return replot(Path(s.output_dir))
    names = s.modes.split(",")
    if not names or any(m not in MODES for m in names):
        print(f"--modes {s.modes!r}: choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    w = _workload(s)
    vmu_data, capacity = memory_plan(s)
    spec = AgentsSpec.parse(s.agents)
    if spec.relative and capacity is None:
        print("--agents entries like '2x' need a known capacity: give --resident-arenas, or --vmu-data in bytes "
              "with a built-in model", file=sys.stderr)
        return 2
    rec = Recorder("signals", s.output_dir, quick=s.quick)
    state = Run(s, w, rec, vmu_data, capacity, spec.kind, spec.resolve(capacity or 1))
    t0 = time.monotonic()
    with state.cpus.as_client(), Daemons(launch, s.daemon_per) as daemons:
        for name in names:
            state.search(daemons, MODES[name])
            daemons.release(name)
        if s.compare_s > 0:
            state.compare(daemons)
    verdict = rec.record(kind="targets", model=s.model, config=state.config,
                         **targets(state.densities, state.probes, state.wakeups, state.bounded, state.compares))
    report(state.probes, state.densities, state.bounded, state.wakeups, verdict, Path(s.output_dir))
    print(f"results: {rec.path} ({time.monotonic() - t0:.0f} s)")
    return 0


class Run:
    """One invocation's state: settings, the records made so far, each mode's density."""

    def __init__(self, s: argparse.Namespace, w: Workload, rec: Recorder, vmu_data: str, capacity: int | None,
                 kind: str, counts: list[int]) -> None:
        self.s, self.w, self.rec, self.kind, self.counts, self.capacity = s, w, rec, kind, counts, capacity
        self.config = {**w.describe(), "vmu_data": vmu_data, "expected_capacity": capacity, "agents_spec": s.agents,
                       "daemon_per": s.daemon_per, "idle_timeout_s": s.idle_timeout_s,
                       "memory_wait_ms": s.memory_wait_ms, "device_flag": s.device,
                       "enomem_retries": s.enomem_retries}
        from djinn.drivers.vmu import resolve_device  # the daemons' own reading of --device

        self.cpus = placement(s.cpus, resolve_device(s.device)[0].type)
        self.config.update(self.cpus.record())
        self.flags = {m: tuple([*daemon_flags(s, m, vmu_data), *self.cpus.daemon_flags()]) for m in MODES.values()}
        self.probes: list[dict[str, Any]] = []
        self.densities: dict[str, int] = {}
        self.bounded: dict[str, bool] = {}
        self.wakeups: list[dict[str, Any]] = []
        self.compares: list[dict[str, Any]] = []

    def search(self, daemons: Daemons, mode: Mode) -> None:
        """Probe `mode` until its density is found; record each probe and the density."""
        search = DensitySearch(self.kind, self.counts, self.s.resolution, self.s.exhaustive)
        while (n := search.next_probe()) is not None:
            with daemons.use(mode.name, self.flags[mode]) as path:
                if mode.name == "proactive" and not self.wakeups and self.s.wakeup_cycles > 0:
                    self._wakeup(path)
                result = _run_async(run_probe(path, mode, n, self.w, self.s.seed + n))
            self._check_capacity(result)
            if result["hung_agents"]:
                daemons.release(mode.name)
            probe = self.rec.record(kind="probe", mode=mode.name, model=self.s.model, agents=n,
                                    slo_p99_ms=self.w.slo_p99_ms, daemon_flags=list(self.flags[mode]),
                                    config=self.config, **result)
            self.probes.append(probe)
            search.record(n, result["success"])
            _progress(probe)
        self.densities[mode.name] = search.density
        self.bounded[mode.name] = any(not ok for ok in search.results.values())
        self.rec.record(kind="density", mode=mode.name, model=self.s.model, density=search.density,
                        upper_bound_found=self.bounded[mode.name],
                        probed={str(k): v for k, v in sorted(search.results.items())}, config=self.config)

    def compare(self, daemons: Daemons) -> None:
        """proactive and recompute again at the largest agent count both were probed at, each for
        --compare-s, each against a daemon of its own: the p99 of a density probe's few hundred steps is
        about its third-largest step, too few to tell modes a few percent apart."""
        n = compared_count(self.probes)
        if n is None:
            return
        w = dataclasses.replace(self.w, duration_s=self.s.compare_s)
        for name in ("proactive", "recompute"):
            mode = MODES[name]
            with daemons.use(name, self.flags[mode]) as path:
                result = _run_async(run_probe(path, mode, n, w, self.s.seed + n))
            daemons.release(name)
            self.compares.append(self.rec.record(
                kind="compare", mode=name, model=self.s.model, agents=n, slo_p99_ms=w.slo_p99_ms,
                duration_s=w.duration_s, daemon_flags=list(self.flags[mode]), config=self.config, **result))
            _progress(self.compares[-1])

    def _wakeup(self, path: str) -> None:
        rows = _run_async(run_wakeup(path, self.w, self.s.wakeup_cycles, self.s.wakeup_tool_ms / 1e3, self.s.seed))
        self.wakeups = [self.rec.record(kind="wakeup", mode="proactive", model=self.s.model, config=self.config,
                                        **r) for r in rows]

    def _check_capacity(self, result: dict[str, Any]) -> None:
        got = result["resident_capacity"]
        if self.capacity is not None and got is not None and got != self.capacity:
            print(f"warning: the Data segment holds {got} arenas, not the {self.capacity} planned "
                  f"(arena {result['arena_nbytes']} bytes); '2x' counts used the plan", file=sys.stderr)
            self.capacity = got


def _progress(p: dict[str, Any]) -> None:
    p99 = "n/a" if p["step_p99_ms"] is None else f"{p['step_p99_ms']:.0f}"
    print(f"  {p['mode']:>14} agents={p['agents']:<4} {'PASS' if p['success'] else 'FAIL'} p99={p99}ms "
          f"failed={p['failed_agents']} retries={p['enomem_retries']} worker={p['worker_busy_frac']:.0%} "
          f"client_cpu={p['client']['cpu_frac']:.0%}", file=sys.stderr)


# -- figures and tables -----------------------------------------------------------------------------------


def report(probes: list[dict[str, Any]], densities: dict[str, int], bounded: dict[str, bool],
           wakeups: list[dict[str, Any]], verdict: dict[str, Any], out_dir: Path) -> None:
    """Write the run's figures (signals_{cliff,memory}_<model>.svg) and print its tables, density last."""
    if probes:
        model = probes[0]["model"]
        for name, text in (("cliff", cliff_svg(probes, densities)), ("memory", memory_svg(probes, densities))):
            path = out_dir / f"signals_{name}_{slug(model)}.svg"
            path.write_text(text)
            print(f"figure: {path}")
    print("\n".join(summary_lines(probes, densities, bounded, wakeups, verdict)))


def replot(out_dir: Path) -> int:
    """The figures and tables of the latest run in out_dir/signals.jsonl (per model), from its records."""
    path = out_dir / "signals.jsonl"
    if not path.exists():
        print(f"no {path} to replot", file=sys.stderr)
        return 2
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for model in dict.fromkeys(r["model"] for r in records):
        latest = [r for r in records if r["model"] == model and r["run_id"] == max(
            x["run_id"] for x in records if x["model"] == model)]
        of = {kind: [r for r in latest if r["kind"] == kind]
              for kind in ("probe", "density", "wakeup", "targets", "compare")}
        densities = {d["mode"]: d["density"] for d in of["density"]}
        bounded = {d["mode"]: d.get("upper_bound_found", True) for d in of["density"]}
        verdict = (of["targets"][-1] if of["targets"]
                   else targets(densities, of["probe"], of["wakeup"], bounded, of["compare"]))
        print(f"\n{model} ({latest[0]['run_id']}, {latest[0]['device']}):")
        report(of["probe"], densities, bounded, of["wakeup"], verdict, out_dir)
    return 0
