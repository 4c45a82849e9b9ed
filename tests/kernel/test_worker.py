"""The device worker: order, the thread it runs on, and how driver failures become errnos."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from djinn.drivers.errors import BadArgument, Busy, OutOfMemory
from djinn.kernel.errors import EBUSY, EINVAL, EIO, ENOMEM
from djinn.kernel.worker import DeviceWorker


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
