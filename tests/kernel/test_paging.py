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


# -- waiting for room (memory_wait_ms) ----------------------------------------------------------------------


def _open_in_thread(k, box: dict, **kw):
    import threading

    def run():
        t0 = time.monotonic()
        try:
            box["session"] = k.open_session(max_tokens=MAX_TOKENS, **kw)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc
        box["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    return t


def _room(k) -> dict:
    return k.stat()["memory"]["room_waits"]


def test_memory_wait_admits_a_request_when_an_arena_is_freed(daemon_with):
    d, _ = _pressure_daemon(daemon_with, policy="none", memory_wait_ms=10_000)
    with djinn.connect(d.path) as k, djinn.connect(d.path) as k2:
        a = k.open_session(max_tokens=MAX_TOKENS)
        b = k.open_session(max_tokens=MAX_TOKENS)
        want = greedy(b, b.forward(PROMPT).logits, 4)
        box: dict = {}
        t = _open_in_thread(k2, box)
        deadline = time.monotonic() + 5
        while _room(k)["waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _room(k)["waiting"] == 1 and not box, "the third session waits in the daemon"
        time.sleep(0.15)
        assert not box
        a.close()  # frees an arena: the waiter is woken and fits
        t.join(5)
        assert "session" in box, box
        room = _room(k)
        assert room == {**room, "waiting": 0, "waits": 1, "admitted": 1, "timed_out": 0, "abandoned": 0}
        assert room["wait_s"] >= 0.15
        c = box["session"]
        assert c.forward(PROMPT).position == len(PROMPT)
        b2 = k.session(b.id)
        assert b2.forward([1]).position == len(PROMPT) + 5 and len(want) == 4
        c.close()


def test_memory_wait_ends_in_enomem_with_the_time_waited(daemon_with):
    d, _ = _pressure_daemon(daemon_with, policy="none", memory_wait_ms=300)
    with djinn.connect(d.path) as k:
        a = k.open_session(max_tokens=MAX_TOKENS)
        k.open_session(max_tokens=MAX_TOKENS)
        a.forward(PROMPT)
        t0 = time.monotonic()
        with pytest.raises(djinn.errors.ENOMEM) as e:
            k.open_session(max_tokens=MAX_TOKENS)
        assert time.monotonic() - t0 >= 0.3
        assert e.value.retryable and e.value.details["waited_ms"] >= 300
        room = _room(k)
        assert (room["waits"], room["admitted"], room["timed_out"], room["waiting"]) == (1, 0, 1, 0)
        assert a.forward([1]).position == len(PROMPT) + 1 and len(k.stat()["sessions"]) == 2


def test_a_waiting_request_pages_out_a_session_on_its_signal_not_between_its_calls(daemon_with):
    """Proactive pages out any session that is not busy for a request that arrives. A request that finds
    every resident session busy waits; sessions that merely finish a call are not paged out for it (they
    compute on); the first one to signal IO_WAIT is, and the waiter fits."""
    d, _ = _pressure_daemon(daemon_with, policy="proactive", proactive_mode="eager", memory_wait_ms=10_000,
                            decode_batch=1)
    with djinn.connect(d.path) as k, djinn.connect(d.path) as k2, djinn.connect(d.path) as k3:
        a = k.open_session(max_tokens=MAX_TOKENS)
        b = k.open_session(max_tokens=MAX_TOKENS)
        la, lb = a.forward(PROMPT).logits, b.forward(PROMPT).logits
        import threading

        outs: dict = {}
        runs = [threading.Thread(target=lambda kk=kk, s=s, name=name, lg=lg: outs.__setitem__(
            name, list(kk.session(s.id).generate([int(torch.argmax(lg))], max_new_tokens=48))))
                for kk, s, name, lg in ((k2, a, "a", la), (k3, b, "b", lb))]
        for t in runs:
            t.start()
        deadline = time.monotonic() + 5
        while len([r for r in k.stat()["sessions"] if r["state"] == "RUNNING"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        box: dict = {}
        t = _open_in_thread(k, box)
        for r in runs:
            r.join(10)
        assert len(outs["a"]) == 48 and len(outs["b"]) == 48
        time.sleep(0.3)  # both calls ended; the waiter has tried again (their ends, the 100 ms recheck)
        assert not box and _room(k)["waiting"] == 1, "a session between its calls is not paged out for a waiter"
        assert k.stat()["memory"]["swap"]["by_cause"]["pressure"] == 0
        a.signal_phase("IO_WAIT", expected_ms=60_000)  # eager: paged out at once, and the waiter fits
        t.join(5)
        assert "session" in box, box
        assert session_row(k, a)["residency"] == "host"
        box["session"].close()
        room = _room(k)
        assert (room["waits"], room["admitted"], room["timed_out"], room["waiting"]) == (1, 1, 0, 0)


def test_no_prefetch_takes_room_while_a_syscall_waits_for_it(daemon_with):
    d, _ = _pressure_daemon(daemon_with, policy="proactive", proactive_mode="eager", memory_wait_ms=10_000,
                            decode_batch=1)
    with djinn.connect(d.path) as k, djinn.connect(d.path) as k2, djinn.connect(d.path) as k3:
        a = k.open_session(max_tokens=MAX_TOKENS)
        la = a.forward(PROMPT).logits
        want = greedy(a, la, 4)
        a.close()
        a = k.open_session(max_tokens=MAX_TOKENS)
        la = a.forward(PROMPT).logits
        a.signal_phase("IO_WAIT", expected_ms=400)  # eager: out at once, a prefetch armed for ~400 ms from now
        t_signal = time.monotonic()
        b = k.open_session(max_tokens=MAX_TOKENS)
        c = k.open_session(max_tokens=MAX_TOKENS)
        lb, lc = b.forward(PROMPT).logits, c.forward(PROMPT).logits
        import threading

        runs = [threading.Thread(target=lambda kk=kk, s=s, lg=lg: list(
            kk.session(s.id).generate([int(torch.argmax(lg))], max_new_tokens=48)))
                for kk, s, lg in ((k2, b, lb), (k3, c, lc))]
        for t in runs:
            t.start()
        deadline = time.monotonic() + 5
        while len([r for r in k.stat()["sessions"] if r["state"] == "RUNNING"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        in_ops = k.stat()["memory"]["swap"]["in"]["ops"]
        box: dict = {}
        t = _open_in_thread(k, box)
        while _room(k)["waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _room(k)["waiting"] == 1 and not box
        time.sleep(max(0.0, t_signal + 0.6 - time.monotonic()))  # a's prefetch came due meanwhile
        st = k.stat()
        assert st["memory"]["prefetch"]["cancelled"] == 1 and st["memory"]["swap"]["in"]["ops"] == in_ops
        assert session_row(k, a)["residency"] == "host" and not box, "the room stays for the waiting syscall"
        for r in runs:
            r.join(10)
        b.signal_phase("IO_WAIT", expected_ms=60_000)
        t.join(5)
        assert "session" in box, box
        box["session"].close()
        a.signal_phase("COMPUTE")
        assert greedy(a, la, 4) == want  # its own syscall paged it in


def test_a_syscalls_page_in_waits_for_room(daemon_with):
    d, _ = _pressure_daemon(daemon_with, policy="none", memory_wait_ms=10_000)
    with djinn.connect(d.path) as k, djinn.connect(d.path) as k2:
        a = k.open_session(max_tokens=MAX_TOKENS)
        la = a.forward(PROMPT).logits
        a.page_out()
        b = k.open_session(max_tokens=MAX_TOKENS)
        c = k.open_session(max_tokens=MAX_TOKENS)
        want = greedy(b, b.forward(PROMPT).logits, 4)
        box: dict = {}

        def resume_a():
            box["ids"] = greedy(k2.session(a.id), la, 4)

        import threading

        t = threading.Thread(target=resume_a)
        t.start()
        deadline = time.monotonic() + 5
        while _room(k)["waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _room(k)["waiting"] == 1 and not box, "a's page-in waits: b and c hold the Data segment"
        c.close()
        t.join(10)
        assert box.get("ids") == want, box
        assert _room(k)["admitted"] == 1
        b.close()


def test_room_waiters_take_turns_from_the_front():
    import asyncio

    from djinn.kernel.memory import RoomWaiters

    async def main() -> None:
        room = RoomWaiters()
        woken: list[int] = []

        async def waiter(i: int, front: bool) -> None:
            await room.wait(5.0, front=front)
            woken.append(i)

        assert room.begin() is True  # nobody queued: the first waiter is at the front
        tasks = [asyncio.create_task(waiter(i, False)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert room.begin() is False
        tasks.append(asyncio.create_task(waiter(9, True)))  # a waiter whose turn came keeps the front
        await asyncio.sleep(0.01)
        room.notify()  # one event, one try: only the front one wakes
        await asyncio.sleep(0.01)
        assert woken == [9]
        room.end(0.5, "admitted")  # it found room: the turn passes on
        await asyncio.sleep(0.01)
        assert woken == [9, 0]
        room.notify()
        room.notify()
        await asyncio.gather(*tasks)
        assert woken == [9, 0, 1, 2]
        t0 = asyncio.get_running_loop().time()
        await room.wait(0.05, front=False)  # nobody notifies: the timeout ends it
        assert asyncio.get_running_loop().time() - t0 >= 0.04
        room.end(0.25, "timed_out")
        assert room.snapshot() == {"waiting": 0, "waits": 2, "admitted": 1, "timed_out": 1, "abandoned": 0,
                                   "wait_s": 0.75}

    asyncio.run(main())
