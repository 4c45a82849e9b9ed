"""The VMU: the segments of one device, session arenas, paging and checkpoints.

Rules:
  - Every method except stat() runs on the device worker thread. stat() may run on
    any thread: it takes the lock that every mutation holds and copies numbers out.
    An op allocates, enqueues its copy and updates its books in one hold of the lock,
    so a snapshot is consistent; nothing waits on the device with the lock held.
  - Copies to and from the host pool run on two copy streams (device-to-host,
    host-to-device) and are ordered with fences (CUDA events), never with a
    device-wide synchronize. Compute is named by `stream` (default: the stream the
    arena's last view was taken on, else the current stream).
  - A range whose contents a copy still reads or writes is never handed out again:
    it is retired with that copy's fence and returns to its allocator once the fence
    has passed. An allocation that finds no room waits for retired ranges first.
  - Nothing is ever dropped: a copy that cannot get host memory raises OutOfMemory
    and leaves the arena where it was.
"""

from __future__ import annotations

import itertools
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ..cuda import current_stream_id
from ..errors import BadArgument, NotFound, OutOfMemory
from .arena import Arena
from .jobs import PageJob
from .paging import PagingMixin
from .segments import Segment, allocate_segment_tensor
from .sizes import device_free_nbytes, format_nbytes, host_available_nbytes, resolve_size
from .stack import StackScope, StackSegment
from .streams import Fence, make_backend

__all__ = ["VMU", "DEFAULTS"]

# Segment sizes used when the config gives none: fractions of the memory free at boot.
DEFAULTS: dict[str, int | float | str] = {
    "text": "0.3", "data": "0.5", "stack": "0.1", "host": "0.25", "session_arena": "64MiB",
}
ALIGN = 256  # every range starts on this boundary: enough for any dtype and for CUDA's vectorised kernels


@dataclass(slots=True)
class _Retired:
    segment: Segment
    offset: int
    nbytes: int
    fence: Fence


class VMU(PagingMixin):
    """The memory manager of one device ("cpu", "cuda", "cuda:N"). Sizes: bytes, "4GiB", or "0.5"
    (a fraction of the memory free at boot; the host pool's fraction is of available RAM).
    page_out, page_in, snapshot, restore and free_host live in paging.py."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        *,
        text_nbytes: int | float | str = DEFAULTS["text"],
        data_nbytes: int | float | str = DEFAULTS["data"],
        stack_nbytes: int | float | str = DEFAULTS["stack"],
        host_nbytes: int | float | str = DEFAULTS["host"],
        session_arena_nbytes: int | float | str = DEFAULTS["session_arena"],
        align: int = ALIGN,
    ) -> None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type not in ("cpu", "cuda"):
            raise BadArgument(f"VMU device {device!r}: only 'cpu' and 'cuda[:N]' are supported")
        self.device = dev
        self.is_cuda = dev.type == "cuda"
        self._streams_by_id: dict[Any, Any] = {}  # worker only: current_stream()'s Stream objects
        free = device_free_nbytes(dev)
        host_free = host_available_nbytes()
        text, data, stack = (resolve_size(s, available_nbytes=free) for s in (text_nbytes, data_nbytes, stack_nbytes))
        host = resolve_size(host_nbytes, available_nbytes=host_free)
        self.session_arena_nbytes = resolve_size(session_arena_nbytes, available_nbytes=data)
        if self.is_cuda and text + data + stack > free:
            raise OutOfMemory("device segments (text + data + stack)", requested_nbytes=text + data + stack,
                              largest_free_nbytes=free, total_free_nbytes=free,
                              hint=f"the device has {format_nbytes(free)} free; lower the segment sizes")
        self._lock = threading.RLock()  # guards every allocator, arena field and counter below
        self.backend = make_backend(dev)
        self.text = Segment("text", allocate_segment_tensor(text, dev, what="text segment"),
                            align=align, lock=self._lock)  # the model driver: text.alloc / text.view / text.free
        self.data = Segment("data", allocate_segment_tensor(data, dev, what="data segment"),
                            align=align, lock=self._lock)
        self.stack = StackSegment(stack, dev, self._lock)
        host_dev = torch.device("cpu")
        self.host = Segment("host", allocate_segment_tensor(host, host_dev, what="host pool", pin=self.is_cuda),
                            align=align, lock=self._lock)
        self._d2h = self.backend.copy_stream("d2h")  # page-out, snapshot
        self._h2d = self.backend.copy_stream("h2d")  # page-in, restore
        self._ids = itertools.count(1)
        self._arenas: dict[int, Arena] = {}  # id -> live arena; guarded by _lock
        self._retired: list[_Retired] = []  # ranges waiting for their fence; guarded by _lock
        self._jobs: list[PageJob] = []  # copies not yet seen done; guarded by _lock
        self._copies = {k: {"bytes": 0, "ops": 0, "seconds": 0.0}
                        for k in ("page_out", "page_in", "snapshot", "restore")}  # guarded by _lock
        self._closed = False

    @classmethod
    def from_config(
        cls, device: str | torch.device, *, text: int | float | str = DEFAULTS["text"],
        data: int | float | str = DEFAULTS["data"], stack: int | float | str = DEFAULTS["stack"],
        host: int | float | str = DEFAULTS["host"], session_arena: int | float | str = DEFAULTS["session_arena"],
    ) -> "VMU":
        """The kernel's constructor: sizes as its config parsed them (int bytes or float fractions)."""
        return cls(device, text_nbytes=text, data_nbytes=data, stack_nbytes=stack, host_nbytes=host,
                   session_arena_nbytes=session_arena)

    @property
    def stack_budget_nbytes(self) -> int:
        """The Stack segment's capacity: the most activation bytes one request should need."""
        return self.stack.capacity_nbytes

    # ------------------------------------------------------------- arenas
    def can_allocate(self, nbytes: int) -> bool:
        """Whether alloc_arena(…, nbytes) would succeed now without waiting for retired ranges."""
        with self._lock:
            return self.data.allocator.largest_free_nbytes >= self.data.allocator.round_up(nbytes)

    def alloc_arena(self, session: object, nbytes: int | None = None) -> Arena:
        """Reserve an arena of `nbytes` (default: session_arena_nbytes) in the Data segment.
        OutOfMemory if no range is large enough even after retired ranges are reclaimed."""
        if nbytes is None:
            nbytes = self.session_arena_nbytes
        # The hot path of session churn: the lock is taken with acquire/release (half the cost of `with`
        # on an RLock), and with nothing retired or in flight the allocator is asked directly, as
        # _locked_alloc would (its OutOfMemory is then final: no retired range can come back).
        lock = self._lock
        while True:
            lock.acquire()
            try:
                allocator = self.data.allocator
                if self._retired or self._jobs:
                    offset = self._locked_alloc(self.data, nbytes)
                else:
                    offset = allocator.alloc(nbytes)
                if offset is not None:
                    align = allocator.align  # the arena gets the whole range: nbytes rounded up as alloc did
                    arena = Arena(self, next(self._ids), session, offset, (nbytes + align - 1) & -align)
                    self._arenas[arena.id] = arena
                    return arena
            finally:
                lock.release()
            self._wait_for_room(self.data)

    def free_arena(self, arena: Arena, *, stream: Any = None) -> None:
        """Give the arena's memory back, once the work in flight on it is done. NotFound if already freed."""
        arenas = self._arenas
        if arenas.get(arena.id) is not arena:
            self._require_live(arena)  # raises NotFound
        release = None
        if arena.residency == "device" and (arena._touched or arena._fence is not None):
            release = self._release_fence(arena, stream)
        lock = self._lock
        lock.acquire()  # not `with`: see alloc_arena
        try:
            if arena.offset is not None:
                if release is None:
                    self.data.allocator.free(arena.offset)  # nothing in flight: _retire would free it at once
                else:
                    self._retire(self.data, arena.offset, release)
            if arena.host_offset is not None:
                self._retire(self.host, arena.host_offset, arena._fence)  # a page-out may still write it
            arena.offset = arena.host_offset = None
            arena.residency = "none"
            del arenas[arena.id]
        finally:
            lock.release()

    def grow_arena(self, arena: Arena, nbytes: int, *, stream: Any = None) -> Arena:
        """Grow the arena to `nbytes`, preserving [0, used_nbytes). In place when the next range is free;
        else moved (the copy runs on the compute stream, and the next view or touch() orders compute on any
        stream after it; `generation` is bumped). A swapped arena only
        has its reservation raised. BadArgument if `nbytes` is smaller; OutOfMemory if no room.
        While a move copies, stat() counts both ranges as used."""
        self._require_live(arena)
        if nbytes < arena.nbytes:
            raise BadArgument(f"grow_arena: {nbytes} bytes is smaller than the arena's {arena.nbytes}")
        if nbytes == arena.nbytes:
            return arena
        while True:
            with self._lock:
                if arena.residency == "host":
                    arena.nbytes = self.data.allocator.round_up(nbytes)
                    return arena
                self._reap()
                if self.data.allocator.try_extend(arena.offset, nbytes):
                    arena.nbytes = self.data.allocator.size_of(arena.offset)
                    return arena
                new_offset = self._locked_alloc(self.data, nbytes)
                if new_offset is not None:
                    break
            self._wait_for_room(self.data)
        stream = stream if stream is not None else arena._stream
        if arena._fence is not None:
            self.backend.compute_wait(arena._fence, stream)  # a copy into or out of the old range ends first
        n, old = arena.used_nbytes, arena.offset
        assert old is not None
        if n:
            with torch.cuda.stream(stream) if (self.is_cuda and stream is not None) else nullcontext():
                self.data.bytes_at(new_offset, n).copy_(self.data.bytes_at(old, n))
        moved = self.backend.compute_fence(stream)
        with self._lock:
            self._retire(self.data, old, moved)
            arena.offset = new_offset
            arena.nbytes = self.data.allocator.size_of(new_offset)
            arena.generation += 1
            # Compute on the moved arena waits for the copy, whichever stream it runs on (a view or touch()).
            arena._fence, arena._in_fence, arena._touched = moved, moved, True
        return arena

    def current_stream(self) -> Any:
        """CUDA: the device's current stream (on the calling thread), the same object each time for a stream:
        `torch.cuda.current_stream` builds a new one in Python on every call. None on CPU."""
        if not self.is_cuda:
            return None
        stream_id = current_stream_id(self.device)
        stream = self._streams_by_id.get(stream_id)
        if stream is None:
            stream = self._streams_by_id[stream_id] = torch.cuda.current_stream(self.device)
        return stream

    # -------------------------------------------------------------- stack
    def stack_scope(self, reserve_nbytes: int = 0) -> AbstractContextManager[StackScope]:
        """Context manager the worker wraps each request in; see drivers/vmu/stack.py."""
        return self.stack.scope(reserve_nbytes)

    # --------------------------------------------------------------- stat
    def stat(self, *, arenas: bool = True) -> dict[str, Any]:
        """Plain numbers, safe from any thread: memory.segments, memory.swap and (optionally) arenas."""
        with self._lock:
            segments = {seg.name: seg.stat().as_dict() for seg in (self.text, self.data, self.stack, self.host)}
            segments["stack"].update(self.stack.extra_stat())
            segments["data"]["fragmentation"] = self.data.allocator.fragmentation
            segments["host"]["fragmentation"] = self.host.allocator.fragmentation
            c = self._copies
            out = {
                "device": str(self.device),
                "segments": segments,
                "swap": {"out": dict(c["page_out"]), "in": dict(c["page_in"])},
                "checkpoint": {"out": dict(c["snapshot"]), "in": dict(c["restore"])},
                "stack": {"capacity_nbytes": self.stack.capacity_nbytes,
                          "last_peak_nbytes": self.stack.last_peak_nbytes, **self.stack.extra_stat()},
                "copies_in_flight": len(self._jobs),
                "n_arenas": len(self._arenas),
            }
            if arenas:
                out["arenas"] = [a.stat() for a in self._arenas.values()]
        return out

    def finish(self, job: PageJob) -> None:
        """Worker: wait for `job` (if still in flight), then reclaim whatever its copy was holding."""
        job.wait()
        self.poll()

    def poll(self) -> None:
        """Reclaim ranges whose copies are done and account finished jobs. The worker may call it when idle."""
        with self._lock:
            self._reap()

    def close(self) -> None:
        """Wait for every copy in flight, stop the copy streams and give back the Stack's MemPool. Call it on
        the device worker. The VMU is unusable after."""
        if self._closed:
            return
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.wait()
        self.poll()
        self.backend.close()
        self.stack.close()
        self._closed = True

    def __enter__(self) -> "VMU":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ helpers
    def _require_live(self, arena: Arena) -> None:
        if self._arenas.get(arena.id) is not arena:
            raise NotFound(f"the arena of session {arena.session!r} was freed or belongs to another VMU")

    def _locked_alloc(self, seg: Segment, nbytes: int) -> int | None:
        """Lock held. A range of `seg`; None if there is no room now but retired ranges of `seg` are
        coming back (the caller releases the lock, calls _wait_for_room, retries); OutOfMemory if not."""
        if self._retired or self._jobs:
            self._reap()
        try:
            return seg.allocator.alloc(nbytes)
        except OutOfMemory:
            if any(r.segment is seg for r in self._retired):
                return None
            raise

    def _wait_for_room(self, seg: Segment) -> None:
        """Lock NOT held. Block until the oldest retired range of `seg` may come back (that copy only)."""
        with self._lock:
            fence = next((r.fence for r in self._retired if r.segment is seg), None)
        if fence is not None:
            fence.wait()

    def _retire(self, seg: Segment, offset: int, fence: Fence | None, *, fresh: bool = False) -> None:
        """Return [offset, …) to `seg` once `fence` has passed. Lock held. `fresh`: the fence was recorded just
        now, behind a copy, so asking whether it has passed is not worth a call (a later _reap frees it)."""
        if fence is None or (not fresh and fence.query()):
            seg.allocator.free(offset)
            return
        nbytes = seg.allocator.size_of(offset)
        seg.pending_free_nbytes += nbytes
        self._retired.append(_Retired(seg, offset, nbytes, fence))

    def _reap(self) -> None:
        """Free retired ranges and account jobs whose fences have passed. Lock held."""
        if self._retired:
            keep = []
            for r in self._retired:
                if r.fence.query():
                    r.segment.allocator.free(r.offset)
                    r.segment.pending_free_nbytes -= r.nbytes
                else:
                    keep.append(r)
            self._retired = keep
        if self._jobs:
            self._jobs = [job for job in self._jobs if not job.query()]

    def _account(self, job: PageJob) -> None:
        """Called once a job is seen done, from any thread."""
        with self._lock:
            if job.accounted:
                return
            job.accounted = True
            c = self._copies[job.kind]
            c["bytes"] += job.nbytes
            c["ops"] += 1
            c["seconds"] += job._seconds or 0.0

    def _release_fence(self, arena: Arena, stream: Any) -> Fence | None:
        """A fence after which nothing reads or writes the arena's device range (None: nothing in flight)."""
        copy = arena._fence if arena._fence is not None and not arena._fence.query() else None
        if not arena._touched:
            return copy
        stream = stream if stream is not None else arena._stream
        if copy is not None:
            if not self.is_cuda:
                return copy  # CPU compute is synchronous: only the copy can still be in flight
            self.backend.compute_wait(copy, stream)
        return self.backend.compute_fence(stream)

