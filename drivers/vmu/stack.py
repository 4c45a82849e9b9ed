"""Stack: one request's activations, measured per request.

Rules:
  - The device worker wraps each request in `vmu.stack_scope()`; scopes do not nest.
  - On CUDA, allocations made by the worker inside the scope go to one private
    torch.cuda.MemPool, so activations never mix with other memory; when the
    request's tensors die their blocks return to that pool for the next request.
    The peak is measured with the device's peak-allocated counter, reset at the
    scope's start (the worker is the only thread that allocates on the device),
    and read once, at its end: the request's peak is that peak less what is still
    allocated then. Tensors a request keeps past its end (none should: replies
    are copied to the host and a session's state lives in its arena) are not
    counted.
  - Cost: a request pays two allocator calls before its first kernel (reset the
    peak, route to the pool) and one statistics read after its reply has gone.
    The calls go to torch's C entry points, resolved once: the public wrappers
    find the device index in Python on every call, and torch.cuda.memory_allocated()
    flattens and sorts every statistic. Reading the statistics builds them all
    as Python dicts, the most expensive of these calls, so the scope does not read
    them as it ends: `settle()` does, which the device worker calls once it has
    handed the request's outcome back (the event loop is already on its way), and
    which the next scope calls first. Until then the scope's peak and the figures
    of `stat()` are the previous request's.
  - On CPU torch keeps no allocation statistics: the scope is accounting only. The
    caller reports bytes (`reserve_nbytes` or `reserve()`, the plan's figure, and
    `account()`/`release()`); the peak is the largest of the reserve and the
    running total. The kernel reserves the plan's figure when admission has
    checked it (kernel/execute.py), inside the request's scope.
  - The capacity is a budget, not a preallocation: a request over it is counted
    (`over_budget`), and admission control is the plan's job.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import Busy
from .segments import SegmentStat

__all__ = ["StackSegment", "StackScope"]


@dataclass(slots=True)
class StackScope:
    """One request's stack usage. `peak_nbytes` is final once the scope has exited (CPU), or once the segment
    has settled it (CUDA: `StackSegment.settle()`)."""

    reserve_nbytes: int = 0
    current_nbytes: int = 0  # CPU accounting: the running total of account() - release()
    peak_nbytes: int = 0

    def reserve(self, nbytes: int) -> None:
        """The request's activations are at most `nbytes` (the plan's figure): raises the reserve and the
        peak to it. Several reservations in one request keep the largest; none is ever lowered."""
        if nbytes > self.reserve_nbytes:
            self.reserve_nbytes = nbytes
        if nbytes > self.peak_nbytes:
            self.peak_nbytes = nbytes

    def account(self, nbytes: int) -> None:
        """Report `nbytes` more of activations alive (CPU accounting; harmless on CUDA)."""
        self.current_nbytes += nbytes
        if self.current_nbytes > self.peak_nbytes:
            self.peak_nbytes = self.current_nbytes

    def release(self, nbytes: int) -> None:
        self.current_nbytes = max(0, self.current_nbytes - nbytes)


class _CudaAllocatorCalls:
    """The allocator calls of a stack scope for one device and pool, bound once (see the module rules).

    Those that torch.cuda.use_mem_pool makes, on the same entry points; the statistics and the peak
    reset through torch._C where this build of torch has them, else through the public functions.
    """

    def __init__(self, device: torch.device, pool: torch.cuda.MemPool) -> None:
        from torch.cuda import memory

        index = torch.cuda._utils._get_device_index(device, optional=True)
        pool_id = pool.id
        self.begin = functools.partial(memory._cuda_beginAllocateCurrentThreadToPool, index, pool_id)
        self.end = functools.partial(memory._cuda_endAllocateToPool, index, pool_id)
        self.release = functools.partial(memory._cuda_releasePool, index, pool_id)
        c = torch._C
        if hasattr(c, "_cuda_resetPeakMemoryStats") and hasattr(c, "_cuda_memoryStats"):
            self.reset_peak = functools.partial(c._cuda_resetPeakMemoryStats, index)
            self._stats = functools.partial(c._cuda_memoryStats, index)
        else:  # pragma: no cover - a torch without the private names
            self.reset_peak = functools.partial(torch.cuda.reset_peak_memory_stats, index)
            self._stats = functools.partial(torch.cuda.memory_stats_as_nested_dict, index)

    def allocated_bytes(self) -> dict[str, int]:
        """The allocated-bytes counters (current, peak, allocated, freed) of every pool of the device."""
        return self._stats()["allocated_bytes"]["all"]


class StackSegment:
    """The per-request activation budget, and on CUDA the MemPool activations live in."""

    def __init__(self, capacity_nbytes: int, device: torch.device, lock: threading.RLock) -> None:
        self.name = "stack"
        self.device = device
        self.capacity_nbytes = capacity_nbytes
        self.pool = torch.cuda.MemPool() if device.type == "cuda" else None
        self._cuda = _CudaAllocatorCalls(device, self.pool) if self.pool is not None else None
        self.lock = lock  # guards the figures below
        self.active: StackScope | None = None  # worker only
        self._unsettled: StackScope | None = None  # worker only: a CUDA scope ended, its peak not read yet
        self.last_peak_nbytes = 0
        self.max_peak_nbytes = 0
        self.requests = 0
        self.over_budget = 0

    @contextmanager
    def scope(self, reserve_nbytes: int = 0) -> Iterator[StackScope]:
        """Run one request's activations in the stack. Its peak bytes are recorded on exit on CPU, and by
        `settle()` on CUDA."""
        if self.active is not None:
            raise Busy("stack_scope() is already active on this device: one request at a time, scopes do not nest")
        self.settle()
        scope = StackScope(reserve_nbytes=reserve_nbytes, peak_nbytes=reserve_nbytes)
        self.active = scope
        cuda = self._cuda
        if cuda is None:
            try:
                yield scope
            finally:
                self.active = None
                self._record(scope)
            return
        cuda.reset_peak()
        cuda.begin()
        try:
            yield scope
        finally:
            cuda.end()
            cuda.release()
            self.active = None
            self._unsettled = scope

    def settle(self) -> None:
        """Read the peak of the last CUDA scope, if not read yet, into it and the figures. On the worker,
        between scopes; a no-op on CPU and once the segment is closed."""
        scope, cuda = self._unsettled, self._cuda
        if scope is None or cuda is None:
            return
        self._unsettled = None
        counters = cuda.allocated_bytes()
        scope.peak_nbytes = max(scope.peak_nbytes, counters["peak"] - counters["current"])
        self._record(scope)

    def _record(self, scope: StackScope) -> None:
        with self.lock:
            self.requests += 1
            self.last_peak_nbytes = scope.peak_nbytes
            self.max_peak_nbytes = max(self.max_peak_nbytes, scope.peak_nbytes)
            if scope.peak_nbytes > self.capacity_nbytes:
                self.over_budget += 1

    def close(self) -> None:
        """Give the MemPool back now, on the calling thread (the worker), with no scope open. Left to the
        garbage collector, its destructor (which empties the pool's cache) could run on any thread at any
        time, even while another thread allocates into a pool of its own, which torch's allocator refuses
        by aborting the process. Idempotent; the segment measures nothing after."""
        if self.active is not None:
            raise Busy("the stack segment cannot close while a request's scope is open")
        self.settle()
        self._cuda = None
        self.pool = None  # the last reference: the pool's destructor runs here

    @property
    def measured(self) -> bool:
        """True where the allocator measures each request's peak (CUDA); on CPU the caller reports it."""
        return self._cuda is not None

    def stat(self) -> SegmentStat:
        """Call with the lock held. used = the last request's peak; free = what a request may still use."""
        used = self.last_peak_nbytes
        free = max(0, self.capacity_nbytes - used)
        return SegmentStat(self.capacity_nbytes, used, free, free)

    def extra_stat(self) -> dict[str, int]:
        return {"peak_nbytes": self.max_peak_nbytes, "requests": self.requests, "over_budget": self.over_budget}
