"""The agent workload of ablation 4 as pure data: tool times, arrivals, token budgets, backoff,
step statistics and the density search. No I/O (a `file:` tool-time spec is read once, at parse).

Rules:
- An agent arrives at a Poisson time, opens one session for its life and repeats a step: a tool
  call (the "tool" phase, seconds drawn from ToolTimes) then one generate that prefills the tool's
  result and decodes the next thought (the "reflect -> reason" phase). Its first step prefills the
  agent's whole context instead. When the next step would overflow max_tokens, the life ends and a
  new one starts with a fresh context.
- Step latency runs from the moment the agent wants the model (arrival, or the tool's return) to
  the step's last token, retries and paging included; wake-up latency from the tool's return to
  the step's first token.
- A probe meets the SLO when no agent failed and the p99 step latency is under the bound. Its
  success rate is the fraction of agents that did not fail and whose every step was under the bound.
- Times are seconds unless a name says otherwise. The last section reads a run's records back
  (each mode's headline probe, the issue's targets, the tables, the figures as SVG text); it too
  is pure.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.common import percentile
from bench.svg import Panel, Series, figure

__all__ = ["ToolTimes", "AgentsSpec", "Backoff", "TokenBudget", "ProbeLog", "DensitySearch", "arrival_times",
           "summarize_probe", "headline", "targets", "slug", "cliff_svg", "memory_svg", "summary_lines"]


@dataclass(frozen=True, slots=True)
class ToolTimes:
    """A tool-call duration distribution: uniform:A:B, const:X, exp:MEAN (seconds) or file:PATH
    (one duration in seconds per line; drawn with replacement)."""

    spec: str
    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> ToolTimes:
        """Raises ValueError naming what is wrong with `spec`."""
        kind, _, rest = spec.partition(":")
        if kind == "file":
            values = _read_durations(Path(rest))
            return cls(spec, kind, tuple(values))
        try:
            params = tuple(float(x) for x in rest.split(":")) if rest else ()
        except ValueError:
            raise ValueError(f"tool time {spec!r}: parameters must be numbers of seconds") from None
        arity = {"uniform": 2, "const": 1, "exp": 1}
        if kind not in arity:
            raise ValueError(f"tool time {spec!r}: use uniform:A:B, const:X, exp:MEAN or file:PATH")
        if len(params) != arity[kind] or any(not math.isfinite(p) or p < 0 for p in params):
            raise ValueError(f"tool time {spec!r}: {kind} takes {arity[kind]} finite number(s) >= 0")
        if kind == "uniform" and params[0] > params[1]:
            raise ValueError(f"tool time {spec!r}: A must not exceed B")
        return cls(spec, kind, params)

    def sample(self, rng: random.Random) -> float:
        if self.kind == "uniform":
            return rng.uniform(*self.params)
        if self.kind == "const":
            return self.params[0]
        if self.kind == "exp":
            return rng.expovariate(1 / self.params[0]) if self.params[0] > 0 else 0.0
        return rng.choice(self.params)

    @property
    def mean_s(self) -> float:
        if self.kind == "uniform":
            return (self.params[0] + self.params[1]) / 2
        if self.kind in ("const", "exp"):
            return self.params[0]
        return sum(self.params) / len(self.params)

    def describe(self) -> dict[str, Any]:
        """The spec as recorded: a file's durations are summarised, not copied (nor its path)."""
        if self.kind != "file":
            return {"spec": self.spec, "mean_s": self.mean_s}
        return {"spec": "file", "n": len(self.params), "mean_s": self.mean_s, "min_s": min(self.params),
                "max_s": max(self.params)}


def _read_durations(path: Path) -> list[float]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"tool time file {path}: {e.strerror or e}") from None
    values = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"tool time file {path}, line {number}: {text!r} is not a number of seconds") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"tool time file {path}, line {number}: durations must be finite and >= 0")
        values.append(value)
    if not values:
        raise ValueError(f"tool time file {path} holds no durations")
    return values


def arrival_times(n: int, rate_per_s: float, rng: random.Random) -> list[float]:
    """Seconds from the start at which each of n agents arrives: a Poisson process of `rate_per_s`
    (the first arrives at 0). A rate of 0 or less means all at once."""
    if n <= 0:
        return []
    times = [0.0]
    for _ in range(n - 1):
        times.append(times[-1] + (rng.expovariate(rate_per_s) if rate_per_s > 0 else 0.0))
    return times


@dataclass(frozen=True, slots=True)
class AgentsSpec:
    """Which agent counts to probe: a list ("4,8,16") or a search range ("lo:hi"); an entry "2x" is a
    multiple of the resident capacity (the arenas the Data segment holds)."""

    kind: str
    entries: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> AgentsSpec:
        if ":" in text:
            parts = tuple(p.strip() for p in text.split(":"))
            if len(parts) != 2:
                raise ValueError(f"--agents {text!r}: a range is lo:hi")
            spec = cls("range", parts)
        else:
            spec = cls("list", tuple(p.strip() for p in text.split(",") if p.strip()))
        if not spec.entries:
            raise ValueError(f"--agents {text!r}: no agent counts")
        spec.resolve(1)
        return spec

    @property
    def relative(self) -> bool:
        return any(e.endswith("x") for e in self.entries)

    def resolve(self, capacity: int) -> list[int]:
        """The entries as agent counts (>= 1) for a resident capacity; ValueError on a bad entry."""
        out = []
        for e in self.entries:
            try:
                n = round(float(e[:-1]) * capacity) if e.endswith("x") else int(e)
            except ValueError:
                raise ValueError(f"--agents entry {e!r}: an integer or a multiple such as 2x") from None
            if n < 1:
                raise ValueError(f"--agents entry {e!r} is fewer than one agent (capacity {capacity})")
            out.append(n)
        if self.kind == "range" and out[0] > out[1]:
            raise ValueError(f"--agents range {':'.join(self.entries)}: lo exceeds hi")
        return out if self.kind == "range" else sorted(set(out))


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retries of a retryable ENOMEM: `retries` at most, waiting base * 2^attempt (capped), jittered
    by up to +50% so that agents refused together do not return together."""

    retries: int = 8
    base_s: float = 0.02
    cap_s: float = 0.5

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        return min(self.cap_s, self.base_s * 2**attempt) * (1 + 0.5 * rng.random())

    @property
    def worst_s(self) -> float:
        return sum(min(self.cap_s, self.base_s * 2**a) * 1.5 for a in range(self.retries))


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """Token counts of one agent's life; `steps_per_life` steps follow the first."""

    context_tokens: int
    tool_tokens: int
    decode_tokens: int
    max_tokens: int

    def __post_init__(self) -> None:
        if min(self.context_tokens, self.tool_tokens, self.decode_tokens) < 1:
            raise ValueError("context, tool and decode tokens must each be >= 1")
        if self.context_tokens + self.decode_tokens + self.step_tokens > self.max_tokens:
            raise ValueError(f"max_tokens {self.max_tokens} leaves no room for one tool step after a "
                             f"{self.context_tokens}-token context; raise --max-tokens")

    @property
    def step_tokens(self) -> int:
        return self.tool_tokens + self.decode_tokens

    @property
    def steps_per_life(self) -> int:
        return (self.max_tokens - self.context_tokens - self.decode_tokens) // self.step_tokens


@dataclass
class ProbeLog:
    """What the agents of one probe observed. Appended to by the agents' tasks (one event loop)."""

    agents: int
    step_s: list[float] = field(default_factory=list)
    first_step_s: list[float] = field(default_factory=list)
    wake_s: list[float] = field(default_factory=list)
    enomem_retries: int = 0
    enomem_by_call: dict[str, int] = field(default_factory=dict)
    enomem_example: str | None = None
    retried_steps: int = 0
    abandoned_steps: int = 0
    sessions_opened: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    failed_agents: int = 0
    worst_step_s: list[float] = field(default_factory=list)

    def refused(self, call: str, message: str) -> None:
        """A retryable ENOMEM from `call`, about to be retried."""
        self.enomem_retries += 1
        self.enomem_by_call[call] = self.enomem_by_call.get(call, 0) + 1
        if self.enomem_example is None:
            self.enomem_example = message

    def fail(self, errno: str) -> None:
        self.failed_agents += 1
        self.failures[errno] = self.failures.get(errno, 0) + 1

    def agent_done(self, worst_step_s: float, failed: bool) -> None:
        """An agent's end: its slowest step (a failed agent counts as infinitely slow)."""
        self.worst_step_s.append(math.inf if failed else worst_step_s)


def _ms(values: list[float], q: float) -> float | None:
    return None if not values else percentile(values, q) * 1e3


def summarize_probe(log: ProbeLog, slo_p99_ms: float) -> dict[str, Any]:
    """Latency percentiles (ms; None when nothing was measured) and the SLO verdict of one probe."""
    every = log.step_s + log.first_step_s
    p99 = _ms(every, 99)
    ok = log.failed_agents == 0 and p99 is not None and p99 <= slo_p99_ms
    served = sum(1 for w in log.worst_step_s if w * 1e3 <= slo_p99_ms)
    return {
        "success": ok,
        "success_rate": served / log.agents if log.agents else 0.0,
        "failed_agents": log.failed_agents,
        "failures": dict(log.failures),
        "steps": len(every),
        "tool_steps": len(log.step_s),
        "sessions_opened": log.sessions_opened,
        "enomem_retries": log.enomem_retries,
        "enomem_by_call": dict(log.enomem_by_call),
        "enomem_example": log.enomem_example,
        "retried_steps": log.retried_steps,
        "abandoned_steps": log.abandoned_steps,
        "step_p50_ms": _ms(every, 50),
        "step_p99_ms": p99,
        "tool_step_p50_ms": _ms(log.step_s, 50),
        "tool_step_p99_ms": _ms(log.step_s, 99),
        "first_step_p50_ms": _ms(log.first_step_s, 50),
        "first_step_p99_ms": _ms(log.first_step_s, 99),
        "wake_p50_ms": _ms(log.wake_s, 50),
        "wake_p99_ms": _ms(log.wake_s, 99),
    }


@dataclass
class DensitySearch:
    """Which agent count to probe next for one mode, assuming more agents never do better.

    A list is probed in ascending order and stops at the first failure (exhaustive: never stops).
    A range lo:hi probes lo, doubles while probes pass, then bisects between the largest pass and
    the smallest failure until they are within `resolution` (a fraction of the pass, >= 1 agent).
    """

    kind: str
    counts: list[int]
    resolution: float = 0.125
    exhaustive: bool = False
    results: dict[int, bool] = field(default_factory=dict)

    def next_probe(self) -> int | None:
        if self.kind == "list":
            if not self.exhaustive and any(not ok for ok in self.results.values()):
                return None
            return next((n for n in self.counts if n not in self.results), None)
        lo, hi = self.counts
        passed = [n for n, ok in self.results.items() if ok]
        failed = [n for n, ok in self.results.items() if not ok]
        if not self.results:
            return lo
        if not failed:
            best = max(passed)
            return min(hi, best * 2) if best < hi else None
        first_fail = min(failed)
        if not passed or max(passed) > first_fail:
            return None
        best = max(passed)
        if first_fail - best <= max(1, int(self.resolution * best)):
            return None
        return (best + first_fail) // 2

    def record(self, n: int, ok: bool) -> None:
        self.results[n] = ok

    @property
    def density(self) -> int:
        """The largest count that passed below every failure (0 if none passed)."""
        first_fail = min((n for n, ok in self.results.items() if not ok), default=math.inf)
        return max((n for n, ok in self.results.items() if ok and n < first_fail), default=0)


# -- reading a run's records ------------------------------------------------------------------------------


def headline(probes: list[dict[str, Any]], mode: str, density: int) -> dict[str, Any] | None:
    """The probe a mode is reported by: the one at its density, else its smallest probe."""
    mine = sorted((p for p in probes if p["mode"] == mode), key=lambda p: p["agents"])
    return next((p for p in mine if p["agents"] == density), mine[0] if mine else None)


def _ratio(a: int | None, b: int | None) -> float | None:
    return a / b if a is not None and b else None


def compared_count(probes: list[dict[str, Any]]) -> int | None:
    """The agent count proactive and recompute are compared at: the largest both were probed at."""
    common = {p["agents"] for p in probes if p["mode"] == "proactive"} & {
        p["agents"] for p in probes if p["mode"] == "recompute"}
    return max(common) if common else None


def targets(densities: dict[str, int], probes: list[dict[str, Any]], wakeups: list[dict[str, Any]],
            bounded: dict[str, bool] | None = None, compares: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The issue's targets, measured: density ratios (proactive >= 2x reactive, >= 3x none), wake-up
    with a hint within 1 ms of a never-paged session, and proactive's p99 step latency under
    recompute's at the largest agent count both probed (with, for the record, both modes' p99 over the
    steps after a tool call): from the longer `compares` probes of both modes when the run made them,
    else from the density probes. A target that could not be measured is None.
    `bounded[mode]` is False where no failure was found above the density (it is a lower bound)."""
    pro = densities.get("proactive")
    vs_reactive = _ratio(pro, densities.get("reactive"))
    vs_none = _ratio(pro, densities.get("none"))
    wake = {w["variant"]: w for w in wakeups}
    hint, never = wake.get("hint"), wake.get("never_paged")
    wake_p50 = hint["wake_p50_ms"] - never["wake_p50_ms"] if hint and never else None
    wake_p99 = hint["wake_p99_ms"] - never["wake_p99_ms"] if hint and never else None
    compared = [c for c in compares if c["mode"] in ("proactive", "recompute")]
    judged = compared if {c["mode"] for c in compared} == {"proactive", "recompute"} else probes
    at = compared_count(judged)
    p99 = {(p["mode"], p["agents"]): p["step_p99_ms"] for p in judged}
    pro_p99 = p99.get(("proactive", at)) if at else None
    rec_p99 = p99.get(("recompute", at)) if at else None
    after_tool = {(p["mode"], p["agents"]): p.get("tool_step_p99_ms") for p in judged}

    unbounded = {m for m, b in (bounded or {}).items() if not b}

    def met(value: float | None, ok: bool, over: str = "") -> bool | None:
        """None: not measured, or undecided because a density is only a lower bound (proactive's
        short of the target, or the one it is divided by over it)."""
        if value is None or ("proactive" in unbounded and not ok) or (over in unbounded and ok):
            return None
        return ok

    return {
        "densities": dict(densities),
        "density_lower_bound": sorted(unbounded),
        "proactive_vs_reactive": vs_reactive,
        "proactive_vs_reactive_met": met(vs_reactive, (vs_reactive or 0) >= 2, "reactive"),
        "proactive_vs_none": vs_none,
        "proactive_vs_none_met": met(vs_none, (vs_none or 0) >= 3, "none"),
        "wake_hint_minus_never_paged_p50_ms": wake_p50,
        "wake_hint_minus_never_paged_p99_ms": wake_p99,
        "wake_within_1ms_met": None if wake_p50 is None else wake_p50 <= 1.0,
        "recompute_compared_at_agents": at,
        "recompute_compared_on": (f"compare probes of {compared[0].get('duration_s')} s" if judged is compared
                                  else "density probes") if at else None,
        "proactive_step_p99_ms": pro_p99,
        "recompute_step_p99_ms": rec_p99,
        "beats_recompute_p99_met": None if pro_p99 is None or rec_p99 is None else pro_p99 < rec_p99,
        # For the record, not the target: the p99 over the steps that follow a tool call, the only steps the
        # two modes run differently (an agent's first step is the same fresh prefill in both).
        "proactive_tool_step_p99_ms": after_tool.get(("proactive", at)) if at else None,
        "recompute_tool_step_p99_ms": after_tool.get(("recompute", at)) if at else None,
    }


def slug(model: str) -> str:
    """A file-name piece for a model spec: 'dummy:llama-8b' -> 'llama-8b'."""
    return "".join(c if c.isalnum() or c in "-." else "-" for c in model.split(":")[-1].rstrip("/").split("/")[-1])


def _by_mode(probes: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    modes = dict.fromkeys(p["mode"] for p in probes)
    return {m: sorted((p for p in probes if p["mode"] == m), key=lambda p: p["agents"]) for m in modes}


def _title(probes: list[dict[str, Any]]) -> str:
    p = probes[0]
    return (f"ablation 4, {p['model']}: tools {p['config']['tool_time']['spec']} s, "
            f"SLO p99 {p['slo_p99_ms']:g} ms, {p['device']}")


def cliff_svg(probes: list[dict[str, Any]], densities: dict[str, int]) -> str:
    """The density cliff: p99 step latency and agents served against agents, one line per mode;
    a probe that missed the SLO is drawn hollow."""
    mine = _by_mode(probes)

    def series(value: Callable[[dict[str, Any]], float | None]) -> tuple[Series, ...]:
        return tuple(Series(m, tuple((p["agents"], value(p)) for p in ps), tuple(not p["success"] for p in ps))
                     for m, ps in mine.items())

    slo = probes[0]["slo_p99_ms"]
    return figure([
        Panel("p99 step latency (hollow: probe missed the SLO)", "concurrent agents", "ms",
              series(lambda p: p["step_p99_ms"]), hlines=((slo, "SLO"),), log_y=True),
        Panel("agents served: none failed, every step within the SLO bound", "concurrent agents", "%",
              series(lambda p: 100 * p["success_rate"]), y_min=0, y_max=105,
              notes=tuple(f"{m}: density {densities.get(m, 0)}" for m in mine)),
    ], _title(probes))


def memory_svg(probes: list[dict[str, Any]], densities: dict[str, int]) -> str:
    """The Data segment in use over time, in each mode's headline probe."""
    lines, capacity = [], 0
    for m in _by_mode(probes):
        top = headline(probes, m, densities.get(m, 0))
        if top is not None:
            capacity = max(capacity, top["memory"]["data_capacity_nbytes"])
            points = tuple((r[0], r[1] / 2**20) for r in top["memory"]["timeline"])
            lines.append(Series(f"{m} ({top['agents']})", points, markers=False))
    return figure([Panel("Data segment in use at each mode's density", "seconds into the probe", "MiB",
                         tuple(lines), hlines=((capacity / 2**20, "capacity"),), y_min=0)], _title(probes))


def _f(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def summary_lines(probes: list[dict[str, Any]], densities: dict[str, int], bounded: dict[str, bool],
                  wakeups: list[dict[str, Any]], verdict: dict[str, Any]) -> list[str]:
    """The run's tables as text: the wake-up experiment, the targets, then each mode's density."""
    out = []
    if wakeups:
        out.append(f"\nwake-up, one agent alone ({wakeups[0]['tool_ms']:g} ms tool), tool return to first token:")
        out += [f"  {r['variant']:12} p50 {_f(r['wake_p50_ms'], '.2f'):>7} ms  p99 {_f(r['wake_p99_ms'], '.2f'):>7} ms"
                f"  page-outs {r['out_ops']}  page-ins {r['in_ops']}  prefetches on time {r['on_time']}, "
                f"late {r['late']}" for r in wakeups]
    v = verdict
    floor = "proactive" in v.get("density_lower_bound", ())

    def ratio(x: float | None) -> str:
        return f"{'>=' if floor and x is not None else ''}{_f(x, '.2f')}"

    out += ["\ntargets (None: not measured, or a lower bound short of the target):",
            f"  proactive / reactive density {ratio(v['proactive_vs_reactive'])} "
            f"(>= 2: {v['proactive_vs_reactive_met']})",
            f"  proactive / none density     {ratio(v['proactive_vs_none'])} (>= 3: {v['proactive_vs_none_met']})",
            f"  wake-up hint - never paged   p50 {_f(v['wake_hint_minus_never_paged_p50_ms'], '+.2f')} ms, "
            f"p99 {_f(v['wake_hint_minus_never_paged_p99_ms'], '+.2f')} ms "
            f"(p50 within 1 ms: {v['wake_within_1ms_met']})",
            f"  p99 step at {v['recompute_compared_at_agents']} agents ({v.get('recompute_compared_on')}): "
            f"proactive {_f(v['proactive_step_p99_ms'])} ms, "
            f"recompute {_f(v['recompute_step_p99_ms'])} ms (beats recompute: {v['beats_recompute_p99_met']}); "
            f"after a tool call: {_f(v.get('proactive_tool_step_p99_ms'))} against "
            f"{_f(v.get('recompute_tool_step_p99_ms'))} ms"]
    slo = probes[0]["slo_p99_ms"] if probes else math.nan
    out += [f"\ndensity: most agents with no failure and p99 step <= {slo:g} ms ('>=': no failure found above); "
            "the other columns at that count",
            f"{'mode':15} {'density':>7} {'xreact':>6} {'xnone':>6} {'p50 ms':>8} {'p99 ms':>8} {'wake50':>7} "
            f"{'wake99':>7} {'out MiB':>8} {'in MiB':>8} {'worker':>6} {'client':>6}"]
    for mode, d in densities.items():
        p = headline(probes, mode, d)
        if p is None:
            continue
        shown = f"{'' if bounded.get(mode, True) else '>='}{d}"
        out.append(f"{mode:15} {shown:>7} {_f(_ratio(d, densities.get('reactive')), '.2f'):>6} "
                   f"{_f(_ratio(d, densities.get('none')), '.2f'):>6} {_f(p['step_p50_ms']):>8} "
                   f"{_f(p['step_p99_ms']):>8} {_f(p['wake_p50_ms']):>7} {_f(p['wake_p99_ms']):>7} "
                   f"{p['bytes_paged_out'] / 2**20:8.1f} {p['bytes_paged_in'] / 2**20:8.1f} "
                   f"{p['worker_busy_frac']:6.0%} {p['client']['cpu_frac']:6.0%}")
    busy = sorted({f"{p['mode']}@{p['agents']}" for p in probes if p["client"].get("saturated")})
    if busy:
        out.append(f"warning: the client was near saturation in {', '.join(busy)}: those latencies may be its own")
    return out
