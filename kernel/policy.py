"""Memory policies as pure cores: which session arenas to page out or in, and when.

No torch, no asyncio, no clock, no I/O. The kernel passes `now` (seconds, one monotonic
clock) and SessionView records in, carries the returned PageOut / PageIn actions out on the
device worker, and reports every finished transfer through `on_transfer_done`.

Rules, for one session's arena as the core sees it:

  where     IN         view.resident, no transfer of ours in flight
            GOING_OUT  a PageOut we emitted has not finished
            OUT        not view.resident, no transfer of ours in flight
            COMING_IN  a PageIn we emitted has not finished
  page out  only from IN and only if not busy. Causes: signal (chosen for its IO_WAIT),
            idle (idle longer than idle_timeout_s), pressure (chosen for neither)
  page in   only from OUT; wanted during GOING_OUT, it follows when that page-out finishes.
            Causes: syscall (COMPUTE or a GPU syscall), prefetch (a timer)
  prefetch  ARMED --due--> STARTED --its page-in finishes--> on_time
            ARMED | STARTED --COMPUTE or a GPU syscall first--> late
            ARMED | STARTED --IO_WAIT again, forget, a failed transfer, not out at due--> cancelled

Policies. none pages nothing out. reactive ignores phases; make_room takes sessions idle longer
than idle_timeout_s, least recently used first. proactive pages out on IO_WAIT (mode "eager": at
once; "lazy": when make_room wants memory), arms a prefetch to finish before the expected return,
pages in on COMPUTE; make_room takes IO_WAIT sessions, furthest expected return first, then other
sessions least recently used first. Every policy pages a swapped session in on a GPU syscall, since
a swapped arena is never addressed on the device.
"""

from __future__ import annotations

import heapq
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Literal

from .policy_records import (
    CAUSES,
    Action,
    Cause,
    Direction,
    Eviction,
    PageIn,
    PageOut,
    PolicyStats,
    SessionView,
    validate_expected_ms,
    validate_phase,
)

__all__ = [
    "CAUSES", "POLICIES", "MODES", "SessionView", "PageOut", "PageIn", "Action", "Eviction", "PolicyStats",
    "TransferEstimator", "Policy", "NonePolicy", "ReactivePolicy", "ProactivePolicy", "make_policy",
    "validate_phase", "validate_expected_ms",
]

Where = Literal["IN", "GOING_OUT", "OUT", "COMING_IN"]
POLICIES = ("proactive", "reactive", "none")
MODES = ("eager", "lazy")


@dataclass(slots=True)
class TransferEstimator:
    """Bytes per second each way, an EWMA over finished transfers starting from a conservative
    (slow) prior, so that early prefetches start early rather than late."""

    prior_bytes_per_s: float = 2e9
    alpha: float = 0.25
    _bps: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.prior_bytes_per_s > 0 and math.isfinite(self.prior_bytes_per_s)):
            raise ValueError(f"prior_bytes_per_s must be a positive number, got {self.prior_bytes_per_s!r}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"ewma alpha must be in (0, 1], got {self.alpha!r}")

    def observe(self, direction: Direction, nbytes: int, seconds: float) -> None:
        """Learn from one finished transfer. Ignores empty, instant or non-finite samples."""
        if nbytes <= 0 or not (seconds > 0 and math.isfinite(seconds)):
            return
        old = self.bytes_per_s(direction)
        self._bps[direction] = old + self.alpha * (nbytes / seconds - old)

    def bytes_per_s(self, direction: Direction) -> float:
        return self._bps.get(direction, self.prior_bytes_per_s)

    def estimate_s(self, direction: Direction, nbytes: int) -> float:
        """Seconds to move nbytes at the current estimate."""
        return max(nbytes, 0) / self.bytes_per_s(direction)


class Policy:
    """Shared bookkeeping and mechanism; subclasses decide what to page and when.

    One instance per daemon, called only from the event loop thread. Every method returns the
    actions to carry out, in order; the kernel must report each one through on_transfer_done.
    """

    name: ClassVar[str]

    def __init__(self, *, prior_bytes_per_s: float = 2e9, ewma_alpha: float = 0.25) -> None:
        self.estimator = TransferEstimator(prior_bytes_per_s, ewma_alpha)
        self._inflight: dict[str, tuple[Direction, Cause]] = {}
        self._then_in: dict[str, Cause] = {}
        self._armed: dict[str, float] = {}
        self._started: set[str] = set()
        self._timers: list[tuple[float, str]] = []  # heap; an entry whose time is not _armed[sid] is stale
        self._by_cause: dict[str, int] = dict.fromkeys(CAUSES, 0)
        self._outcomes = {"scheduled": 0, "late": 0, "on_time": 0, "cancelled": 0}

    def on_signal(self, now: float, view: SessionView, phase: str, expected_ms: float | None = None) -> list[Action]:
        """The session signalled `phase`; `view` is the session as it was before the signal.

        Raises EINVAL on an unknown phase or a bad expected_ms. A valid phase this policy has no
        rule for yields no action.
        """
        phase = validate_phase(phase)
        expected_ms = validate_expected_ms(expected_ms)
        rule = self._phase_rules().get(phase)
        return rule(now, view, expected_ms) if rule is not None else []

    def on_gpu_syscall(self, now: float, view: SessionView) -> list[Action]:
        """A GPU syscall is about to run on the session. Returns a PageIn if the arena is out; the
        kernel runs the syscall once the arena is resident (also after a PageIn already in flight,
        or one that follows a page-out in flight). Any prefetch still unfinished is counted late."""
        return self._want_in(view, "syscall")

    def on_transfer_done(
        self, now: float, sid: str, direction: Direction, nbytes: int, seconds: float, ok: bool = True
    ) -> list[Action]:
        """A transfer finished (ok) or failed. Report every one, whoever asked for it: all feed the
        estimator; the ones this core asked for also settle its bookkeeping. Returns the page-in
        that was waiting for this page-out, if any."""
        if direction not in ("out", "in"):
            raise ValueError(f"direction must be 'out' or 'in', not {direction!r}")
        if ok:
            self.estimator.observe(direction, nbytes, seconds)
        if self._inflight.get(sid, (None,))[0] != direction:
            return []
        del self._inflight[sid]
        if direction == "in":
            if sid in self._started:
                self._resolve(sid, "on_time" if ok else "cancelled")
            return []
        then = self._then_in.pop(sid, None)
        if not ok:
            self._resolve(sid, "cancelled")
            return []
        return [self._emit_in(sid, then)] if then is not None else []

    def make_room(self, now: float, need_nbytes: int, views: Iterable[SessionView], *,
                  pressure: bool = True) -> Eviction:
        """Choose sessions to page out so that need_nbytes are freed once they are out.

        Only resident, not busy sessions with no transfer in flight and nbytes > 0 are chosen,
        in this policy's order, until enough. If the candidates cannot free need_nbytes, nothing
        is chosen and the answer says how much they could free. `pressure=False` leaves out the
        sessions that would go with cause "pressure" (in use lately: neither waiting nor idle), as a
        request that waits for room asks, so that it does not page out agents between their calls.
        """
        if need_nbytes <= 0:
            return Eviction((), 0, need_nbytes, True)
        eligible = {v.sid: v for v in views if v.resident and not v.busy and v.nbytes > 0}
        chosen: list[tuple[SessionView, Cause]] = []
        freed = 0
        for view, cause in self._candidates(now, [v for v in eligible.values() if v.sid not in self._inflight]):
            if freed >= need_nbytes:
                break
            if cause == "pressure" and not pressure:
                continue
            chosen.append((view, cause))
            freed += view.nbytes
        if freed < need_nbytes:
            return Eviction((), freed, need_nbytes, False)
        victims = tuple(self._emit_out(v.sid, cause) for v, cause in chosen)
        self._after_eviction(now, chosen)
        return Eviction(victims, freed, need_nbytes, True)

    def due(self, now: float, views: Iterable[SessionView]) -> list[Action]:
        """Start every prefetch whose time has come. `views` need only hold the sessions that are
        due (a lazy iterable is read only if one is); a due session missing there is cancelled."""
        actions: list[Action] = []
        by_sid: dict[str, SessionView] | None = None
        while self._timers and self._timers[0][0] <= now:
            at, sid = heapq.heappop(self._timers)
            if self._armed.get(sid) != at:
                continue
            if by_sid is None:
                by_sid = {v.sid: v for v in views}
            view = by_sid.get(sid)
            where = self._where(sid, view.resident) if view is not None else None
            if where not in ("OUT", "GOING_OUT"):
                self._resolve(sid, "cancelled")
                continue
            del self._armed[sid]
            self._started.add(sid)
            if where == "OUT":
                actions.append(self._emit_in(sid, "prefetch"))
            else:
                self._then_in[sid] = "prefetch"
        return actions

    def next_deadline(self) -> float | None:
        """When due() next has work: the earliest armed prefetch time, or None."""
        while self._timers and self._armed.get(self._timers[0][1]) != self._timers[0][0]:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def prefetch_at(self, sid: str) -> float | None:
        """The time the session's armed prefetch starts, or None if none is armed."""
        return self._armed.get(sid)

    def forget(self, sid: str) -> None:
        """The session is closed: drop what is known of it; its prefetch is cancelled."""
        self._resolve(sid, "cancelled")
        self._inflight.pop(sid, None)
        self._then_in.pop(sid, None)

    def statistics(self) -> PolicyStats:
        """A copy of the counters and the current transfer estimates."""
        o = self._outcomes
        return PolicyStats(
            policy=self.name,
            page_outs=sum(self._by_cause[c] for c in ("signal", "idle", "pressure")),
            page_ins=sum(self._by_cause[c] for c in ("syscall", "prefetch")),
            by_cause=dict(self._by_cause),
            prefetch_scheduled=o["scheduled"],
            prefetch_pending=len(self._armed) + len(self._started),
            prefetch_late=o["late"],
            prefetch_on_time=o["on_time"],
            prefetch_cancelled=o["cancelled"],
            out_bytes_per_s=self.estimator.bytes_per_s("out"),
            in_bytes_per_s=self.estimator.bytes_per_s("in"),
        )

    def _phase_rules(self) -> dict[str, Callable[[float, SessionView, float | None], list[Action]]]:
        return {}

    def _candidates(self, now: float, views: list[SessionView]) -> list[tuple[SessionView, Cause]]:
        return []

    def _after_eviction(self, now: float, chosen: list[tuple[SessionView, Cause]]) -> None:
        pass

    def _where(self, sid: str, resident: bool) -> Where:
        flight = self._inflight.get(sid)
        if flight is not None:
            return "GOING_OUT" if flight[0] == "out" else "COMING_IN"
        return "IN" if resident else "OUT"

    def _want_in(self, view: SessionView, cause: Cause) -> list[Action]:
        self._resolve(view.sid, "late")
        where = self._where(view.sid, view.resident)
        if where == "OUT":
            return [self._emit_in(view.sid, cause)]
        if where == "GOING_OUT":
            self._then_in[view.sid] = cause
        return []

    def _emit_out(self, sid: str, cause: Cause) -> PageOut:
        self._inflight[sid] = ("out", cause)
        self._by_cause[cause] += 1
        return PageOut(sid, cause)

    def _emit_in(self, sid: str, cause: Cause) -> PageIn:
        self._inflight[sid] = ("in", cause)
        self._by_cause[cause] += 1
        return PageIn(sid, cause)

    def _arm(self, sid: str, at: float) -> None:
        self._resolve(sid, "cancelled")
        self._armed[sid] = at
        self._outcomes["scheduled"] += 1
        heapq.heappush(self._timers, (at, sid))

    def _resolve(self, sid: str, outcome: str) -> None:
        """Settle the session's unfinished prefetch, if it has one, as `outcome`."""
        if self._armed.pop(sid, None) is None:
            if sid not in self._started:
                return
            self._started.discard(sid)
            if self._then_in.get(sid) == "prefetch":
                del self._then_in[sid]
        self._outcomes[outcome] += 1


class NonePolicy(Policy):
    """Pages nothing out: make_room can never free anything, so admission fails when memory is full."""

    name = "none"

    def __init__(self) -> None:
        super().__init__()


class ReactivePolicy(Policy):
    """Ignores phases; when memory is wanted, pages out sessions idle longer than idle_timeout_s,
    least recently used first."""

    name = "reactive"

    def __init__(
        self, *, idle_timeout_s: float = 2.0, prior_bytes_per_s: float = 2e9, ewma_alpha: float = 0.25
    ) -> None:
        super().__init__(prior_bytes_per_s=prior_bytes_per_s, ewma_alpha=ewma_alpha)
        self.idle_timeout_s = _non_negative("idle_timeout_s", idle_timeout_s)

    def _candidates(self, now: float, views: list[SessionView]) -> list[tuple[SessionView, Cause]]:
        idle = [v for v in views if now - v.last_used_s > self.idle_timeout_s]
        return [(v, "idle") for v in sorted(idle, key=_lru_key)]


class ProactivePolicy(Policy):
    """Pages out on IO_WAIT (mode eager: at once, unless the round trip cannot finish before the
    expected return; lazy: only when make_room wants memory), prefetches so the arena is back by
    the expected return, pages in on COMPUTE.

    A prefetch starts at return_s - (estimate_in * (1 + margin_frac) + margin_s), never before now,
    where return_s is the signal time plus expected_ms. In make_room, sessions past idle_timeout_s
    are paged out with cause idle, other non-IO_WAIT sessions with cause pressure.
    """

    name = "proactive"

    def __init__(
        self,
        *,
        mode: str = "eager",
        idle_timeout_s: float = 2.0,
        margin_s: float = 0.005,
        margin_frac: float = 0.25,
        prior_bytes_per_s: float = 2e9,
        ewma_alpha: float = 0.25,
    ) -> None:
        super().__init__(prior_bytes_per_s=prior_bytes_per_s, ewma_alpha=ewma_alpha)
        if mode not in MODES:
            raise ValueError(f"unknown proactive mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode = mode
        self.idle_timeout_s = _non_negative("idle_timeout_s", idle_timeout_s)
        self.margin_s = _non_negative("margin_s", margin_s)
        self.margin_frac = _non_negative("margin_frac", margin_frac)

    def lead_s(self, nbytes: int) -> float:
        """How long before the expected return a prefetch of nbytes starts."""
        return self.estimator.estimate_s("in", nbytes) * (1 + self.margin_frac) + self.margin_s

    def prefetch_start(self, now: float, return_s: float, nbytes: int) -> float:
        return max(now, return_s - self.lead_s(nbytes))

    def _phase_rules(self) -> dict[str, Callable[[float, SessionView, float | None], list[Action]]]:
        return {"IO_WAIT": self._on_io_wait, "COMPUTE": self._on_compute}

    def _on_io_wait(self, now: float, view: SessionView, expected_ms: float | None) -> list[Action]:
        sid = view.sid
        self._resolve(sid, "cancelled")
        actions: list[Action] = []
        where = self._where(sid, view.resident)
        if where == "IN" and self.mode == "eager" and not view.busy and self._round_trip_fits(view.nbytes, expected_ms):
            actions.append(self._emit_out(sid, "signal"))
            where = "GOING_OUT"
        heading_out = where == "OUT" or (where == "GOING_OUT" and sid not in self._then_in)
        if heading_out and expected_ms is not None:
            self._arm(sid, self.prefetch_start(now, now + expected_ms / 1000, view.nbytes))
        return actions

    def _on_compute(self, now: float, view: SessionView, expected_ms: float | None) -> list[Action]:
        return self._want_in(view, "syscall")

    def _round_trip_fits(self, nbytes: int, expected_ms: float | None) -> bool:
        if expected_ms is None:
            return True
        return self.estimator.estimate_s("out", nbytes) + self.lead_s(nbytes) <= expected_ms / 1000

    def _candidates(self, now: float, views: list[SessionView]) -> list[tuple[SessionView, Cause]]:
        waiting = sorted((v for v in views if v.phase == "IO_WAIT"), key=lambda v: (-_return_s(v), *_lru_key(v)))
        others = sorted((v for v in views if v.phase != "IO_WAIT"), key=_lru_key)
        return [(v, "signal") for v in waiting] + [
            (v, "idle" if now - v.last_used_s > self.idle_timeout_s else "pressure") for v in others
        ]

    def _after_eviction(self, now: float, chosen: list[tuple[SessionView, Cause]]) -> None:
        for view, cause in chosen:
            if cause == "signal" and view.expected_ms is not None:
                self._arm(view.sid, self.prefetch_start(now, _return_s(view), view.nbytes))


_POLICY_CLASSES: dict[str, type[Policy]] = {
    "proactive": ProactivePolicy,
    "reactive": ReactivePolicy,
    "none": NonePolicy,
}


def make_policy(name: str, **settings: object) -> Policy:
    """The policy called `name` (one of POLICIES) with its settings.

    Raises ValueError on an unknown name, a setting that policy does not take, or a bad value.
    """
    cls = _POLICY_CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    known = set(inspect.signature(cls).parameters)
    unknown = sorted(set(settings) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "no settings"
        raise ValueError(f"policy {name!r} takes no setting {', '.join(unknown)}; it takes {takes}")
    return cls(**settings)  # type: ignore[arg-type]


def _lru_key(view: SessionView) -> tuple[float, str]:
    return (view.last_used_s, view.sid)


def _return_s(view: SessionView) -> float:
    """When an IO_WAIT session is expected back; one that gave no expected_ms, never."""
    if view.expected_ms is None:
        return math.inf
    return view.phase_since_s + view.expected_ms / 1000


def _non_negative(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
