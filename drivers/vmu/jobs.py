"""Copy jobs: what page_out, page_in, snapshot and restore return at once, before the copy ends.

Rules: `query()` never blocks; `wait()` blocks the calling thread on this job's fence
only (call it off the event loop), and `sleep()` does so without spinning a CPU;
`seconds` is None until the copy is known to be done, then the copy's own duration
(CUDA: between two timing events on the copy stream; CPU: on the copy thread). A job
reports itself done to the VMU's swap statistics exactly once, from whichever thread
sees it finish first.
"""

from __future__ import annotations

from typing import Callable

from .streams import Backend, Fence

__all__ = ["PageJob", "HostCopy"]


class PageJob:
    """One asynchronous copy of `nbytes` bytes. kind: page_out, page_in, snapshot or restore."""

    __slots__ = ("kind", "session", "nbytes", "_start", "_end", "_seconds", "_on_done", "accounted")

    def __init__(
        self, kind: str, session: object, nbytes: int, start: Fence, end: Fence,
        on_done: Callable[["PageJob"], None],
    ) -> None:
        self.kind = kind
        self.session = session
        self.nbytes = nbytes
        self._start = start
        self._end = end  # completes when the copy has finished
        self._seconds: float | None = None
        self._on_done = on_done
        self.accounted = False  # set by the VMU under its lock, once

    @property
    def fence(self) -> Fence:
        return self._end

    def query(self) -> bool:
        """True once the copy has finished. Never blocks."""
        if self._seconds is not None:
            return True
        if not self._end.query():
            return False
        self._finish()
        return True

    def wait(self) -> None:
        """Block until the copy has finished (this fence only, never the device), spinning on CUDA."""
        if self._seconds is None:
            self._end.wait()
            self._finish()

    def sleep(self) -> None:
        """wait(), for a thread that waits in the background: it blocks without keeping a CPU busy, at the
        price of some microseconds more to wake."""
        if self._seconds is None:
            self._end.sleep()
            self._finish()

    @property
    def done(self) -> bool:
        return self.query()

    @property
    def seconds(self) -> float | None:
        """The copy's duration in seconds once done, else None."""
        self.query()
        return self._seconds

    def _finish(self) -> None:
        self._seconds = Backend.elapsed_s(self._start, self._end)
        self._on_done(self)

    def __repr__(self) -> str:
        state = f"{self._seconds * 1e3:.3f} ms" if self._seconds is not None else "in flight"
        return f"<{type(self).__name__} {self.kind} {self.session!r} {self.nbytes} B {state}>"


class HostCopy(PageJob):
    """A checkpoint: a copy of an arena's used bytes in the host pool (vmu.snapshot). It is a job
    (the snapshot copy) and a handle: restore() reads it, free_host() gives its range back."""

    __slots__ = ("host_offset", "_last_use", "live")

    def __init__(self, session: object, nbytes: int, host_offset: int | None, start: Fence, end: Fence,
                 on_done: Callable[[PageJob], None]) -> None:
        super().__init__("snapshot", session, nbytes, start, end, on_done)
        self.host_offset = host_offset  # owned by the VMU; None when nbytes == 0
        self._last_use = end  # the latest copy reading this range (the snapshot, then each restore)
        self.live = True  # False once freed with free_host
