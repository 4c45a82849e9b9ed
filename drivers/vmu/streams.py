"""Copy streams and fences: CUDA streams and events, or a copy thread on CPU. Same interface.

Rules:
  - A CopyStream runs its work in submission order; `wait(fence)` makes later work
    on it start after the fence, without blocking the caller (CUDA: a stream waits
    on an event; CPU: the copy thread waits).
  - A Fence says when earlier work is done: `query()` never blocks, `wait()` blocks
    the calling thread on that fence only, never on the whole device. Once a fence
    has been seen done it remembers it (`done`), so asking again, or making a stream
    wait on it, costs no call into the device.
  - A copy stream's timing events are reused: a fence hands its event back to the
    stream's pool when the last reference to the fence goes, so a copy records two
    events it already has instead of creating (and later destroying) two.
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

__all__ = ["Fence", "CopyStream", "Backend", "DONE", "make_backend"]


class Fence(Protocol):
    done: bool

    def query(self) -> bool: ...

    def wait(self) -> None: ...


class CopyStream(Protocol):
    def wait(self, fence: Fence) -> None: ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None: ...

    def zero(self, dst: torch.Tensor) -> None: ...

    def record(self) -> Fence: ...


class _Done:
    """A fence that is already complete (CPU compute; nothing to wait for)."""

    __slots__ = ()
    time_s = 0.0
    done = True

    def query(self) -> bool:
        return True

    def wait(self) -> None:
        return None


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

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._tasks.put(lambda: dst.copy_(src))

    def zero(self, dst: torch.Tensor) -> None:
        self._tasks.put(dst.zero_)

    def record(self) -> Fence:
        fence = _CpuFence()
        self._tasks.put(lambda: fence._signal(self._error))
        return fence

    def close(self) -> None:
        self._tasks.put(None)
        self._thread.join(timeout=5)


# --------------------------------------------------------------------- CUDA
class _CudaFence:
    __slots__ = ("event", "done", "_pool")

    def __init__(self, event: Any, pool: list[Any] | None = None) -> None:
        self.event = event  # torch.cuda.Event (with timing enabled on a copy stream)
        self.done = False  # seen done once: the event has passed, for good
        self._pool = pool  # where the event goes back when this fence goes

    def query(self) -> bool:
        if not self.done and self.event.query():
            self.done = True
        return self.done

    def wait(self) -> None:
        if not self.done:
            self.event.synchronize()  # blocks this thread on this event only
            self.done = True

    def __del__(self) -> None:
        # Nothing can wait on or time this event any more: work already queued behind it keeps the
        # record it waited for (CUDA waits on the record made before the wait), so it may be recorded again.
        pool = self._pool
        if pool is not None and len(pool) < _EVENT_POOL_MAX:
            pool.append(self.event)


class _CudaStream:
    """A CUDA copy stream. Work is enqueued by making it the thread's current stream around one op.

    `with torch.cuda.stream(s)` builds Stream objects for the streams it saves and restores, in
    Python, which costs more than launching the copy itself; when torch has the C entry points that
    torch.cuda.current_stream/set_stream wrap, the switch uses them directly on plain ids."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device=device)
        self.device = device
        self._events: list[Any] = []  # timing events whose fences are gone, ready to record again
        self._index = self.stream.device_index
        self._ids = (self.stream.stream_id, self.stream.device_index, self.stream.device_type)
        c = torch._C
        self._fast = hasattr(c, "_cuda_getCurrentStream") and hasattr(c, "_cuda_setStream")

    def wait(self, fence: Fence) -> None:
        if isinstance(fence, _CudaFence) and not fence.done:
            self.stream.wait_event(fence.event)

    def _on_stream(self, op: Callable[..., Any], *args: Any) -> None:
        if not self._fast:
            with torch.cuda.stream(self.stream):
                op(*args)
            return
        c = torch._C
        prev = c._cuda_getCurrentStream(self._index)  # (stream_id, device_index, device_type)
        sid, index, dtype = self._ids
        c._cuda_setStream(sid, index, dtype)  # (stream_id, device_index, device_type), positional: no keyword parsing
        try:
            op(*args)
        finally:
            c._cuda_setStream(*prev)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._on_stream(_copy_non_blocking, dst, src)

    def zero(self, dst: torch.Tensor) -> None:
        self._on_stream(dst.zero_)

    def record(self) -> Fence:
        events = self._events
        event = events.pop() if events else torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return _CudaFence(event, events)

    def close(self) -> None:
        pass


_EVENT_POOL_MAX = 256  # spare timing events kept per copy stream; more in flight at once are made and dropped


def _copy_non_blocking(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src, non_blocking=True)


# ------------------------------------------------------------------ backend
class Backend:
    """The device-specific half of the VMU: copy streams, compute fences, elapsed time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self._streams: list[Any] = []

    def copy_stream(self, name: str) -> CopyStream:
        stream = _CudaStream(self.device) if self.is_cuda else _CpuStream(f"djinn-vmu-{name}")
        self._streams.append(stream)
        return stream

    def compute_fence(self, stream: Any = None) -> Fence:
        """A fence after the work queued so far on `stream` (default: the current stream)."""
        if not self.is_cuda:
            return DONE
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return _CudaFence(event)

    def compute_wait(self, fence: Fence, stream: Any = None) -> None:
        """Order later compute on `stream` (default: current) after `fence`; see the module rules."""
        if fence.done or fence.query():
            return
        if self.is_cuda and isinstance(fence, _CudaFence):
            (stream if stream is not None else torch.cuda.current_stream(self.device)).wait_event(fence.event)
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


def make_backend(device: torch.device) -> Backend:
    return Backend(device)
