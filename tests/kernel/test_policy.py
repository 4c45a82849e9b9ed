"""The memory policy cores (kernel/policy.py): each rule directly, then random sequences.

The stateful machine plays the kernel: it keeps each session's true residency, carries out every
action the policy returns, completes transfers in any order, and checks the invariants after
every step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from djinn.kernel.errors import EINVAL
from djinn.kernel.policy import (
    CAUSES,
    MODES,
    POLICIES,
    Eviction,
    NonePolicy,
    PageIn,
    PageOut,
    ProactivePolicy,
    ReactivePolicy,
    SessionView,
    TransferEstimator,
    make_policy,
    validate_expected_ms,
    validate_phase,
)

GB = 10**9


def view(
    sid: str,
    nbytes: int = GB,
    *,
    resident: bool = True,
    busy: bool = False,
    phase: str = "COMPUTE",
    since: float = 0.0,
    expected_ms: float | None = None,
    last_used: float = 0.0,
) -> SessionView:
    return SessionView(sid, nbytes, resident, busy, phase, since, expected_ms, last_used)


def swapped(sid: str, **kw: object) -> SessionView:
    return view(sid, resident=False, **kw)  # type: ignore[arg-type]


def eager(**kw: object) -> ProactivePolicy:
    return ProactivePolicy(mode="eager", **kw)  # type: ignore[arg-type]


# --- validation and the factory ---


def test_validate_phase_accepts_abi_phases_and_rejects_others() -> None:
    assert validate_phase("IO_WAIT") == "IO_WAIT"
    assert validate_phase("COMPUTE") == "COMPUTE"
    for bad in ("SLEEP", "io_wait", "", None, 3):
        with pytest.raises(EINVAL) as info:
            validate_phase(bad)
        assert "IO_WAIT" in info.value.message


def test_validate_expected_ms() -> None:
    assert validate_expected_ms(None) is None
    assert validate_expected_ms(0) == 0.0
    assert validate_expected_ms(1500) == 1500.0
    for bad in (-1, float("nan"), float("inf"), True, "10"):
        with pytest.raises(EINVAL):
            validate_expected_ms(bad)


@pytest.mark.parametrize("name", POLICIES)
def test_on_signal_validates_under_every_policy(name: str) -> None:
    policy = make_policy(name)
    with pytest.raises(EINVAL):
        policy.on_signal(0.0, view("a"), "NAP")
    with pytest.raises(EINVAL):
        policy.on_signal(0.0, view("a"), "IO_WAIT", -5)


def test_make_policy_names_settings_and_errors() -> None:
    assert isinstance(make_policy("none"), NonePolicy)
    reactive = make_policy("reactive", idle_timeout_s=7)
    assert isinstance(reactive, ReactivePolicy) and reactive.idle_timeout_s == 7.0
    lazy = make_policy("proactive", mode="lazy", margin_s=0.01)
    assert isinstance(lazy, ProactivePolicy) and lazy.mode == "lazy" and lazy.margin_s == 0.01
    with pytest.raises(ValueError, match="unknown policy 'lru'.*proactive, reactive, none"):
        make_policy("lru")
    with pytest.raises(ValueError, match="takes no setting mode"):
        make_policy("reactive", mode="eager")
    with pytest.raises(ValueError, match="mode"):
        make_policy("proactive", mode="sometimes")
    with pytest.raises(ValueError, match="idle_timeout_s"):
        make_policy("reactive", idle_timeout_s=-1)
    with pytest.raises(ValueError, match="alpha"):
        make_policy("proactive", ewma_alpha=0)


def test_estimator_learns_by_ewma_from_its_prior() -> None:
    est = TransferEstimator(prior_bytes_per_s=2e9, alpha=0.25)
    assert est.estimate_s("in", GB) == pytest.approx(0.5)
    est.observe("in", GB, 0.1)
    assert est.bytes_per_s("in") == pytest.approx(4e9)
    assert est.bytes_per_s("out") == pytest.approx(2e9)
    for nbytes, seconds in ((0, 1.0), (GB, 0.0), (GB, float("inf")), (GB, float("nan"))):
        est.observe("in", nbytes, seconds)
    assert est.bytes_per_s("in") == pytest.approx(4e9)


# --- proactive: IO_WAIT, prefetch, COMPUTE ---


def test_eager_io_wait_pages_out_at_once_and_arms_the_prefetch() -> None:
    policy = eager(prior_bytes_per_s=2e9, margin_s=0.005, margin_frac=0.25)
    assert policy.on_signal(100.0, view("a"), "IO_WAIT", 2000) == [PageOut("a", "signal")]
    lead = 0.5 * 1.25 + 0.005
    assert policy.prefetch_at("a") == pytest.approx(102.0 - lead)
    assert policy.next_deadline() == pytest.approx(102.0 - lead)
    assert policy.statistics().prefetch_pending == 1


def test_lazy_io_wait_waits_for_pressure_then_pages_out_and_prefetches() -> None:
    policy = ProactivePolicy(mode="lazy")
    assert policy.on_signal(100.0, view("a"), "IO_WAIT", 2000) == []
    assert policy.next_deadline() is None
    waiting = view("a", phase="IO_WAIT", since=100.0, expected_ms=2000)
    ev = policy.make_room(100.5, GB, [waiting])
    assert ev == Eviction((PageOut("a", "signal"),), GB, GB, True)
    assert policy.prefetch_at("a") == pytest.approx(102.0 - policy.lead_s(GB))


def test_prefetch_timing_follows_the_learned_estimate() -> None:
    policy = eager(prior_bytes_per_s=2e9, margin_s=0.005, margin_frac=0.25)
    policy.on_transfer_done(0.0, "x", "in", GB, 0.1)
    policy.on_signal(10.0, view("a"), "IO_WAIT", 1000)
    assert policy.prefetch_at("a") == pytest.approx(11.0 - (0.25 * 1.25 + 0.005))


def test_prefetch_fires_when_due_and_is_on_time_when_back_first() -> None:
    policy = eager()
    policy.on_signal(0.0, view("a"), "IO_WAIT", 5000)
    assert policy.on_transfer_done(0.1, "a", "out", GB, 0.1) == []
    at = policy.prefetch_at("a")
    assert at is not None
    assert policy.due(at - 0.001, [swapped("a")]) == []
    assert policy.due(at, [swapped("a")]) == [PageIn("a", "prefetch")]
    assert policy.next_deadline() is None
    assert policy.statistics().prefetch_pending == 1
    policy.on_transfer_done(at + 0.1, "a", "in", GB, 0.1)
    assert policy.on_signal(5.0, view("a"), "COMPUTE") == []
    stats = policy.statistics()
    assert (stats.prefetch_pending, stats.prefetch_on_time, stats.prefetch_late) == (0, 1, 0)
    assert stats.by_cause == {"signal": 1, "idle": 0, "pressure": 0, "syscall": 0, "prefetch": 1}


def test_compute_before_the_prefetch_pages_in_at_once_and_counts_late() -> None:
    policy = eager()
    policy.on_signal(0.0, view("a"), "IO_WAIT", 5000)
    policy.on_transfer_done(0.1, "a", "out", GB, 0.1)
    assert policy.on_signal(1.0, swapped("a"), "COMPUTE") == [PageIn("a", "syscall")]
    assert policy.prefetch_at("a") is None and policy.next_deadline() is None
    assert policy.due(10.0, [swapped("a")]) == []
    stats = policy.statistics()
    assert (stats.prefetch_pending, stats.prefetch_late, stats.prefetch_on_time) == (0, 1, 0)


def test_gpu_syscall_during_the_prefetch_page_in_is_late_and_adds_no_transfer() -> None:
    policy = eager()
    policy.on_signal(0.0, view("a"), "IO_WAIT", 5000)
    policy.on_transfer_done(0.1, "a", "out", GB, 0.1)
    assert policy.due(10.0, [swapped("a")]) == [PageIn("a", "prefetch")]
    assert policy.on_gpu_syscall(10.01, swapped("a")) == []
    policy.on_transfer_done(10.2, "a", "in", GB, 0.2)
    stats = policy.statistics()
    assert (stats.prefetch_late, stats.prefetch_on_time, stats.prefetch_pending) == (1, 0, 0)


def test_page_in_wanted_during_a_page_out_follows_it() -> None:
    policy = eager()
    policy.on_signal(0.0, view("a"), "IO_WAIT", 5000)
    assert policy.on_signal(0.01, view("a"), "COMPUTE") == []
    assert policy.on_transfer_done(0.1, "a", "out", GB, 0.1) == [PageIn("a", "syscall")]
    assert policy.statistics().prefetch_late == 1


def test_prefetch_due_during_a_page_out_follows_it() -> None:
    policy = eager()
    policy.on_signal(0.0, view("a", 10 * GB), "IO_WAIT", 60_000)
    at = policy.prefetch_at("a")
    assert at is not None
    assert policy.due(at, [view("a", 10 * GB)]) == []
    assert policy.on_transfer_done(at + 1, "a", "out", 10 * GB, at + 1) == [PageIn("a", "prefetch")]


def test_eager_keeps_a_session_whose_round_trip_cannot_beat_its_return() -> None:
    policy = eager(prior_bytes_per_s=1e9)
    assert policy.on_signal(0.0, view("a", GB), "IO_WAIT", 500) == []
    assert policy.on_signal(0.0, view("b", GB), "IO_WAIT", 5000) == [PageOut("b", "signal")]
    assert policy.on_signal(0.0, view("c", GB), "IO_WAIT") == [PageOut("c", "signal")]
    assert policy.prefetch_at("c") is None


def test_eager_never_pages_out_busy_or_swapped_sessions() -> None:
    policy = eager()
    assert policy.on_signal(0.0, view("a", busy=True), "IO_WAIT", 5000) == []
    assert policy.on_signal(0.0, swapped("b"), "IO_WAIT", 5000) == []
    assert policy.prefetch_at("a") is None
    assert policy.prefetch_at("b") is not None


def test_io_wait_again_cancels_the_old_prefetch() -> None:
    policy = eager()
    policy.on_signal(0.0, view("a"), "IO_WAIT", 5000)
    policy.on_transfer_done(0.1, "a", "out", GB, 0.1)
    first = policy.prefetch_at("a")
    assert policy.on_signal(1.0, swapped("a"), "IO_WAIT", 9000) == []
    assert policy.prefetch_at("a") != first
    stats = policy.statistics()
    assert (stats.prefetch_scheduled, stats.prefetch_cancelled, stats.prefetch_pending) == (2, 1, 1)


def test_io_wait_again_during_a_page_out_drops_the_started_prefetch() -> None:
    policy = eager()
    policy.on_signal(0.0, view("a", 10 * GB), "IO_WAIT", 60_000)
    at = policy.prefetch_at("a")
    assert at is not None and policy.due(at, [view("a", 10 * GB)]) == []
    assert policy.on_signal(at, view("a", 10 * GB), "IO_WAIT") == []
    assert policy.on_transfer_done(at + 1, "a", "out", 10 * GB, at + 1) == []
    stats = policy.statistics()
    assert (stats.prefetch_cancelled, stats.prefetch_pending, stats.by_cause["prefetch"]) == (1, 0, 0)


def test_transfers_the_core_did_not_ask_for_only_feed_the_estimator() -> None:
    policy = eager(prior_bytes_per_s=2e9, ewma_alpha=0.5)
    policy.on_signal(0.0, view("a"), "IO_WAIT", 5000)
    assert policy.on_signal(0.0, view("a"), "COMPUTE") == []
    assert policy.on_transfer_done(0.1, "a", "in", GB, 0.1) == []
    assert policy.statistics().in_bytes_per_s == pytest.approx(6e9)
    assert policy.on_transfer_done(0.2, "a", "out", GB, 0.1) == [PageIn("a", "syscall")]


def test_a_failed_page_out_or_forget_cancels_the_prefetch() -> None:
    policy = eager()
    policy.on_signal(0.0, view("a"), "IO_WAIT", 5000)
    policy.on_signal(0.0, view("b"), "IO_WAIT", 5000)
    assert policy.on_transfer_done(0.1, "a", "out", GB, 0.1, ok=False) == []
    policy.forget("b")
    assert policy.next_deadline() is None
    assert policy.statistics().prefetch_cancelled == 2
    assert policy.on_gpu_syscall(0.2, view("a")) == []


def test_a_due_prefetch_for_a_resident_or_vanished_session_is_cancelled() -> None:
    policy = eager()
    policy.on_signal(0.0, swapped("a"), "IO_WAIT", 1000)
    policy.on_signal(0.0, swapped("b"), "IO_WAIT", 1000)
    assert policy.due(5.0, [view("a")]) == []
    assert policy.statistics().prefetch_cancelled == 2


def test_gpu_syscall_pages_in_only_swapped_sessions() -> None:
    for policy in (eager(), ReactivePolicy(), NonePolicy()):
        assert policy.on_gpu_syscall(0.0, view("a")) == []
        assert policy.on_gpu_syscall(0.0, swapped("b")) == [PageIn("b", "syscall")]
        assert policy.on_gpu_syscall(0.0, swapped("b")) == []


# --- make_room ---


def test_proactive_make_room_prefers_io_wait_furthest_return_then_lru() -> None:
    policy = eager(idle_timeout_s=5.0)
    views = [
        view("soon", phase="IO_WAIT", since=0.0, expected_ms=1000, last_used=0.0),
        view("far", phase="IO_WAIT", since=0.0, expected_ms=9000, last_used=9.0),
        view("unknown", phase="IO_WAIT", since=9.0, last_used=9.0),
        view("old", last_used=1.0),
        view("recent", last_used=9.5),
    ]
    ev = policy.make_room(10.0, 5 * GB, views)
    assert ev.ok and ev.freed_nbytes == 5 * GB
    assert ev.victims == (
        PageOut("unknown", "signal"),
        PageOut("far", "signal"),
        PageOut("soon", "signal"),
        PageOut("old", "idle"),
        PageOut("recent", "pressure"),
    )


def test_make_room_without_pressure_leaves_sessions_in_use_alone() -> None:
    views = [view("waiting", phase="IO_WAIT", since=9.0, expected_ms=5000, last_used=9.0),
             view("old", last_used=1.0), view("recent", last_used=9.5)]
    ev = eager(idle_timeout_s=5.0).make_room(10.0, 2 * GB, views, pressure=False)
    assert ev.ok and ev.victims == (PageOut("waiting", "signal"), PageOut("old", "idle"))
    short = eager(idle_timeout_s=5.0).make_room(10.0, 3 * GB, views, pressure=False)
    assert not short.ok and short.victims == () and short.freed_nbytes == 2 * GB
    assert eager(idle_timeout_s=5.0).make_room(10.0, 3 * GB, views).ok  # with pressure, "recent" goes too


def test_make_room_stops_once_enough_is_freed() -> None:
    policy = ReactivePolicy(idle_timeout_s=1.0)
    views = [view("a", GB, last_used=1.0), view("b", GB, last_used=0.0), view("c", GB, last_used=2.0)]
    ev = policy.make_room(10.0, GB + 1, views)
    assert ev.victims == (PageOut("b", "idle"), PageOut("a", "idle")) and ev.freed_nbytes == 2 * GB
    assert policy.make_room(10.0, 0, views) == Eviction((), 0, 0, True)


@pytest.mark.parametrize("policy", [eager(), ProactivePolicy(mode="lazy"), ReactivePolicy(idle_timeout_s=0.0)])
def test_make_room_never_picks_busy_swapped_empty_or_moving_sessions(policy: ProactivePolicy) -> None:
    assert policy.on_gpu_syscall(0.0, swapped("moving")) == [PageIn("moving", "syscall")]
    views = [
        view("busy", busy=True, phase="IO_WAIT"),
        swapped("out", phase="IO_WAIT"),
        view("empty", 0),
        view("moving"),
        view("ok", 2 * GB, last_used=1.0),
    ]
    ev = policy.make_room(10.0, GB, views)
    assert [v.sid for v in ev.victims] == ["ok"]
    assert policy.make_room(10.0, GB, views + [view("ok2")]) == Eviction((PageOut("ok2", ev.victims[0].cause),), GB, GB, True)


def test_cannot_make_room_reports_what_it_could_free_and_decides_nothing() -> None:
    policy = eager()
    views = [view("a", GB), view("b", 2 * GB), view("c", 4 * GB, busy=True)]
    ev = policy.make_room(10.0, 4 * GB, views)
    assert ev == Eviction((), 3 * GB, 4 * GB, False)
    assert policy.statistics().page_outs == 0
    assert policy.make_room(10.0, 3 * GB, views).ok


def test_reactive_pages_out_only_sessions_idle_past_the_timeout_lru_first() -> None:
    policy = ReactivePolicy(idle_timeout_s=5.0)
    views = [view("a", last_used=3.0), view("b", last_used=1.0), view("fresh", last_used=8.0)]
    assert policy.make_room(10.0, 2 * GB, views).victims == (PageOut("b", "idle"), PageOut("a", "idle"))
    policy = ReactivePolicy(idle_timeout_s=5.0)
    assert policy.make_room(10.0, 3 * GB, views) == Eviction((), 2 * GB, 3 * GB, False)
    assert policy.make_room(5.0, GB, [view("edge", last_used=0.0)]).ok is False


def test_reactive_ignores_phase_signals() -> None:
    policy = ReactivePolicy()
    assert policy.on_signal(0.0, view("a"), "IO_WAIT", 5000) == []
    assert policy.on_signal(0.0, swapped("a"), "COMPUTE") == []
    assert policy.next_deadline() is None


def test_none_never_pages() -> None:
    policy = NonePolicy()
    views = [view("a", phase="IO_WAIT", expected_ms=100, last_used=-100.0), view("b", last_used=-100.0)]
    assert policy.on_signal(0.0, views[0], "IO_WAIT", 100) == []
    assert policy.on_signal(0.0, views[1], "COMPUTE") == []
    assert policy.make_room(1000.0, 1, views) == Eviction((), 0, 1, False)
    assert policy.due(1000.0, views) == [] and policy.next_deadline() is None
    assert sum(policy.statistics().by_cause.values()) == 0


def test_statistics_match_the_stat_snapshot_shape() -> None:
    stat = eager().statistics().as_stat()
    assert set(stat["by_cause"]) == set(CAUSES)  # type: ignore[arg-type]
    assert {"pending", "late", "on_time"} <= set(stat["prefetch"])  # type: ignore[arg-type]


# --- random sequences ---

SIDS = ("a", "b", "c", "d")


@dataclass
class Sess:
    nbytes: int
    resident: bool = True
    busy: bool = False
    phase: str = "COMPUTE"
    since: float = 0.0
    expected_ms: float | None = None
    last_used: float = 0.0


class PolicyMachine(RuleBasedStateMachine):
    """A fake kernel around one policy, with a model of the prefetch state machine.

    `moving` holds the transfers being carried out; they finish, ok or failed, when `complete`
    says so. `prefetch` is the model's ARMED / STARTED per session, `outcomes` its counters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.sessions: dict[str, Sess] = {}
        self.moving: dict[str, tuple[str, str]] = {}
        self.want_in: set[str] = set()
        self.prefetch: dict[str, str] = {}
        self.outcomes: Counter[str] = Counter()
        self.emitted: Counter[str] = Counter()
        self.expect: dict[str, float] = {}

    @initialize(
        name=st.sampled_from(POLICIES),
        mode=st.sampled_from(MODES),
        sizes=st.lists(st.sampled_from([0, 1, 100, 1000, GB]), min_size=len(SIDS), max_size=len(SIDS)),
    )
    def boot(self, name: str, mode: str, sizes: list[int]) -> None:
        self.name, self.mode = name, mode
        self.proactive = name == "proactive"
        options = {"mode": mode, "idle_timeout_s": 1.0} if self.proactive else {}
        self.policy = make_policy(name, **options)
        self.sessions = {sid: Sess(n) for sid, n in zip(SIDS, sizes)}

    def view(self, sid: str) -> SessionView:
        s = self.sessions[sid]
        return SessionView(sid, s.nbytes, s.resident, s.busy, s.phase, s.since, s.expected_ms, s.last_used)

    def views(self) -> list[SessionView]:
        return [self.view(sid) for sid in self.sessions]

    def where(self, sid: str) -> str:
        if sid in self.moving:
            return "GOING_OUT" if self.moving[sid][0] == "out" else "COMING_IN"
        return "IN" if self.sessions[sid].resident else "OUT"

    def settle(self, sid: str, outcome: str) -> None:
        if self.prefetch.pop(sid, None) is not None:
            self.outcomes[outcome] += 1

    def note_armed(self, sid: str) -> None:
        if self.policy.prefetch_at(sid) is not None:
            self.prefetch[sid] = "armed"
            self.outcomes["scheduled"] += 1

    def apply(self, actions: list) -> None:
        for action in actions:
            assert self.name != "none", f"policy none emitted {action}"
            s = self.sessions[action.sid]
            assert action.sid not in self.moving, f"{action} while {self.moving[action.sid]} in flight"
            if isinstance(action, PageOut):
                assert s.resident and not s.busy, f"{action} on resident={s.resident} busy={s.busy}"
                assert action.cause in ("signal", "idle", "pressure")
                self.moving[action.sid] = ("out", action.cause)
            else:
                assert isinstance(action, PageIn) and not s.resident, f"{action} on a resident session"
                assert action.cause in ("syscall", "prefetch")
                self.moving[action.sid] = ("in", action.cause)
            if self.name == "reactive":
                assert action.cause in ("idle", "syscall")
            self.emitted[action.cause] += 1

    def want(self, sid: str, actions: list) -> None:
        """COMPUTE or a GPU syscall: page in now if out, after the page-out if going out."""
        self.settle(sid, "late")
        self.expect.pop(sid, None)
        where = self.where(sid)
        assert actions == ([PageIn(sid, "syscall")] if where == "OUT" else [])
        if where == "GOING_OUT":
            self.want_in.add(sid)
        assert self.policy.prefetch_at(sid) is None
        self.apply(actions)

    @rule(dt=st.floats(0, 3))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(
        sid=st.sampled_from(SIDS),
        phase=st.sampled_from(("IO_WAIT", "COMPUTE")),
        expected_ms=st.none() | st.floats(0, 5000),
    )
    def signal(self, sid: str, phase: str, expected_ms: float | None) -> None:
        actions = self.policy.on_signal(self.now, self.view(sid), phase, expected_ms)
        if not self.proactive:
            assert actions == []
        elif phase == "COMPUTE":
            self.want(sid, actions)
        else:
            self.settle(sid, "cancelled")
            self.expect.pop(sid, None)
            if self.mode == "eager" and expected_ms is not None and PageOut(sid, "signal") in actions:
                self.expect[sid] = self.now + expected_ms / 1000
            self.apply(actions)
            self.note_armed(sid)
        s = self.sessions[sid]
        s.phase, s.since, s.expected_ms = phase, self.now, expected_ms if phase == "IO_WAIT" else None

    @rule(sid=st.sampled_from(SIDS))
    def gpu_syscall(self, sid: str) -> None:
        self.want(sid, self.policy.on_gpu_syscall(self.now, self.view(sid)))
        self.sessions[sid].last_used = self.now

    @rule(sid=st.sampled_from(SIDS), busy=st.booleans())
    def set_busy(self, sid: str, busy: bool) -> None:
        self.sessions[sid].busy = busy

    @precondition(lambda self: self.moving)
    @rule(pick=st.integers(0, 10), ok=st.booleans(), seconds=st.floats(1e-4, 1.0))
    def complete(self, pick: int, ok: bool, seconds: float) -> None:
        sid = sorted(self.moving)[pick % len(self.moving)]
        direction, _ = self.moving.pop(sid)
        s = self.sessions[sid]
        started = self.prefetch.get(sid) == "started"
        if ok:
            s.resident = direction == "in"
        actions = self.policy.on_transfer_done(self.now, sid, direction, s.nbytes, seconds, ok)
        if direction == "out":
            wanted = sid in self.want_in
            self.want_in.discard(sid)
            if not ok:
                self.settle(sid, "cancelled")
                self.expect.pop(sid, None)
            expected = [PageIn(sid, "syscall")] if wanted else [PageIn(sid, "prefetch")] if started else []
            assert actions == (expected if ok else [])
        else:
            assert actions == []
            if started:
                self.settle(sid, "on_time" if ok else "cancelled")
        self.apply(actions)

    @rule(need=st.integers(0, 3 * GB))
    def pressure(self, need: int) -> None:
        candidates = [v for v in self.views() if v.resident and not v.busy and v.nbytes and v.sid not in self.moving]
        if self.name == "reactive":
            candidates = [v for v in candidates if self.now - v.last_used_s > self.policy.idle_timeout_s]
        freeable = 0 if self.name == "none" else sum(v.nbytes for v in candidates)
        ev = self.policy.make_room(self.now, need, self.views())
        if ev.ok:
            assert ev.freed_nbytes >= need
            assert ev.freed_nbytes == sum(self.sessions[a.sid].nbytes for a in ev.victims)
            assert len({a.sid for a in ev.victims}) == len(ev.victims)
        else:
            assert ev.victims == () and ev.freed_nbytes == freeable < need
        self.apply(list(ev.victims))
        for victim in ev.victims:
            self.note_armed(victim.sid)

    @rule()
    def tick(self) -> None:
        due = {sid for sid, state in self.prefetch.items() if state == "armed" and self.policy.prefetch_at(sid) <= self.now}
        actions = self.policy.due(self.now, self.views())
        expected = []
        for sid in sorted(due):
            where = self.where(sid)
            if where in ("OUT", "GOING_OUT"):
                self.prefetch[sid] = "started"
                self.expect.pop(sid, None)
                if where == "OUT":
                    expected.append(PageIn(sid, "prefetch"))
            else:
                self.settle(sid, "cancelled")
        assert sorted(actions, key=lambda a: a.sid) == expected
        self.apply(actions)
        deadline = self.policy.next_deadline()
        assert deadline is None or deadline > self.now

    @rule(sid=st.sampled_from(SIDS))
    def close(self, sid: str) -> None:
        assume(sid not in self.moving)
        self.policy.forget(sid)
        self.settle(sid, "cancelled")
        self.expect.pop(sid, None)
        self.sessions[sid] = Sess(self.sessions[sid].nbytes, last_used=self.now)

    @invariant()
    def counters_match_the_actions_and_the_model(self) -> None:
        stats = self.policy.statistics()
        assert stats.by_cause == {cause: self.emitted[cause] for cause in CAUSES}
        assert stats.page_outs + stats.page_ins == sum(self.emitted.values())
        assert stats.prefetch_scheduled == (
            stats.prefetch_pending + stats.prefetch_late + stats.prefetch_on_time + stats.prefetch_cancelled
        )
        model = (self.outcomes["scheduled"], len(self.prefetch), self.outcomes["late"], self.outcomes["on_time"])
        assert (stats.prefetch_scheduled, stats.prefetch_pending, stats.prefetch_late, stats.prefetch_on_time) == model
        if not self.proactive:
            assert stats.prefetch_scheduled == 0

    @invariant()
    def armed_prefetches_are_for_sessions_out_or_going_out(self) -> None:
        for sid in SIDS:
            armed = self.policy.prefetch_at(sid) is not None
            assert armed == (self.prefetch.get(sid) == "armed")
            if armed:
                assert self.where(sid) in ("OUT", "GOING_OUT") and sid not in self.want_in

    @invariant()
    def eager_io_wait_has_a_prefetch_by_its_return(self) -> None:
        for sid, return_s in self.expect.items():
            at = self.policy.prefetch_at(sid)
            assert at is not None and at <= return_s + 1e-9, (sid, at, return_s)

    @invariant()
    def next_deadline_is_the_earliest_armed_prefetch(self) -> None:
        armed = [at for sid in SIDS if (at := self.policy.prefetch_at(sid)) is not None]
        assert self.policy.next_deadline() == (min(armed) if armed else None)


TestPolicyMachine = PolicyMachine.TestCase
TestPolicyMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
