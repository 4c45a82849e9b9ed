"""Stack: one request's activations, measured per request.

Rules:
  - The device worker wraps each request in `vmu.stack_scope()`; scopes do not nest.
  - On CUDA, allocations made by the worker inside the scope go to one private
    torch.cuda.MemPool, so activations never mix with other memory; when the
    request's tensors die their blocks return to that pool for the next request.
    The peak is measured with the device's peak-allocated counter, reset at the
    scope's start (the worker is the only thread that allocates on the device).
    The counters are read from the allocator's nested statistics, not through
    torch.cuda.memory_allocated(), which flattens and sorts every statistic in
    Python on each call: twice per request, that was a large share of a small
    request's fixed cost.
  - On CPU torch keeps no allocation statistics: the scope is accounting only. The
    caller reports bytes (`reserve_nbytes`, typically the plan's figure, and
    `account()`/`release()`); the peak is the largest running total.
  - The capacity is a budget, not a preallocation: a request over it is counted
    (`over_budget`), and admission control is the plan's job.
"""

from __future__ import annotations

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
    """One request's stack usage. `peak_nbytes` is final once the scope has exited."""

    reserve_nbytes: int = 0
    current_nbytes: int = 0  # CPU accounting: the running total of account() - release()
    peak_nbytes: int = 0

    def account(self, nbytes: int) -> None:
        """Report `nbytes` more of activations alive (CPU accounting; harmless on CUDA)."""
        self.current_nbytes += nbytes
        if self.current_nbytes > self.peak_nbytes:
            self.peak_nbytes = self.current_nbytes

    def release(self, nbytes: int) -> None:
        self.current_nbytes = max(0, self.current_nbytes - nbytes)


def _allocated_bytes(device: torch.device) -> dict[str, int]:
    """The caching allocator's allocated-bytes counters of `device` (current, peak, allocated, freed),
    straight from its nested statistics (see the module rules)."""
    return torch.cuda.memory_stats_as_nested_dict(device)["allocated_bytes"]["all"]


class StackSegment:
    """The per-request activation budget, and on CUDA the MemPool activations live in."""

    def __init__(self, capacity_nbytes: int, device: torch.device, lock: threading.RLock) -> None:
        self.name = "stack"
        self.device = device
        self.capacity_nbytes = capacity_nbytes
        self.pool = torch.cuda.MemPool() if device.type == "cuda" else None
        self.lock = lock  # guards the figures below
        self.active: StackScope | None = None  # worker only
        self.last_peak_nbytes = 0
        self.max_peak_nbytes = 0
        self.requests = 0
        self.over_budget = 0

    @contextmanager
    def scope(self, reserve_nbytes: int = 0) -> Iterator[StackScope]:
        """Run one request's activations in the stack; records its peak bytes on exit."""
        if self.active is not None:
            raise Busy("stack_scope() is already active on this device: one request at a time, scopes do not nest")
        scope = StackScope(reserve_nbytes=reserve_nbytes, peak_nbytes=reserve_nbytes)
        self.active = scope
        try:
            if self.pool is not None:
                torch.cuda.reset_peak_memory_stats(self.device)
                base = _allocated_bytes(self.device)["current"]
                try:
                    with torch.cuda.use_mem_pool(self.pool, self.device):
                        yield scope
                finally:
                    measured = _allocated_bytes(self.device)["peak"] - base
                    scope.peak_nbytes = max(scope.peak_nbytes, measured)
            else:
                yield scope
        finally:
            self.active = None
            with self.lock:
                self.requests += 1
                self.last_peak_nbytes = scope.peak_nbytes
                self.max_peak_nbytes = max(self.max_peak_nbytes, scope.peak_nbytes)
                if scope.peak_nbytes > self.capacity_nbytes:
                    self.over_budget += 1

    def stat(self) -> SegmentStat:
        """Call with the lock held. used = the last request's peak; free = what a request may still use."""
        used = self.last_peak_nbytes
        free = max(0, self.capacity_nbytes - used)
        return SegmentStat(self.capacity_nbytes, used, free, free)

    def extra_stat(self) -> dict[str, int]:
        return {"peak_nbytes": self.max_peak_nbytes, "requests": self.requests, "over_budget": self.over_budget}
