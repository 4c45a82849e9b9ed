"""Paging and checkpoints: the copies between an arena's device range and the host pool.

Rules (the VMU's module docstring gives the general ones):
  - Only [0, used_nbytes) is copied. page_out/snapshot run on the d2h copy stream,
    page_in/restore on the h2d stream. Each waits first for the compute queued on
    the arena (a fence on its compute stream) and for the arena's last copy.
  - A range a copy reads or writes is retired behind the copy's end fence, never
    freed at once; page_in of an arena whose page-out is still in flight simply
    waits on that page-out's fence.
  - Every op allocates, enqueues and updates the arena in one hold of the lock, so
    a stat() snapshot is consistent; only waiting for room (retired ranges) and CPU
    "compute waits" happen outside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import BadArgument, Busy, NotFound
from .jobs import HostCopy, PageJob

if TYPE_CHECKING:
    from .arena import Arena
    from .vmu import VMU

__all__ = ["PagingMixin"]


class PagingMixin:
    """The paging half of VMU (kept in its own module for size). Not usable on its own."""

    def page_out(self: "VMU", arena: "Arena", *, stream: Any = None) -> PageJob:
        """Copy [0, used_nbytes) to the host pool and retire the device range behind the copy; residency
        becomes "host" at once. Busy if already swapped; OutOfMemory (nothing changed) if the pool is full."""
        self._require_live(arena)
        if arena.residency != "device":
            raise Busy(f"page_out: the arena of session {arena.session!r} is already swapped out")
        n = arena.used_nbytes
        while True:
            with self._lock:
                copied = self._copy_to_host(arena, n, stream)
                if copied is not None:
                    host_offset, start, end = copied
                    job = PageJob("page_out", arena.session, n, start, end, self._account)
                    self._retire(self.data, arena.offset, end, fresh=True)
                    arena.home_offset = arena.offset
                    arena.offset, arena.host_offset, arena.residency = None, host_offset, "host"
                    arena._fence, arena._in_fence, arena._touched = end, None, False
                    self._jobs.append(job)
                    return job
            self._wait_for_room(self.host)

    def page_in(self: "VMU", arena: "Arena") -> PageJob:
        """Copy the arena back into a device range (after its page-out, even one in flight). residency becomes
        "device" at once; the next view() orders compute after the copy.

        The arena goes back to the range it left when that range is free again: its device addresses are
        then what they were, `generation` stays, and whatever was built on those addresses (views, CUDA
        graphs) stays valid; bytes past used_nbytes read as zero (they were not preserved, and another
        arena may have used the range meanwhile). Otherwise it gets a new range and `generation` is bumped.
        Busy if resident; OutOfMemory (still swapped) if the Data segment has no room."""
        self._require_live(arena)
        if arena.residency != "host":
            raise Busy(f"page_in: the arena of session {arena.session!r} is already on the device")
        n, host_offset, home = arena.used_nbytes, arena.host_offset, arena.home_offset
        while True:
            with self._lock:
                offset = None
                if home is not None:
                    if self._retired or self._jobs:
                        self._reap()
                    if self.data.allocator.alloc_at(home, arena.nbytes):
                        offset = home
                if offset is None:
                    offset = self._locked_alloc(self.data, arena.nbytes)
                if offset is not None:
                    s = self._h2d
                    if arena._fence is not None:
                        s.wait(arena._fence)
                    start = s.record()
                    if n:
                        s.copy(self.data, offset, self.host, host_offset, n)
                    if offset == home and n < arena.nbytes:
                        s.zero(self.data, offset + n, arena.nbytes - n)
                    end = s.record(sleepable=True)
                    job = PageJob("page_in", arena.session, n, start, end, self._account)
                    if host_offset is not None:
                        self._retire(self.host, host_offset, end, fresh=True)
                    arena.offset, arena.host_offset, arena.residency = offset, None, "device"
                    arena.home_offset = None
                    if offset != home:
                        arena.generation += 1
                    arena._fence, arena._in_fence, arena._touched = end, end, False
                    self._jobs.append(job)
                    return job
            self._wait_for_room(self.data)

    def snapshot(self: "VMU", arena: "Arena", *, stream: Any = None, ordered: bool = True) -> HostCopy:
        """A checkpoint: copy [0, used_nbytes) into the host pool; returns at once. With `ordered`, later
        compute on the arena waits for the copy (CUDA: GPU-side; CPU: this call blocks if the arena has
        been viewed), so a write below used_nbytes cannot race it; ordered=False is for callers that
        only append past used_nbytes until the copy is done. Busy if swapped; OutOfMemory if full."""
        self._require_live(arena)
        if arena.residency != "device":
            raise Busy(f"snapshot: the arena of session {arena.session!r} is swapped out; page it in first")
        n = arena.used_nbytes
        stream = stream if stream is not None else arena._stream
        while True:
            with self._lock:
                copied = self._copy_to_host(arena, n, stream)
                if copied is not None:
                    host_offset, start, end = copied
                    copy = HostCopy(arena.session, n, host_offset, start, end, self._account)
                    touched = arena._touched
                    if ordered and not touched:
                        arena._in_fence = end  # no compute on it yet: the next view() waits for the copy
                    arena._fence = end
                    self._jobs.append(copy)
                    break
            self._wait_for_room(self.host)
        if ordered and touched:
            self.backend.compute_wait(end, stream)
        return copy

    def restore(self: "VMU", arena: "Arena", host_copy: HostCopy, *, stream: Any = None) -> PageJob:
        """Copy a checkpoint back into the resident arena from offset 0, after the snapshot and the arena's
        queued compute; later compute waits for it. used_nbytes becomes the checkpoint's size; generation
        is unchanged. BadArgument if it does not fit (grow the arena first); Busy if the arena is swapped;
        NotFound if the checkpoint was freed."""
        self._require_live(arena)
        if not host_copy.live:
            raise NotFound(f"restore: the checkpoint of session {host_copy.session!r} was freed")
        if arena.residency != "device":
            raise Busy(f"restore: the arena of session {arena.session!r} is swapped out; page it in first")
        n = host_copy.nbytes
        if n > arena.nbytes:
            raise BadArgument(f"restore: the checkpoint holds {n} bytes but the arena of session "
                              f"{arena.session!r} has {arena.nbytes}; grow the arena first")
        stream = stream if stream is not None else arena._stream
        with self._lock:
            s = self._h2d
            s.wait(host_copy._last_use)
            self._wait_for_arena(s, arena, stream)
            start = s.record()
            if n:
                s.copy(self.data, arena.offset, self.host, host_copy.host_offset, n)
            end = s.record(sleepable=True)
            job = PageJob("restore", arena.session, n, start, end, self._account)
            arena.used_nbytes = n
            arena._fence, arena._in_fence = end, None
            host_copy._last_use = end
            self._jobs.append(job)
        self.backend.compute_wait(end, stream)
        return job

    def free_host(self: "VMU", host_copy: HostCopy) -> None:
        """Give a checkpoint's host range back, once the copies reading or writing it are done.
        NotFound if already freed."""
        with self._lock:
            if not host_copy.live:
                raise NotFound(f"free_host: the checkpoint of session {host_copy.session!r} was already freed")
            host_copy.live = False
            if host_copy.host_offset is not None:
                self._retire(self.host, host_copy.host_offset, host_copy._last_use)
                host_copy.host_offset = None

    def _copy_to_host(self: "VMU", arena: "Arena", n: int, stream: Any) -> tuple[int | None, Any, Any] | None:
        """Lock held. Enqueue the copy of the arena's first `n` bytes into a new host range on the d2h
        stream, after the arena's queued compute and last copy: (host offset, or None when n is 0; start
        fence; end fence). None if the host pool has no room now but retired ranges are coming back."""
        host_offset = self._locked_alloc(self.host, n) if n else 0
        if host_offset is None:
            return None
        s = self._d2h
        self._wait_for_arena(s, arena, stream)
        start = s.record()
        if n:
            s.copy(self.host, host_offset, self.data, arena.offset, n)
        return (host_offset if n else None), start, s.record(sleepable=True)

    def _wait_for_arena(self: "VMU", s: Any, arena: "Arena", stream: Any) -> None:
        """Make copy stream `s` wait for the compute queued on the arena and for its last copy."""
        if arena._touched:
            s.wait(self.backend.compute_fence(stream if stream is not None else arena._stream))
        if arena._fence is not None:
            s.wait(arena._fence)
