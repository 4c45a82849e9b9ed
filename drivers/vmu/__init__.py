"""drivers/vmu: the memory manager of one device.

Segments (Text: model weights; Data: session arenas; Stack: one request's
activations; Host pool: paged-out arenas and checkpoints), the pure range
allocator under them, and paging and checkpoints on copy streams. The device
worker owns a VMU; only `VMU.stat()` may be called from another thread.
"""

from .allocator import RangeAllocator
from .arena import Arena
from .jobs import HostCopy, PageJob
from .oom import is_torch_oom, oom_from_torch, translating_oom
from .segments import Segment, SegmentStat
from .sizes import device_free_nbytes, host_available_nbytes, parse_size, resolve_device, resolve_size
from .stack import StackScope, StackSegment
from .vmu import DEFAULTS, VMU

__all__ = [
    "VMU", "DEFAULTS", "Arena", "PageJob", "HostCopy", "RangeAllocator",
    "Segment", "SegmentStat", "StackSegment", "StackScope",
    "resolve_device", "parse_size", "resolve_size", "device_free_nbytes", "host_available_nbytes",
    "oom_from_torch", "is_torch_oom", "translating_oom",
]
