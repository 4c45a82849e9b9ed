"""Copy streams and fences: CUDA streams and events, or a copy thread on CPU. Same interface.

Rules:
  - A CopyStream runs its work in submission order; `wait(fence)` makes later work
    on it start after the fence, without blocking the caller (CUDA: a stream waits
    on an event; CPU: the copy thread waits).
  - A Fence says when earlier work is done: `query()` never blocks, `wait()` blocks
    the calling thread on that fence only, never on the whole device. Once a fence
    has been seen done it remembers it (`done`), so asking again, or making a stream
    wait on it, costs no call into the device.
  - `wait()` on CUDA spins its thread until the event passes (the fewest microseconds
    to wake); `sleep()` blocks it without keeping a CPU busy, for threads that wait in
    the background (the kernel's copy waits): a fence recorded with `sleepable=True`
    carries a second, blocking-sync event for it. A copy waited on by spinning burned
    a whole CPU for its length, on the CPU its waiting thread was pinned to.
  - Events are reused: a fence hands its event back to its pool (a copy stream's
    timing events, or the backend's compute-fence events) when the last reference to
    the fence goes, so a copy records events it already has instead of creating (and
    later destroying) them.
  - On CUDA a copy stream calls the CUDA driver itself (cuda_driver.py): copies between
    segment addresses, zeroing, event records and waits. torch still makes and owns the
    streams, events and memory.
  - `compute_fence(stream)` marks the work queued so far on a compute stream; on
    CPU, compute runs synchronously on the caller's thread, so it is already done.
  - `compute_wait(fence, stream)` orders later compute after the fence: a GPU-side
    wait on CUDA (the host does not block); on CPU the caller blocks until the fence.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Protocol

import torch

from .cuda_driver import CudaDriver

__all__ = ["Fence", "CopyStream", "Backend", "DONE", "make_backend"]


class Fence(Protocol):
    done: bool

    def query(self) -> bool: ...

    def wait(self) -> None: ...

    def sleep(self) -> None: ...


class Segment(Protocol):
    """What a copy stream needs of a VMU segment (segments.Segment)."""

    base_ptr: int

    def bytes_at(self, offset: int, nbytes: int) -> torch.Tensor: ...


class CopyStream(Protocol):
    def wait(self, fence: Fence) -> None: ...

    def copy(self, dst: Segment, dst_offset: int, src: Segment, src_offset: int, nbytes: int) -> None: ...

    def zero(self, dst: Segment, offset: int, nbytes: int) -> None: ...

    def record(self, sleepable: bool = False) -> Fence: ...


class _Done:
    """A fence that is already complete (CPU compute; nothing to wait for)."""

    __slots__ = ()
    time_s = 0.0
    done = True

    def query(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    sleep = wait


DONE: Fence = _Done()


# ---------------------------------------------------------------------- CPU
class _CpuFence:
    __slots__ = ("_event", "time_s", "error")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.time_s = 0.0  # perf_counter when the stream reached this fence
        self.error: BaseException | None = None  # set if work before it failed

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def query(self) -> bool:
        return self._event.is_set()

    def wait(self) -> None:
        self._event.wait()
        if self.error is not None:
            raise RuntimeError(f"a copy before this fence failed: {self.error!r}") from self.error

    sleep = wait  # a threading.Event wait never spins

    def _signal(self, error: BaseException | None) -> None:
        self.time_s = time.perf_counter()
        self.error = error
        self._event.set()


class _CpuStream:
    """One daemon thread running tasks in order. torch's copy_ releases the GIL, so copies
    overlap with the worker's compute as a CUDA copy engine would."""

    def __init__(self, name: str) -> None:
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None  # first failure; reported by every later fence
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                task()
            except BaseException as e:  # noqa: BLE001 - reported through the next fence
                self._error = self._error or e

    def wait(self, fence: Fence) -> None:
        if not fence.query():
            self._tasks.put(fence.wait)

    def copy(self, dst: Segment, dst_offset: int, src: Segment, src_offset: int, nbytes: int) -> None:
        self._tasks.put(lambda: dst.bytes_at(dst_offset, nbytes).copy_(src.bytes_at(src_offset, nbytes)))

    def zero(self, dst: Segment, offset: int, nbytes: int) -> None:
        self._tasks.put(lambda: dst.bytes_at(offset, nbytes).zero_())

    def record(self, sleepable: bool = False) -> Fence:
        fence = _CpuFence()
        self._tasks.put(lambda: fence._signal(self._error))
        return fence

    def close(self) -> None:
        self._tasks.put(None)
        self._thread.join(timeout=5)


# --------------------------------------------------------------------- CUDA
class _CudaFence:
    __slots__ = ("event", "done", "_pool", "_sleeper", "_sleepers")

    def __init__(self, event: Any, pool: list[Any] | None = None, sleeper: Any = None,
                 sleepers: list[Any] | None = None) -> None:
        self.event = event  # torch.cuda.Event (with timing enabled on a copy stream)
        self.done = False  # seen done once: the event has passed, for good
        self._pool = pool  # where the event goes back when this fence goes
        self._sleeper = sleeper  # a blocking-sync event recorded right after `event`, or None
        self._sleepers = sleepers  # where that one goes back

    def query(self) -> bool:
        if not self.done and self.event.query():
            self.done = True
        return self.done

    def wait(self) -> None:
        if not self.done:
            self.event.synchronize()  # blocks this thread on this event only, spinning
            self.done = True

    def sleep(self) -> None:
        if not self.done:
            (self._sleeper or self.event).synchronize()  # the blocking one sleeps in the driver
            self.done = True

    def __del__(self) -> None:
        # Nothing can wait on or time these events any more: work already queued behind them keeps the
        # record it waited for (CUDA waits on the record made before the wait), so they may be recorded again.
        pool = self._pool
        if pool is not None and len(pool) < _EVENT_POOL_MAX:
            pool.append(self.event)
        sleepers = self._sleepers
        if self._sleeper is not None and sleepers is not None and len(sleepers) < _EVENT_POOL_MAX:
            sleepers.append(self._sleeper)


class _CudaStream:
    """A CUDA copy stream. Copies, zeroing, records and waits go to the CUDA driver directly
    (cuda_driver.py): on addresses, with no tensor view, stream switch or Event wrapper between."""

    def __init__(self, device: torch.device, driver: CudaDriver) -> None:
        self.stream = torch.cuda.Stream(device=device)
        self.device = device
        self._driver = driver
        self._handle: int = self.stream.cuda_stream
        self._events: list[Any] = []  # timing events whose fences are gone, ready to record again
        self._sleepers: list[Any] = []  # blocking-sync events likewise (see sleepable fences)

    def wait(self, fence: Fence) -> None:
        if isinstance(fence, _CudaFence) and not fence.done:
            self._driver.wait(self._handle, fence.event.cuda_event)

    def copy(self, dst: Segment, dst_offset: int, src: Segment, src_offset: int, nbytes: int) -> None:
        self._driver.memcpy(dst.base_ptr + dst_offset, src.base_ptr + src_offset, nbytes, self._handle)

    def zero(self, dst: Segment, offset: int, nbytes: int) -> None:
        self._driver.memset(dst.base_ptr + offset, nbytes, self._handle)

    def record(self, sleepable: bool = False) -> Fence:
        event = self._record(self._events, enable_timing=True)
        if not sleepable:
            return _CudaFence(event, self._events)
        return _CudaFence(event, self._events, self._record(self._sleepers, blocking=True), self._sleepers)

    def _record(self, pool: list[Any], **kind: bool) -> Any:
        if pool:
            event = pool.pop()  # recorded before, so torch has created its CUDA event
            self._driver.record(event.cuda_event, self._handle)
        else:
            event = torch.cuda.Event(**kind)
            event.record(self.stream)  # torch creates the CUDA event on its first record
        return event

    def close(self) -> None:
        pass


_EVENT_POOL_MAX = 256  # spare events kept per pool; more in flight at once are made and dropped


# ------------------------------------------------------------------ backend
class Backend:
    """The device-specific half of the VMU: copy streams, compute fences, elapsed time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self._streams: list[Any] = []
        self._driver = CudaDriver(torch.cuda._utils._get_device_index(device, optional=True)) if self.is_cuda else None
        self._compute_events: list[Any] = []  # spare events for compute fences, as a copy stream keeps its own

    def copy_stream(self, name: str) -> CopyStream:
        stream: Any = (_CudaStream(self.device, self._driver) if self._driver is not None
                       else _CpuStream(f"djinn-vmu-{name}"))
        self._streams.append(stream)
        return stream

    def compute_fence(self, stream: Any = None) -> Fence:
        """A fence after the work queued so far on `stream` (default: the current stream)."""
        if not self.is_cuda:
            return DONE
        if stream is None:
            stream = torch.cuda.current_stream(self.device)
        events = self._compute_events
        if events:
            event = events.pop()  # recorded before: torch has created its CUDA event
            self._driver.record(event.cuda_event, stream.cuda_stream)
        else:
            event = torch.cuda.Event()
            event.record(stream)
        return _CudaFence(event, events)

    def compute_wait(self, fence: Fence, stream: Any = None) -> None:
        """Order later compute on `stream` (default: current) after `fence`; see the module rules."""
        if fence.done or fence.query():
            return
        if self.is_cuda and isinstance(fence, _CudaFence):
            if stream is None:
                stream = torch.cuda.current_stream(self.device)
            self._driver.wait(stream.cuda_stream, fence.event.cuda_event)
        else:
            fence.wait()

    @staticmethod
    def elapsed_s(start: Fence, end: Fence) -> float:
        """Seconds between two completed fences of one copy stream."""
        if isinstance(start, _CudaFence) and isinstance(end, _CudaFence):
            return start.event.elapsed_time(end.event) / 1e3
        return max(0.0, getattr(end, "time_s", 0.0) - getattr(start, "time_s", 0.0))

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams.clear()
        if self._driver is not None:
            self._driver.close()  # the VMU is unusable after its close


def make_backend(device: torch.device) -> Backend:
    return Backend(device)
