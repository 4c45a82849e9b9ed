"""Arena: one session's range of the Data segment, addressed through tensor views.

Rules:
  - Views are taken with `view(dtype, shape, offset)`; their storage lies inside the
    arena's range of the Data segment. A view is valid until `generation` changes
    (grow-by-move, page-in): re-take views when it does.
  - `used_nbytes` is a high-water mark raised by `mark_used(end_offset)`: paging and
    snapshots copy exactly [0, used_nbytes). Bytes past it are not preserved.
  - A swapped arena (residency "host") has no device range: view() and mark_used()
    raise Busy. A freed arena (residency "none") raises NotFound.
  - Only the VMU changes residency, offset, nbytes and generation, on the device
    worker under its lock. `mark_used` is a single int store by the worker, no lock.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import BadArgument, Busy, NotFound

if TYPE_CHECKING:
    from .streams import Fence
    from .vmu import VMU

__all__ = ["Arena"]


class Arena:
    """A session's memory. Create with `vmu.alloc_arena(session, nbytes)`, never directly."""

    __slots__ = (
        "id", "session", "nbytes", "used_nbytes", "residency", "generation",
        "offset", "host_offset", "home_offset", "_vmu", "_fence", "_in_fence", "_touched", "_stream",
    )

    def __init__(self, vmu: "VMU", arena_id: int, session: object, offset: int, nbytes: int) -> None:
        self.id = arena_id
        self.session = session
        self.nbytes = nbytes  # reserved bytes (a multiple of the Data segment's alignment)
        self.used_nbytes = 0  # high-water mark of bytes written, <= nbytes
        self.residency = "device"  # "device" | "host" | "none" (freed)
        self.generation = 0  # bumped whenever the storage moves
        self.offset: int | None = offset  # byte offset in the Data segment; None unless resident
        self.host_offset: int | None = None  # byte offset in the host pool while swapped (None if nothing used)
        self.home_offset: int | None = None  # while swapped: the Data offset it left, where page_in tries first
        self._vmu = vmu
        self._fence: Fence | None = None  # the latest copy (copy stream or move) that reads or writes the range
        self._in_fence: Fence | None = None  # a copy into the range that compute has not yet been ordered after
        self._touched = False  # a view was taken since the range was (re)assigned: compute may be using it
        self._stream: Any = None  # CUDA: the stream current at the last view(); the default compute stream

    # ------------------------------------------------------------------ views
    def view(self, dtype: torch.dtype, shape: Sequence[int] | int, offset: int = 0) -> torch.Tensor:
        """A contiguous tensor of `dtype` and `shape` over arena bytes [offset, offset + its nbytes).

        Raises BadArgument if it does not fit or `offset` is not a multiple of the dtype's size,
        Busy if the arena is swapped out, NotFound if it was freed. If a page-in into this arena is
        still in flight, orders the current compute after it first (CUDA: a GPU-side wait)."""
        self._require_resident("take a view of")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        itemsize = dtype.itemsize
        nbytes = math.prod(shape) * itemsize
        if offset < 0 or offset % itemsize or offset + nbytes > self.nbytes:
            raise BadArgument(
                f"arena of session {self.session!r}: a {dtype} view of shape {list(shape)} at offset {offset} "
                f"needs bytes [{offset}, {offset + nbytes}) aligned to {itemsize}; the arena has {self.nbytes} bytes"
            )
        self._used_by_compute()
        assert self.offset is not None
        start = self.offset + offset
        return self._vmu.data.tensor[start : start + nbytes].view(dtype).view(shape)  # a slice: see Segment.bytes_at

    @property
    def compute_stream(self) -> Any:
        """CUDA: the stream current at the last view() or touch(), that is, where compute last used the
        arena (work on another stream that reads it must wait for this one); None on the CPU or before."""
        return self._stream

    def touch(self) -> None:
        """What view() does besides making a view, for a caller that keeps views taken at this `generation`:
        compute about to use the arena on the current stream is ordered after a page-in still in flight,
        and the stream is noted for the next page-out. Raises Busy if swapped out, NotFound if freed."""
        self._require_resident("use")
        self._used_by_compute()

    def _used_by_compute(self) -> None:
        vmu = self._vmu
        if vmu.is_cuda:
            self._stream = vmu.current_stream()
        if self._in_fence is not None:
            vmu.backend.compute_wait(self._in_fence, self._stream)
            self._in_fence = None
        self._touched = True

    def bytes(self, nbytes: int | None = None, offset: int = 0) -> torch.Tensor:
        """uint8 view of [offset, offset + nbytes) (default: up to the end of the arena)."""
        return self.view(torch.uint8, (self.nbytes - offset) if nbytes is None else nbytes, offset)

    def mark_used(self, end_offset: int) -> None:
        """Raise the high-water mark to `end_offset` (bytes [0, end_offset) hold live data)."""
        self._require_resident("mark bytes used in")
        if not 0 <= end_offset <= self.nbytes:
            raise BadArgument(f"arena of session {self.session!r}: used end {end_offset} outside [0, {self.nbytes}]")
        if end_offset > self.used_nbytes:
            self.used_nbytes = end_offset

    def reset_used(self, end_offset: int = 0) -> None:
        """Lower the high-water mark (the caller discards bytes past `end_offset`, e.g. a truncated KV cache)."""
        self._require_resident("reset the used bytes of")
        if not 0 <= end_offset <= self.nbytes:
            raise BadArgument(f"arena of session {self.session!r}: used end {end_offset} outside [0, {self.nbytes}]")
        self.used_nbytes = end_offset

    def ready(self, stream: Any = None) -> None:
        """Order compute on `stream` (default: current) after any copy into this arena still in flight."""
        self._require_resident("wait for")
        if self._in_fence is not None:
            self._vmu.backend.compute_wait(self._in_fence, stream)
            self._in_fence = None

    def device_range(self) -> tuple[int, int]:
        """(first, one past last) device address of the arena's range; for checks and debugging."""
        self._require_resident("address")
        assert self.offset is not None
        base = self._vmu.data.base_ptr + self.offset
        return base, base + self.nbytes

    # --------------------------------------------------------------- helpers
    def _require_resident(self, doing: str) -> None:
        if self.residency == "device":
            return
        if self.residency == "host":
            raise Busy(f"cannot {doing} the arena of session {self.session!r}: it is swapped out to the host "
                       "pool; page it in first")
        raise NotFound(f"cannot {doing} the arena of session {self.session!r}: it was freed")

    def stat(self) -> dict[str, object]:
        return {"session": self.session, "nbytes": self.nbytes, "used_nbytes": self.used_nbytes,
                "residency": self.residency, "generation": self.generation}

    def __repr__(self) -> str:
        return (f"<Arena {self.id} session={self.session!r} {self.used_nbytes}/{self.nbytes} B "
                f"{self.residency} gen={self.generation}>")
