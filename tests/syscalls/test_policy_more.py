"""The proactive policy's lazy mode through the daemon: memory pressure pages an IO_WAIT session out, the
prefetch brings it back before its expected return, and its continuation is exact."""

from __future__ import annotations

import time

import pytest

import djinn
from tests.daemon import LiveDaemon, daemon_config, greedy, session_row

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64]
MAX_TOKENS = 64
EXPECTED_MS = 400  # short, yet long enough for the pressure, the page-out and closing the intruder to come first


@pytest.fixture
def pressure_daemon():
    """A daemon whose Data segment holds two session arenas and a half, so that a third wants room."""
    started: list[LiveDaemon] = []

    def start(**overrides) -> LiveDaemon:
        probe = LiveDaemon(daemon_config(**overrides)).start()
        started.append(probe)
        with djinn.connect(probe.path) as k, k.open_session(max_tokens=MAX_TOKENS) as s:
            arena = s.info["arena_nbytes"]
        probe.stop()
        d = LiveDaemon(daemon_config(vmu_data=2 * arena + arena // 2, **overrides)).start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def test_lazy_io_wait_pages_out_under_pressure_and_prefetches_on_time(pressure_daemon):
    d = pressure_daemon(policy="proactive", proactive_mode="lazy")
    with djinn.connect(d.path) as k:
        a = k.open_session(max_tokens=MAX_TOKENS)
        ref = k.open_session(max_tokens=MAX_TOKENS)
        logits = a.forward(PROMPT).logits
        want = greedy(ref, ref.forward(PROMPT).logits, 8)  # the same model, never paged

        reply = a.signal_phase("IO_WAIT", expected_ms=EXPECTED_MS)
        signalled_s = time.monotonic()
        assert reply["actions"] == [] and reply["prefetch_in_ms"] is None  # lazy: nothing moves yet
        assert session_row(k, a)["residency"] == "device" and session_row(k, a)["state"] == "IO_WAIT"

        intruder = k.open_session(max_tokens=MAX_TOKENS)  # wants room: the IO_WAIT session goes first
        row = session_row(k, a)
        assert row["residency"] == "host" and row["state"] == "SWAPPED"
        assert session_row(k, ref)["residency"] == "device"
        assert k.stat()["memory"]["prefetch"]["pending"] == 1
        intruder.close()  # room for the prefetch
        assert time.monotonic() - signalled_s < EXPECTED_MS / 1000 / 2, "too slow to test the prefetch"

        deadline = signalled_s + EXPECTED_MS / 1000 + 5.0
        while k.stat()["memory"]["prefetch"]["on_time"] == 0:  # settled once its page-in is done
            assert time.monotonic() < deadline, "the prefetch never brought the arena back"
            time.sleep(0.01)
        back_s = time.monotonic() - signalled_s

        row = session_row(k, a)
        assert row["residency"] == "device" and row["state"] == "IO_WAIT"  # back, and still waiting
        st = k.stat()["memory"]
        assert st["swap"]["by_cause"]["signal"] == 1 and st["swap"]["by_cause"]["prefetch"] == 1
        assert st["swap"]["by_cause"]["syscall"] == 0  # nobody had to wait for it
        assert st["prefetch"]["on_time"] == 1 and st["prefetch"]["late"] == 0 and st["prefetch"]["pending"] == 0
        assert st["swap"]["out"]["ops"] >= 1 and st["swap"]["in"]["ops"] >= 1
        assert back_s < EXPECTED_MS / 1000 + 1.0, f"back {back_s:.3f}s after the signal"

        a.signal_phase("COMPUTE")
        assert greedy(a, logits, 8) == want
        assert k.stat()["memory"]["prefetch"]["late"] == 0
