"""The few CUDA driver API calls the copy streams make themselves (libcuda, through ctypes).

Why: a small page-out is bound by its fixed cost per call, and most of that cost was
torch's way of saying "copy these bytes on that stream": a tensor view of each range,
a switch of the thread's current stream, `copy_`'s dispatch, and an Event wrapper per
record. One `cuMemcpyAsync` on two addresses does the same copy (see docs/INTERNALS.md,
the VMU, for the figures).

Rules:
  - torch owns everything these calls name: the memory (the VMU's segment tensors), the
    streams (`Stream.cuda_stream`) and the events (`Event.cuda_event`). Only raw addresses
    and handles cross; nothing here allocates or frees.
  - Every call is checked: a non-zero CUresult raises DriverError (EIO) naming the call
    and the CUDA error.
  - Calls run in the device's primary context, the one torch's runtime uses. A thread
    whose current context is another one, or none (a thread that never touched CUDA),
    gets CUDA_ERROR_INVALID_CONTEXT or CUDA_ERROR_INVALID_HANDLE; the call is then made
    again with the primary context pushed for its duration, so the thread's own context
    is left as it was.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_ubyte, c_uint, c_uint64, c_void_p
from typing import Any, Callable

from ..errors import DriverError

__all__ = ["CudaDriver"]

_INVALID_CONTEXT = 201  # CUDA_ERROR_INVALID_CONTEXT
_INVALID_HANDLE = 400  # CUDA_ERROR_INVALID_HANDLE: a stream or event of another context
_RETRY_IN_CONTEXT = (_INVALID_CONTEXT, _INVALID_HANDLE)


class CudaDriver:
    """Bound entry points of libcuda for one device. Thread-safe (the driver API is)."""

    def __init__(self, device_index: int) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise DriverError(f"the VMU's copy streams need the CUDA driver library libcuda.so.1: {e}") from None
        self._lib = lib
        self._error_name = self._bind("cuGetErrorName", c_int, POINTER(c_char_p))
        self._memcpy = self._bind("cuMemcpyAsync", c_uint64, c_uint64, c_size_t, c_void_p)
        self._memset = self._bind("cuMemsetD8Async", c_uint64, c_ubyte, c_size_t, c_void_p)
        self._record = self._bind("cuEventRecord", c_void_p, c_void_p)
        self._wait = self._bind("cuStreamWaitEvent", c_void_p, c_void_p, c_uint)
        self._push = self._bind("cuCtxPushCurrent_v2", c_void_p)
        self._pop = self._bind("cuCtxPopCurrent_v2", POINTER(c_void_p))
        self._release = self._bind("cuDevicePrimaryCtxRelease_v2", c_int)
        device, ctx = c_int(), c_void_p()
        self._check(self._bind("cuDeviceGet", POINTER(c_int), c_int)(byref(device), device_index), "cuDeviceGet")
        self._check(self._bind("cuDevicePrimaryCtxRetain", POINTER(c_void_p), c_int)(byref(ctx), device),
                    "cuDevicePrimaryCtxRetain")
        self._device = device
        self._ctx: c_void_p | None = ctx

    def _bind(self, name: str, *argtypes: Any) -> Callable[..., int]:
        fn = getattr(self._lib, name)
        fn.argtypes, fn.restype = list(argtypes), c_int
        return fn

    # -- the calls ------------------------------------------------------------------------------
    def memcpy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Enqueue a copy of `nbytes` from address `src` to `dst` (device or page-locked host) on `stream`."""
        rc = self._memcpy(dst, src, nbytes, stream)
        if rc:
            self._again(rc, "cuMemcpyAsync", self._memcpy, dst, src, nbytes, stream)

    def memset(self, dst: int, nbytes: int, stream: int) -> None:
        """Enqueue zeroing `nbytes` of device memory at `dst` on `stream`."""
        rc = self._memset(dst, 0, nbytes, stream)
        if rc:
            self._again(rc, "cuMemsetD8Async", self._memset, dst, 0, nbytes, stream)

    def record(self, event: int, stream: int) -> None:
        """Record `event` (a created CUevent) on `stream`."""
        rc = self._record(event, stream)
        if rc:
            self._again(rc, "cuEventRecord", self._record, event, stream)

    def wait(self, stream: int, event: int) -> None:
        """Make later work on `stream` wait for `event`'s last record, without blocking the host."""
        rc = self._wait(stream, event, 0)
        if rc:
            self._again(rc, "cuStreamWaitEvent", self._wait, stream, event, 0)

    def close(self) -> None:
        """Drop this object's reference to the primary context (torch keeps its own)."""
        if self._ctx is not None:
            self._ctx = None
            self._release(self._device)

    # -- errors -----------------------------------------------------------------------------------
    def _again(self, rc: int, what: str, fn: Callable[..., int], *args: Any) -> None:
        """A call failed with `rc`: when the thread's context was the wrong one, make it again in ours."""
        if rc in _RETRY_IN_CONTEXT and self._ctx is not None:
            self._check(self._push(self._ctx), "cuCtxPushCurrent")
            try:
                rc = fn(*args)
            finally:
                self._pop(byref(c_void_p()))
        self._check(rc, what)

    def _check(self, rc: int, what: str) -> None:
        if rc:
            name = c_char_p()
            self._error_name(rc, byref(name))
            label = name.value.decode() if name.value else f"CUresult {rc}"
            raise DriverError(f"{what} failed: {label}")
