"""Copy streams and fences: CUDA streams and events, or a copy thread on CPU. Same interface.

Rules:
  - A CopyStream runs its work in submission order; `wait(fence)` makes later work
    on it start after the fence, without blocking the caller (CUDA: a stream waits
    on an event; CPU: the copy thread waits).
  - A Fence says when earlier work is done: `query()` never blocks, `wait()` blocks
    the calling thread on that fence only, never on the whole device.
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
    __slots__ = ("event",)

    def __init__(self, event: Any) -> None:
        self.event = event  # torch.cuda.Event with timing enabled

    def query(self) -> bool:
        return bool(self.event.query())

    def wait(self) -> None:
        self.event.synchronize()  # blocks this thread on this event only


class _CudaStream:
    """A CUDA copy stream. Work is enqueued by making it the thread's current stream around one op.

    `with torch.cuda.stream(s)` builds Stream objects for the streams it saves and restores, in
    Python, which costs more than launching the copy itself; when torch has the C entry points that
    torch.cuda.current_stream/set_stream wrap, the switch uses them directly on plain ids."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device=device)
        self.device = device
        self._index = self.stream.device_index
        self._ids = (self.stream.stream_id, self.stream.device_index, self.stream.device_type)
        c = torch._C
        self._fast = hasattr(c, "_cuda_getCurrentStream") and hasattr(c, "_cuda_setStream")

    def wait(self, fence: Fence) -> None:
        if isinstance(fence, _CudaFence):
            self.stream.wait_event(fence.event)

    def _on_stream(self, op: Callable[..., Any], *args: Any) -> None:
        if not self._fast:
            with torch.cuda.stream(self.stream):
                op(*args)
            return
        c = torch._C
        prev = c._cuda_getCurrentStream(self._index)  # (stream_id, device_index, device_type)
        sid, index, dtype = self._ids
        c._cuda_setStream(stream_id=sid, device_index=index, device_type=dtype)
        try:
            op(*args)
        finally:
            c._cuda_setStream(stream_id=prev[0], device_index=prev[1], device_type=prev[2])

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._on_stream(_copy_non_blocking, dst, src)

    def zero(self, dst: torch.Tensor) -> None:
        self._on_stream(dst.zero_)

    def record(self) -> Fence:
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return _CudaFence(event)

    def close(self) -> None:
        pass


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
        if fence.query():
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
