"""The device worker: one thread per device runs every driver call that touches tensors.

Rules:
- The event loop submits a plain callable and awaits an asyncio future; it never
  blocks on the worker and never runs model code itself.
- Calls run strictly in submission order on one thread, so drivers need no locks
  for their own state (only for what `stat()` reads from the loop thread).
- Driver exceptions cross back as KernelError (see `to_kernel_error`): a CUDA
  out-of-memory becomes ENOMEM for that request only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable, TypeVar

from .errors import EIO, ENOMEM, KernelError, error_class

__all__ = ["DeviceWorker", "to_kernel_error"]

log = logging.getLogger("djinn.worker")
T = TypeVar("T")


def to_kernel_error(exc: BaseException) -> KernelError:
    """Map a driver or torch exception to the KernelError the client should see."""
    if isinstance(exc, KernelError):
        return exc
    from djinn.drivers.errors import DriverError, OutOfMemory

    if isinstance(exc, OutOfMemory):
        return ENOMEM(str(exc), retryable=True, details=exc.details)
    if isinstance(exc, DriverError):
        return error_class(exc.errno)(str(exc))
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return ENOMEM(f"the device ran out of memory during this request: {exc}".splitlines()[0],
                          retryable=True, details={"hint": "free or page out sessions, or use a shorter input"})
    except ImportError:  # pragma: no cover
        pass
    return EIO(f"internal error ({type(exc).__name__}): {exc}")


class DeviceWorker:
    """A single thread that owns one device. `await worker.run(fn, *args)` runs fn there."""

    def __init__(self, name: str = "djinn-device-0") -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._thread_ident: int | None = None
        self.busy_s = 0.0
        self.calls = 0
        self._pool.submit(self._mark_thread).result()

    def _mark_thread(self) -> None:
        self._thread_ident = threading.get_ident()

    def on_worker(self) -> bool:
        return threading.get_ident() == self._thread_ident

    def _timed(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.busy_s += time.perf_counter() - t0
            self.calls += 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the worker; raises the KernelError its exception maps to."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wrap_future(self._pool.submit(self._timed, fn, args), loop=loop)
        except KernelError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every driver failure becomes an errno
            err = to_kernel_error(exc)
            if err.errno == "EIO":
                log.exception("driver call %s failed", getattr(fn, "__qualname__", fn))
            raise err from exc

    def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """For boot and shutdown only, before/after the loop serves requests."""
        return self._pool.submit(self._timed, fn, args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
