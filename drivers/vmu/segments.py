"""Segments: one preallocated uint8 tensor each, carved up by a RangeAllocator.

Rules:
  - A segment is allocated once, at boot, as one tensor; everything placed in it is
    a view of that tensor, so its data_ptr lies inside the segment.
  - On CPU the tensor comes from torch.empty: untouched pages cost nothing.
  - The host pool is pinned on CUDA machines (pageable memory registered with
    cudaHostRegister, so it is exactly the size asked for; torch's pinned allocator
    would round a 40 GiB request up to 64 GiB), pageable where there is no GPU.
  - Every mutation happens on the device worker and holds the VMU's lock, which
    stat() also takes from the loop thread.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import BadArgument, OutOfMemory
from .allocator import RangeAllocator
from .oom import translating_oom

__all__ = ["Segment", "SegmentStat", "allocate_segment_tensor"]

PAGE_NBYTES = 4096  # host page size assumed for pinning


@dataclass(frozen=True, slots=True)
class SegmentStat:
    """Plain numbers for stat(); the SEG shape of docs/INTERNALS.md plus extras."""

    capacity_nbytes: int
    used_nbytes: int
    free_nbytes: int
    largest_free_nbytes: int
    pending_free_nbytes: int = 0  # freed ranges waiting for a copy to finish (counted as used)

    def as_dict(self) -> dict[str, int]:
        return {
            "capacity_nbytes": self.capacity_nbytes, "used_nbytes": self.used_nbytes,
            "free_nbytes": self.free_nbytes, "largest_free_nbytes": self.largest_free_nbytes,
            "pending_free_nbytes": self.pending_free_nbytes,
        }


def allocate_segment_tensor(nbytes: int, device: torch.device, *, what: str, pin: bool = False) -> torch.Tensor:
    """One uint8 tensor of `nbytes` on `device` (page-locked host memory if `pin`). OutOfMemory if it cannot."""
    extra = PAGE_NBYTES if pin and nbytes else 0
    with translating_oom(what, requested_nbytes=nbytes, device=device):
        t = torch.empty(nbytes + extra, dtype=torch.uint8, device=device)
    if extra:
        t = t.narrow(0, (-t.data_ptr()) % PAGE_NBYTES, nbytes)  # page-aligned start, as cudaHostRegister likes
        _pin(t, what)
    return t


def _pin(t: torch.Tensor, what: str) -> None:
    """Page-lock `t` in place with cudaHostRegister; unregistered when `t` is collected."""
    cudart = torch.cuda.cudart()
    ptr, nbytes = t.data_ptr(), t.numel()
    rc = cudart.cudaHostRegister(ptr, nbytes, 0)
    if int(rc) != 0:
        raise OutOfMemory(f"{what} (pinning)", requested_nbytes=nbytes, largest_free_nbytes=0, total_free_nbytes=0,
                          hint=f"cudaHostRegister failed ({rc}); lower the host pool size or raise the memlock limit")
    weakref.finalize(t, cudart.cudaHostUnregister, ptr)


class Segment:
    """A named preallocated tensor and the allocator of its ranges."""

    def __init__(self, name: str, tensor: torch.Tensor, *, align: int, lock: threading.RLock) -> None:
        self.name = name
        self.tensor = tensor  # 1-D uint8; never replaced while the VMU lives
        self.device = tensor.device
        self.base_ptr: int = tensor.data_ptr()  # the address of byte 0 (0 on the meta device)
        self.allocator = RangeAllocator(tensor.numel(), align, name=f"{name} segment")
        self.lock = lock  # the VMU's lock; guards self.allocator and pending_free_nbytes
        self.pending_free_nbytes = 0  # guarded by lock

    @property
    def capacity_nbytes(self) -> int:
        return self.allocator.capacity

    def alloc(self, nbytes: int) -> int:
        """Offset of a new range of at least `nbytes` (rounded up to the alignment). OutOfMemory if full."""
        with self.lock:
            return self.allocator.alloc(nbytes)

    def free(self, offset: int) -> int:
        """Give back the range at `offset` at once. Its user must have no work in flight on it (for Text:
        the model driver drops its views and synchronises its stream before unloading)."""
        with self.lock:
            return self.allocator.free(offset)

    def bytes_at(self, offset: int, nbytes: int) -> torch.Tensor:
        """The uint8 view of [offset, offset + nbytes) of the segment (a range the caller got from the allocator).

        A slice rather than narrow(): the same view, through a shorter path in torch."""
        return self.tensor[offset : offset + nbytes]

    def view(self, dtype: torch.dtype, shape: Sequence[int] | int, offset: int = 0) -> torch.Tensor:
        """A contiguous `dtype` tensor of `shape` starting at byte `offset` of the segment (the Text segment's
        users take their weights this way: `off = text.alloc(n)`, `text.view(dtype, shape, off)`)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        itemsize = dtype.itemsize
        nbytes = math.prod(shape) * itemsize
        if offset % itemsize:
            raise BadArgument(f"{self.name}: offset {offset} is not a multiple of {dtype}'s size {itemsize}")
        if offset < 0 or offset + nbytes > self.tensor.numel():
            raise BadArgument(f"{self.name}: [{offset}, {offset + nbytes}) lies outside the segment")
        return self.tensor[offset : offset + nbytes].view(dtype).view(shape)

    def stat(self) -> SegmentStat:
        """Call with self.lock held (VMU.stat does)."""
        a = self.allocator
        return SegmentStat(a.capacity, a.used_nbytes, a.free_nbytes, a.largest_free_nbytes, self.pending_free_nbytes)
