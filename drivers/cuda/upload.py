"""Host tensors to the device without waiting for the device.

A blocking `tensor.to("cuda")` from pageable memory (what arrives off the wire) waits for the whole stream
to drain before it returns: behind a queued forward, a request's token ids would wait for that forward's
kernels to finish, and the worker with them. `to_device` stages the bytes in page-locked memory from torch's
caching host allocator and queues an asynchronous copy; the allocator keeps the staging block until that
copy has run, so the caller may drop it at once.
"""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(t: torch.Tensor, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """`t` on `device` (into `out` when given, which must have `t`'s shape and dtype), queued on the current
    stream without a host wait. A tensor already on `device` (or any tensor when `device` is not CUDA) is
    copied or returned the plain way."""
    if device.type != "cuda" or not t.is_cpu:
        return t.to(device) if out is None else out.copy_(t)
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t)
    if out is None:
        return staged.to(device, non_blocking=True)
    return out.copy_(staged, non_blocking=True)
