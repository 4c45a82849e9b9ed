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
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, TypeVar

from .errors import ECANCELED, EIO, ENOMEM, KernelError, error_class

__all__ = ["DeviceWorker", "set_exception", "set_result", "settled", "to_kernel_error"]

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
    """A single thread that owns one device. `await worker.run(fn, *args)` runs fn there.

    A job is (loop, future, fn, args, submitted) on a SimpleQueue; the thread runs it and hands the
    outcome back with one `call_soon_threadsafe`. That is the whole path: no executor,
    work item or chained future in between, since every device syscall pays for it twice
    (one hand-off out, one back).

    `after_call`, when set, runs on the thread after each call, once its outcome is handed back:
    bookkeeping that must come before the next call but need not delay the caller (the Stack's
    statistics read). Its time counts in `busy_s`; an exception it raises is logged.
    """

    def __init__(self, name: str = "djinn-device-0", cpus: tuple[int, ...] | None = None) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Any, asyncio.Future[Any] | None, Callable[..., Any], tuple[Any, ...], float] | None
        ] = queue.SimpleQueue()
        self._closed = False
        self.busy_s = 0.0  # written by the worker thread only; read by stat
        self.wait_s = 0.0  # summed time calls waited from submission to start (hand-off and queueing); likewise
        self.calls = 0
        self.after_call: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        if cpus is not None:  # pinned from here, so that a CPU it may not use fails the caller (Linux only)
            try:
                os.sched_setaffinity(self._native_id(), cpus)
            except BaseException:
                self.close()
                raise

    def _native_id(self) -> int:
        tid = self._thread.native_id
        assert tid is not None, "set once the thread has started"
        return tid

    @property
    def cpus(self) -> list[int] | None:
        """The CPUs the worker thread may run on; None where the platform does not say (not Linux)."""
        if not hasattr(os, "sched_getaffinity") or not self._thread.is_alive():
            return None
        return sorted(os.sched_getaffinity(self._native_id()))

    def _serve(self) -> None:
        jobs = self._jobs
        now = time.perf_counter
        while (job := jobs.get()) is not None:
            loop, future, fn, args, submitted = job
            t0 = now()
            if future is None:  # post(): the call delivers its own outcomes
                try:
                    fn(*args)
                except BaseException:  # noqa: BLE001 - a posted call must not end the worker
                    log.exception("posted device call %s failed", getattr(fn, "__qualname__", fn))
                self.busy_s += now() - t0
                self.wait_s += t0 - submitted
                self.calls += 1
                self._after()
                continue
            if future.cancelled():  # its request was cancelled while it waited: never started, like an executor's
                continue
            try:
                outcome, setter = fn(*args), set_result
            except BaseException as exc:  # noqa: BLE001 - crosses back to the awaiting task
                outcome, setter = exc, set_exception
            # Counted before the hand-back, so the awaiting task sees its own call in the figures.
            self.busy_s += now() - t0
            self.wait_s += t0 - submitted
            self.calls += 1
            self._deliver(loop, setter, future, outcome)
            self._after()

    def _after(self) -> None:
        after = self.after_call
        if after is not None:
            t0 = time.perf_counter()
            try:
                after()
            except BaseException:  # noqa: BLE001 - bookkeeping must not end the worker
                log.exception("device worker: after_call %s failed", getattr(after, "__qualname__", after))
            self.busy_s += time.perf_counter() - t0  # the worker's time all the same

    @staticmethod
    def _deliver(loop: Any, setter: Callable[[asyncio.Future[Any], Any], None], future: asyncio.Future[Any],
                 value: Any) -> None:
        try:
            loop.call_soon_threadsafe(setter, future, value)
        except RuntimeError:  # the loop closed meanwhile: nobody waits for this any more
            pass

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the worker; raises the KernelError its exception maps to."""
        if self._closed:
            raise ECANCELED("the device worker has stopped (the daemon is shutting down)")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn, args, time.perf_counter()))
        return await settled(future, fn)

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue fn(*args) behind the calls already queued, and return: fn hands its outcomes back itself
        (see DecodeBatcher). An exception it lets out is logged. ECANCELED once the worker has stopped."""
        if self._closed:
            raise ECANCELED("the device worker has stopped (the daemon is shutting down)")
        self._jobs.put((None, None, fn, args, time.perf_counter()))

    def close(self) -> None:
        """Run what is queued, then stop the thread. Later run() calls raise ECANCELED."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
        self._thread.join()


async def settled(future: asyncio.Future[T], fn: Any) -> T:
    """The outcome of a worker call's future, a driver failure raised as the KernelError it maps to
    (an unexpected one, EIO, is logged with `fn`'s name)."""
    try:
        return await future
    except KernelError:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - every driver failure becomes an errno
        err = to_kernel_error(exc)
        if err.errno == "EIO":
            log.error("driver call %s failed", getattr(fn, "__qualname__", fn), exc_info=exc)
        raise err from exc


def set_result(future: asyncio.Future[Any], value: Any) -> None:
    """On the loop: the outcome of a worker call, unless its awaiter is gone (cancelled)."""
    if not future.done():
        future.set_result(value)


def set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        if isinstance(exc, StopIteration) or not isinstance(exc, Exception):
            # asyncio refuses StopIteration, and a SystemExit or the like re-raised in the loop
            # would end the daemon: either is a driver bug, answered EIO like any other.
            exc = RuntimeError(f"the driver call raised {type(exc).__name__}: {exc}")
        future.set_exception(exc)
