"""Turning torch's out-of-memory exceptions into the driver's OutOfMemory (errno ENOMEM).

Rules: a real allocation failure anywhere in a driver must reach the kernel as
OutOfMemory with the figures it carries, never as a crash of the worker.
`oom_from_torch` builds one from a caught exception; `translating_oom` is the
`with` form. The largest free range of the CUDA caching allocator is not known
from outside, so it is reported as the device's free memory (an upper bound).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch

from ..errors import OutOfMemory

__all__ = ["oom_from_torch", "is_torch_oom", "translating_oom"]

_TRIED_RE = re.compile(r"Tried to allocate ([\d.]+) ?(B|KiB|MiB|GiB|TiB|bytes)", re.IGNORECASE)
_CPU_RE = re.compile(r"(?:can't allocate memory|not enough memory).*?(\d+) bytes", re.IGNORECASE | re.DOTALL)
_UNIT = {"b": 1, "bytes": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def is_torch_oom(exc: BaseException) -> bool:
    """True for torch.OutOfMemoryError (CUDA) and for the CPU allocator's RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


def _requested_from(text: str) -> int | None:
    m = _TRIED_RE.search(text)
    if m:
        return int(float(m.group(1)) * _UNIT[m.group(2).lower()])
    m = _CPU_RE.search(text)
    return int(m.group(1)) if m else None


def oom_from_torch(
    exc: BaseException, what: str, *, requested_nbytes: int | None = None, device: torch.device | str | None = None,
) -> OutOfMemory:
    """An OutOfMemory describing `exc` (a torch OOM). Figures unknown to torch are reported as 0."""
    text = str(exc)
    requested = requested_nbytes if requested_nbytes is not None else (_requested_from(text) or 0)
    free = 0
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        try:
            free = int(torch.cuda.mem_get_info(dev)[0])
        except RuntimeError:
            free = 0
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return OutOfMemory(
        what, requested_nbytes=requested, largest_free_nbytes=free, total_free_nbytes=free,
        hint=f"torch could not allocate ({first_line[:160]}); lower the segment sizes in the config, or free "
             "sessions and models",
    )


@contextmanager
def translating_oom(
    what: str, *, requested_nbytes: int | None = None, device: torch.device | str | None = None,
) -> Iterator[None]:
    """Re-raise a torch OOM inside the block as OutOfMemory (chained to the original)."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_torch_oom(e):
            raise
        raise oom_from_torch(e, what, requested_nbytes=requested_nbytes, device=device) from e
