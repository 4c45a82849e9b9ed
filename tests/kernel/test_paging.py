"""Signals and policies through the daemon: continuation after IO_WAIT is exact, pressure makes room, nothing is lost."""

from __future__ import annotations

import time

import pytest
import torch

import djinn
from tests.daemon import LiveDaemon, daemon_config, greedy, session_row

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64]
MAX_TOKENS = 64


def _arena_nbytes(k) -> int:
    with k.open_session(max_tokens=MAX_TOKENS) as s:
        return s.info["arena_nbytes"]


@pytest.fixture
def daemon_with(request):
    started: list[LiveDaemon] = []

    def start(**overrides) -> LiveDaemon:
        d = LiveDaemon(daemon_config(**overrides)).start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.mark.parametrize("policy,mode", [("proactive", "eager"), ("proactive", "lazy"), ("reactive", "eager"),
                                         ("none", "eager")])
def test_continuation_after_io_wait_is_identical(daemon_with, policy, mode):
    d = daemon_with(policy=policy, proactive_mode=mode, idle_timeout_s=0.0)
    with djinn.connect(d.path) as k:
        with k.open_session(max_tokens=MAX_TOKENS) as ref:
            want = greedy(ref, ref.forward(PROMPT).logits, 8)
        with k.open_session(max_tokens=MAX_TOKENS) as s:
            logits = s.forward(PROMPT).logits
            reply = s.signal_phase("IO_WAIT", expected_ms=80)
            assert reply["phase"] == "IO_WAIT"
            time.sleep(0.03)
            row = session_row(k, s)
            if (policy, mode) == ("proactive", "eager"):
                assert row["residency"] == "host" and row["state"] == "SWAPPED"
            else:
                assert row["residency"] == "device" and row["state"] == "IO_WAIT"
            time.sleep(0.1)
            if (policy, mode) == ("proactive", "eager"):
                assert session_row(k, s)["residency"] == "device", "the prefetch brought it back before the return"
            s.signal_phase("COMPUTE")
            assert greedy(s, logits, 8) == want
        st = k.stat()
        if (policy, mode) == ("proactive", "eager"):
            assert st["memory"]["swap"]["by_cause"]["signal"] == 1
            assert st["memory"]["prefetch"]["on_time"] == 1
        if policy == "none":
            assert st["memory"]["swap"]["out"]["ops"] == 0


def test_unknown_phase_is_einval(kernel):
    with kernel.open_session(bare=True) as s:
        with pytest.raises(djinn.errors.EINVAL, match="phase"):
            s.signal_phase("NAPPING")
        with pytest.raises(djinn.errors.EINVAL):
            s.signal_phase("IO_WAIT", expected_ms=-5)
        assert s.signal_phase("COMPUTE")["phase"] == "COMPUTE"


def _pressure_daemon(daemon_with, **overrides) -> tuple[LiveDaemon, int]:
    probe = daemon_with(**overrides)
    with djinn.connect(probe.path) as k:
        arena = _arena_nbytes(k)
    probe.stop()
    return daemon_with(vmu_data=2 * arena + arena // 2, **overrides), arena


@pytest.mark.parametrize("policy,mode", [("proactive", "lazy"), ("reactive", "eager")])
def test_pressure_pages_out_a_waiting_or_idle_session(daemon_with, policy, mode):
    d, _ = _pressure_daemon(daemon_with, policy=policy, proactive_mode=mode, idle_timeout_s=0.05)
    with djinn.connect(d.path) as k:
        a = k.open_session(max_tokens=MAX_TOKENS)
        b = k.open_session(max_tokens=MAX_TOKENS)
        la = a.forward(PROMPT).logits
        want = greedy(b, b.forward(PROMPT).logits, 4)
        if policy == "proactive":
            a.signal_phase("IO_WAIT", expected_ms=10_000)
        time.sleep(0.1)
        c = k.open_session(max_tokens=MAX_TOKENS)  # needs room: a is paged out for it
        assert session_row(k, a)["residency"] == "host"
        cause = "signal" if policy == "proactive" else "idle"
        assert k.stat()["memory"]["swap"]["by_cause"][cause] >= 1
        c.close()
        assert greedy(a, la, 4) == want  # paged back in on use, state intact


def test_policy_none_answers_enomem_and_keeps_everyone(daemon_with):
    d, _ = _pressure_daemon(daemon_with, policy="none")
    with djinn.connect(d.path) as k:
        a = k.open_session(max_tokens=MAX_TOKENS)
        b = k.open_session(max_tokens=MAX_TOKENS)
        a.forward(PROMPT)
        b.signal_phase("IO_WAIT", expected_ms=10_000)
        with pytest.raises(djinn.errors.ENOMEM) as e:
            k.open_session(max_tokens=MAX_TOKENS)
        assert e.value.retryable and "requested_nbytes" in e.value.details
        assert a.forward([1]).position == len(PROMPT) + 1
        assert len(k.stat()["sessions"]) == 2


def test_full_host_pool_refuses_and_drops_nothing(daemon_with):
    d = daemon_with(vmu_host=4096)
    with djinn.connect(d.path) as k, k.open_session(max_tokens=MAX_TOKENS) as s:
        logits = s.forward(PROMPT).logits
        with pytest.raises(djinn.errors.ENOMEM):
            s.page_out()
        assert session_row(k, s)["residency"] == "device"
        with pytest.raises(djinn.errors.ENOMEM):
            s.checkpoint()
        nxt = s.forward([int(torch.argmax(logits))])
        assert nxt.position == len(PROMPT) + 1


def test_stat_shows_phase_and_time_in_phase(kernel):
    with kernel.open_session(bare=True) as s:
        s.signal_phase("IO_WAIT", expected_ms=5000)
        time.sleep(0.05)
        row = session_row(kernel, s)
        assert row["phase"] == "IO_WAIT" and row["phase_s"] >= 0.04 and row["expected_ms"] == 5000
        assert "pending" in kernel.stat()["memory"]["prefetch"]
