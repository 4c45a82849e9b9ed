"""The CUDA paths: pinned host pool, copy streams ordered by events, the Stack MemPool. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from djinn.drivers.vmu import VMU
from tests.drivers.vmu.fakes import MiB, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]


@pytest.fixture
def cuda_vmu():  # type: ignore[no-untyped-def]
    vmu = VMU("cuda", text_nbytes=64 * MiB, data_nbytes=512 * MiB, stack_nbytes=256 * MiB, host_nbytes=512 * MiB)
    try:
        yield vmu
    finally:
        vmu.close()


def test_segments_live_where_they_should(cuda_vmu: VMU) -> None:
    assert cuda_vmu.data.tensor.is_cuda and cuda_vmu.text.tensor.is_cuda
    assert not cuda_vmu.host.tensor.is_cuda
    # Page-locked (cudaHostRegister; torch's is_pinned() does not see registered memory): a non-blocking
    # device-to-host copy of 256 MiB returns while it still runs, which a pageable copy never does.
    src = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    cuda_vmu.host.tensor[: 256 * MiB].copy_(src, non_blocking=True)
    assert not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    a = cuda_vmu.alloc_arena("s", 8 * MiB)
    v = a.view(torch.float16, (1024, 1024), 4096)
    lo = cuda_vmu.data.tensor.data_ptr()
    assert v.is_cuda and lo <= v.data_ptr() and v.data_ptr() + 2 * MiB <= lo + cuda_vmu.data.capacity_nbytes


def test_page_out_waits_for_compute_on_the_arena(cuda_vmu: VMU) -> None:
    a = cuda_vmu.alloc_arena("s", 64 * MiB)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.randn(2048, 2048, device="cuda")
        out = a.view(torch.float32, (2048, 2048))
        for _ in range(20):  # long enough that an unordered copy would read stale bytes
            torch.matmul(x, x, out=out)
            x = out * 1e-3
        a.mark_used(out.numel() * 4)
        expected = out.clone()
        job = cuda_vmu.page_out(a)  # the arena's stream is `side`: the copy must wait for it
    job.wait()
    cuda_vmu.finish(job)
    inn = cuda_vmu.page_in(a)
    with torch.cuda.stream(side):
        back = a.view(torch.float32, (2048, 2048))  # orders `side` after the page-in
        assert torch.equal(back, expected.to(back.device))
    inn.wait()
    assert job.seconds and job.seconds > 0 and inn.seconds and inn.seconds > 0


def test_page_in_waits_for_page_out_in_flight(cuda_vmu: VMU) -> None:
    a = cuda_vmu.alloc_arena("s", 256 * MiB)
    a.bytes(256 * MiB).copy_(torch.randint(0, 255, (256 * MiB,), dtype=torch.uint8, device="cuda"))
    a.mark_used(256 * MiB)
    expected = a.bytes(256 * MiB).clone()
    cuda_vmu.page_out(a)
    cuda_vmu.page_in(a)  # enqueued at once: h2d must wait on the d2h event
    assert torch.equal(a.bytes(256 * MiB), expected)


def test_snapshot_restore_on_cuda(cuda_vmu: VMU) -> None:
    a = cuda_vmu.alloc_arena("s", 16 * MiB)
    a.bytes(MiB).fill_(7)
    a.mark_used(MiB)
    ck = cuda_vmu.snapshot(a)
    a.bytes(MiB).fill_(9)  # ordered after the snapshot's copy on this stream
    cuda_vmu.restore(a, ck)
    assert int(a.bytes(MiB).float().mean().item()) == 7
    cuda_vmu.free_host(ck)


def test_stack_scope_measures_peak(cuda_vmu: VMU) -> None:
    with cuda_vmu.stack_scope() as scope:
        t = torch.empty(32 * MiB, dtype=torch.uint8, device="cuda")
        del t
    assert scope.peak_nbytes == 0 and cuda_vmu.stat()["stack"]["requests"] == 0  # not read at the exit
    cuda_vmu.stack.settle()  # the device worker's call once the reply has gone
    assert scope.peak_nbytes >= 32 * MiB
    assert cuda_vmu.stat()["stack"]["requests"] == 1
    cuda_vmu.stack.settle()  # read once
    assert cuda_vmu.stat()["stack"]["requests"] == 1


def test_the_next_stack_scope_settles_the_last_one_first(cuda_vmu: VMU) -> None:
    with cuda_vmu.stack_scope() as first:
        torch.empty(16 * MiB, dtype=torch.uint8, device="cuda")
    with cuda_vmu.stack_scope() as second:  # its peak reset comes after the first one's read
        assert first.peak_nbytes >= 16 * MiB
        torch.empty(1 * MiB, dtype=torch.uint8, device="cuda")
    cuda_vmu.stack.settle()
    assert 1 * MiB <= second.peak_nbytes < 16 * MiB
    assert cuda_vmu.stat()["stack"]["requests"] == 2


def test_closing_gives_the_stack_pool_back_while_another_pool_is_being_allocated_into() -> None:
    """Closed on its worker, a VMU's MemPool is gone before another VMU's scope can meet its destructor (left to
    the garbage collector, that destructor could empty its cache inside another thread's scope, and torch
    aborts the process then)."""
    a = VMU("cuda", text_nbytes=8 * MiB, data_nbytes=8 * MiB, stack_nbytes=64 * MiB, host_nbytes=8 * MiB)
    b = VMU("cuda", text_nbytes=8 * MiB, data_nbytes=8 * MiB, stack_nbytes=64 * MiB, host_nbytes=8 * MiB)
    try:
        with a.stack_scope():
            torch.empty(4 * MiB, dtype=torch.uint8, device="cuda")
        a.close()
        assert a.stack.pool is None
        with b.stack_scope() as scope:
            t = torch.empty(4 * MiB, dtype=torch.uint8, device="cuda")
            del t
        b.stack.settle()
        assert scope.peak_nbytes >= 4 * MiB
    finally:
        a.close()
        b.close()


def test_stack_scope_counts_only_its_own_transient_bytes(cuda_vmu: VMU) -> None:
    """Memory allocated between scopes, or kept past one, is not a request's activations."""
    outside = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")  # allocated before the scope, still alive
    with cuda_vmu.stack_scope() as scope:
        transient = torch.empty(8 * MiB, dtype=torch.uint8, device="cuda")
        kept = torch.empty(2 * MiB, dtype=torch.uint8, device="cuda")
        del transient
    cuda_vmu.stack.settle()
    assert 8 * MiB <= scope.peak_nbytes < 16 * MiB
    del outside, kept
    with cuda_vmu.stack_scope() as scope:  # the memory freed meanwhile does not count either
        torch.empty(1 * MiB, dtype=torch.uint8, device="cuda")
    cuda_vmu.stack.settle()
    assert 1 * MiB <= scope.peak_nbytes < 8 * MiB


def test_real_cuda_oom_becomes_out_of_memory() -> None:
    from djinn.drivers.errors import OutOfMemory

    with pytest.raises(OutOfMemory):
        VMU("cuda", text_nbytes=0, data_nbytes=1 << 50, stack_nbytes=0, host_nbytes=0)


def test_copies_leave_the_callers_current_stream_as_it_was(cuda_vmu: VMU) -> None:
    """Paging enqueues its copies on its own streams, whatever stream the caller has current, and leaves it."""
    a = cuda_vmu.alloc_arena("s", 4 * MiB)
    a.bytes(4 * MiB).fill_(7)
    a.mark_used(4 * MiB)
    side = torch.cuda.Stream()
    for current in (torch.cuda.default_stream(), side):
        with torch.cuda.stream(current):
            cuda_vmu.finish(cuda_vmu.page_out(a))
            assert torch.cuda.current_stream() == current
            cuda_vmu.finish(cuda_vmu.page_in(a))
            assert torch.cuda.current_stream() == current
            assert int(a.bytes(4 * MiB).sum(dtype=torch.int64)) == 7 * 4 * MiB


def test_copy_events_are_reused_and_still_order_and_time_the_copies(cuda_vmu: VMU) -> None:
    a = cuda_vmu.alloc_arena("s", 4 * MiB)
    a.bytes(4 * MiB).fill_(7)
    a.mark_used(4 * MiB)
    for i in range(50):
        out = cuda_vmu.page_out(a)
        back = cuda_vmu.page_in(a)  # waits on the page-out's end event, on the GPU
        a.bytes(1, 4 * MiB - 1).add_(1)  # compute ordered after the page-in
        cuda_vmu.finish(out), cuda_vmu.finish(back)
        assert out.seconds is not None and out.seconds > 0 and back.seconds is not None and back.seconds > 0
        assert int(a.bytes(1, 4 * MiB - 1).item()) == 8 + i
        del out, back
    assert int(a.bytes(1).item()) == 7
    pools = (cuda_vmu._d2h._events, cuda_vmu._h2d._events, cuda_vmu.backend._compute_events)
    assert all(0 < len(pool) <= 8 for pool in pools)  # the same few events, recorded again and again


def test_page_in_home_zeroes_the_bytes_past_used(cuda_vmu: VMU) -> None:
    a = cuda_vmu.alloc_arena("s", 4 * MiB)
    a.bytes(4 * MiB).fill_(9)
    a.mark_used(MiB)
    cuda_vmu.finish(cuda_vmu.page_out(a))
    cuda_vmu.finish(cuda_vmu.page_in(a))  # back to its range: the copy, then a memset of the rest
    assert a.generation == 0
    assert int(a.bytes(MiB).sum(dtype=torch.int64)) == 9 * MiB
    assert int(a.bytes(3 * MiB, MiB).count_nonzero()) == 0


def test_copies_from_a_thread_that_never_used_cuda(cuda_vmu: VMU) -> None:
    """The driver calls find no current context on such a thread: they run in the device's primary context,
    pushed for each call."""
    import ctypes
    import threading

    libcuda = ctypes.CDLL("libcuda.so.1")
    a = cuda_vmu.alloc_arena("s", 2 * MiB)
    a.bytes(2 * MiB).fill_(3)
    a.mark_used(2 * MiB)
    for _ in range(3):  # leaves the arena untouched by compute and the streams with spare events, so the
        cuda_vmu.finish(cuda_vmu.page_out(a))  # thread's first CUDA calls are the driver's, not torch's
        cuda_vmu.finish(cuda_vmu.page_in(a))
    assert cuda_vmu._d2h._events and cuda_vmu._h2d._events and not a._touched
    seen: dict[str, object] = {}

    def page() -> None:
        ctx = ctypes.c_void_p()
        libcuda.cuCtxGetCurrent(ctypes.byref(ctx))
        seen["context"] = ctx.value
        try:
            cuda_vmu.page_out(a).wait()
            cuda_vmu.page_in(a).wait()
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            seen["error"] = e

    t = threading.Thread(target=page)
    t.start()
    t.join()
    assert seen["context"] is None and "error" not in seen, seen
    cuda_vmu.poll()
    assert a.residency == "device" and int(a.bytes(2 * MiB).sum(dtype=torch.int64)) == 3 * 2 * MiB


def test_a_failed_driver_call_is_a_driver_error_naming_the_cuda_error(cuda_vmu: VMU) -> None:
    from djinn.drivers.errors import DriverError

    s = cuda_vmu._d2h
    with pytest.raises(DriverError, match="cuMemcpyAsync failed: CUDA_ERROR_INVALID_VALUE"):
        s._driver.memcpy(0, 0, 4096, s._handle)  # address 0 is no memory
    cuda_vmu.finish(cuda_vmu.page_out(cuda_vmu.alloc_arena("t", MiB)))  # and the streams still work


def test_a_copy_wait_in_the_background_sleeps_instead_of_spinning_a_cpu(cuda_vmu: VMU) -> None:
    """A job's sleep() (what the kernel's helper threads call) blocks in the driver: while a long copy runs
    behind a long compute, the waiting thread uses a small part of the CPU time a spinning wait would."""
    import threading
    import time

    a = cuda_vmu.alloc_arena("s", 256 * MiB)
    a.mark_used(256 * MiB)
    x = a.view(torch.float32, (4096, 4096))
    torch.cuda.synchronize()
    for _ in range(100):  # tens to hundreds of milliseconds of GPU work the page-out must wait for
        x = x @ x / 4096
    job = cuda_vmu.page_out(a)
    spent: list[float] = []

    def background() -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        job.sleep()
        spent.extend((time.perf_counter() - t0, time.thread_time() - c0))

    t = threading.Thread(target=background)
    t.start()
    t.join()
    wall, cpu = spent
    assert job.done and wall > 0.02, f"the wait took {wall:.4f} s: too short to tell sleeping from spinning"
    assert cpu < 0.25 * wall, f"the waiting thread used {cpu:.3f} s of CPU in {wall:.3f} s: it spun"
    cuda_vmu.finish(job)


def test_current_stream_is_torch_s_current_stream_one_object_per_stream(cuda_vmu: VMU) -> None:
    side = torch.cuda.Stream()
    main = cuda_vmu.current_stream()
    assert main == torch.cuda.current_stream() and cuda_vmu.current_stream() is main
    with torch.cuda.stream(side):
        assert cuda_vmu.current_stream() == side and cuda_vmu.current_stream() is cuda_vmu.current_stream()
        arena = cuda_vmu.alloc_arena("s-stream", 1 * MiB)
        arena.touch()
        assert arena.compute_stream == side  # where a page-out of this arena will wait
    assert cuda_vmu.current_stream() is main
    cuda_vmu.free_arena(arena)
