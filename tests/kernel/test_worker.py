"""The device worker: order, the thread it runs on, and how driver failures become errnos."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

from djinn.drivers.errors import BadArgument, Busy, OutOfMemory
from djinn.kernel.errors import EBUSY, ECANCELED, EINVAL, EIO, ENOMEM
from djinn.kernel.worker import DeviceWorker
from tests.fakes import requires_affinity


@pytest.fixture
def worker():
    w = DeviceWorker()
    yield w
    w.close()


async def test_runs_in_order_on_one_thread_off_the_loop(worker):
    seen: list[tuple[int, int]] = []
    loop_thread = threading.get_ident()
    await asyncio.gather(*(worker.run(lambda i=i: seen.append((i, threading.get_ident()))) for i in range(50)))
    assert [i for i, _ in seen] == list(range(50))
    assert len({t for _, t in seen}) == 1 and seen[0][1] != loop_thread


async def test_after_call_runs_after_each_call_once_its_outcome_is_handed_back(worker, caplog):
    """The hook runs on the worker between calls, after the call's outcome is on its way to the loop, and its
    time counts as busy; one that fails is logged and the worker carries on."""
    events: list[str] = []
    handed_back = threading.Event()

    def after() -> None:
        if len(events) < 6:  # the three run() calls: wait until the awaiting task has its outcome
            assert handed_back.wait(5)
            handed_back.clear()
        events.append("after")

    worker.after_call = after
    for i in range(3):
        assert await worker.run(lambda i=i: events.append(f"call {i}") or i) == i
        handed_back.set()
    worker.post(lambda: events.append("posted"))
    await worker.run(lambda: None)  # behind the posted call and its hook
    assert events[:6] == ["call 0", "after", "call 1", "after", "call 2", "after"]
    assert events[6:8] == ["posted", "after"]

    worker.after_call = lambda: threading.Event().wait(0.02)
    before = worker.busy_s
    await worker.run(lambda: None)
    await worker.run(lambda: None)  # behind the first call's hook
    assert worker.busy_s - before >= 0.02  # the hook's time is the worker's busy time too

    def broken() -> None:
        raise RuntimeError("hook bug")

    worker.after_call = broken
    assert await worker.run(lambda: 1) == 1
    assert await worker.run(lambda: 2) == 2  # the worker carries on
    assert "after_call" in caplog.text


def _raise(exc: BaseException):
    def fn():
        raise exc
    return fn


@pytest.mark.parametrize("exc,cls", [
    (OutOfMemory("data segment", requested_nbytes=10, largest_free_nbytes=5, total_free_nbytes=7), ENOMEM),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), ENOMEM),
    (BadArgument("pause_at out of range"), EINVAL),
    (Busy("already swapped"), EBUSY),
    (RuntimeError("a bug"), EIO),
])
async def test_failures_become_errnos(worker, exc, cls):
    with pytest.raises(cls) as e:
        await worker.run(_raise(exc))
    if cls is ENOMEM:
        assert e.value.retryable
    assert await worker.run(lambda: 42) == 42  # the worker carries on


@pytest.mark.gpu
async def test_real_cuda_oom_is_enomem_for_that_request_only(worker):
    def too_big():
        return torch.empty(1 << 50, dtype=torch.uint8, device="cuda")

    with pytest.raises(ENOMEM):
        await worker.run(too_big)
    assert await worker.run(lambda: int(torch.ones(4, device="cuda").sum())) == 4


async def test_a_job_cancelled_before_it_starts_never_runs(worker):
    gate = threading.Event()
    ran: list[str] = []
    blocker = asyncio.ensure_future(worker.run(gate.wait))
    queued = asyncio.ensure_future(worker.run(lambda: ran.append("queued")))
    await asyncio.sleep(0.01)
    queued.cancel()
    gate.set()
    await blocker
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert await worker.run(lambda: "after") == "after"
    assert ran == []


@pytest.mark.parametrize("exc", [StopIteration("x"), SystemExit(3), GeneratorExit()])
async def test_exceptions_asyncio_cannot_carry_become_eio(worker, exc):
    with pytest.raises(EIO):
        await worker.run(_raise(exc))
    assert await worker.run(lambda: 1) == 1


async def test_busy_time_and_calls_are_counted():
    w = DeviceWorker()
    try:
        await w.run(lambda: threading.Event().wait(0.02))
        await w.run(lambda: None)
        assert w.calls == 2 and w.busy_s >= 0.02
    finally:
        w.close()


async def test_time_waited_before_a_call_starts_is_counted():
    w = DeviceWorker()
    try:
        await w.run(lambda: None)
        alone = w.wait_s
        # The second call waits behind the first, which runs 50 ms; a posted call behind it counts alike.
        await asyncio.gather(w.run(lambda: threading.Event().wait(0.05)), w.run(lambda: None))
        w.post(lambda: None)
        await w.run(lambda: None)  # runs after the posted call, accounting included
        assert w.calls == 5 and w.wait_s - alone >= 0.05 and alone < 0.05
    finally:
        w.close()


async def test_close_runs_what_is_queued_then_refuses_new_work():
    w = DeviceWorker()
    done: list[int] = []
    pending = [asyncio.ensure_future(w.run(lambda i=i: done.append(i))) for i in range(3)]
    await asyncio.sleep(0)  # the jobs are queued
    await asyncio.get_running_loop().run_in_executor(None, w.close)
    await asyncio.gather(*pending)
    assert done == [0, 1, 2]
    with pytest.raises(ECANCELED):
        await w.run(lambda: None)


@requires_affinity
async def test_pinned_worker_runs_on_its_cpus_only_and_the_caller_keeps_its_own():
    mine = os.sched_getaffinity(0)
    cpu = max(mine)
    w = DeviceWorker(cpus=(cpu,))
    try:
        assert await w.run(os.sched_getaffinity, 0) == {cpu}
        assert w.cpus == [cpu]
        assert os.sched_getaffinity(0) == mine
    finally:
        w.close()


@requires_affinity
def test_a_cpu_the_process_may_not_use_fails_the_constructor_and_leaves_no_thread():
    before = threading.active_count()
    with pytest.raises(OSError):
        DeviceWorker(cpus=(4096,))
    assert threading.active_count() == before
