"""The kernel object: the session table, the device worker, the VMU, the models and the policy.

Rules:
- Everything here runs on the event-loop thread; anything that touches tensors
  is a closure handed to `self.worker.run` (see `on_device`).
- Syscall handlers call one method here; the methods own the state changes.
- A session's state changes only through `Session.move` (kernel/sessions.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from . import abi
from .batching import DecodeBatcher
from .config import Config
from .errors import EINVAL, EPERM, ESHUTDOWN
from .execute import Execute
from .memory import Memory, rest_state
from .models import ModelRegistry
from .sessions import InvalidTransition, Session, SessionTable, new_id
from .stats import SyscallStats
from .worker import DeviceWorker

if TYPE_CHECKING:
    from .dispatch import Call
    from .server import Connection

__all__ = ["Kernel"]

log = logging.getLogger("djinn.kernel")
T = TypeVar("T")


class Kernel:
    """One per daemon. Owned by the event-loop thread."""

    version = "0.1.0"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.limits = abi.DEFAULT_LIMITS
        self.started_s = time.monotonic()
        self.sessions = SessionTable()
        self.connections: set[Connection] = set()
        self.stats = SyscallStats()
        self.worker = DeviceWorker(cpus=config.worker_cpus)
        self.shutting_down = False
        self.stop_event = asyncio.Event()
        self.device_name = "cpu"
        self.alloc_payload: Callable[[int], Any] | None = None
        self.memory = Memory(self)
        self.models = ModelRegistry(self)
        self.execute = Execute(self)
        self.batcher = DecodeBatcher(self.worker, self._in_scope, config.decode_batch,
                                     budget=lambda: self.memory.vmu.stack_budget_nbytes,
                                     stream_of=lambda index: self.memory.streams.stream(index))
        self._reclaim: dict[str, asyncio.TimerHandle] = {}

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Boot the device side: VMU segments, then the boot model (if any)."""
        self.device_name = await self.memory.start()
        if self.config.model and self.config.model != "none":
            await self.models.load(self.config.model, name=None, dtype=self.config.dtype)
        self.memory.start_policy_timer()

    def stop(self) -> None:
        self.stop_event.set()

    def refuse_new_work(self, name: str) -> None:
        raise ESHUTDOWN(f"{name}: djinnd is shutting down and accepts no new work; reconnect after it restarts")

    async def shutdown(self) -> None:
        """Drain in-flight requests for shutdown_timeout_s, fail the rest with ESHUTDOWN, close everything.

        The rest are cancelled; dispatch answers a request cancelled while `shutting_down` ESHUTDOWN."""
        self.shutting_down = True
        tasks = [t for c in self.connections for t in c.tasks]
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=self.config.shutdown_timeout_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        for conn in list(self.connections):
            conn.close()
        for handle in self._reclaim.values():
            handle.cancel()
        self.memory.stop_policy_timer()
        for s in list(self.sessions):
            await self._release(s)
        await self.memory.free_all_checkpoints()
        await self.models.unload_all()
        if self.memory.vmu is not None:  # on the worker, so nothing of the device is left to the garbage collector
            await self.worker.run(self.memory.vmu.close)
        self.worker.close()

    def quarantine(self, exc: InvalidTransition) -> None:
        """A broken invariant ends the session it happened to, not the daemon."""
        s = self.sessions.find(exc.session)
        log.error("invariant violation, closing session %s: %s", exc.session, exc)
        if s is not None and s.state != "CLOSED":
            asyncio.get_running_loop().create_task(self._reclaim_locked(s))

    # -- sessions -----------------------------------------------------------------

    async def open_session(self, call: Call, *, model: str | None, max_tokens: int | None,
                           arena_nbytes: int | None, bare: bool) -> Session:
        loaded = None if bare else self.models.resolve(model)
        if bare and model is not None:
            raise EINVAL("open_session: 'bare' sessions take no model")
        if loaded is None and max_tokens is not None and not bare:
            raise EINVAL("open_session: max_tokens needs a model; none is loaded")
        max_tokens = max_tokens or self.config.max_tokens
        if loaded is not None and max_tokens > loaded.max_positions:
            raise EINVAL(f"open_session: max_tokens {max_tokens} exceeds the model's {loaded.max_positions} positions",
                         details={"argument": "max_tokens"})
        s = Session(id=new_id("s"), uid=call.uid, pid=call.pid, conn_id=call.peer.id,
                    model=loaded.name if loaded else None, max_tokens=max_tokens)
        streams = self.memory.streams
        s.stream = streams.acquire()
        try:
            if loaded is not None:
                nbytes = loaded.model.arena_nbytes(max_tokens)
                await self.memory.alloc_arena(s, nbytes)
                try:
                    s.seq = await self.on_stream(s, loaded.model.new_state, s.arena, max_tokens)
                except BaseException:
                    await self.memory.free_arena(s)
                    raise
                loaded.sessions += 1
            elif not bare:
                await self.memory.alloc_arena(s, arena_nbytes or self.config.vmu_session_arena_mb << 20)
        except BaseException:
            streams.release(s.stream)
            raise
        self.sessions.add(s)
        return s

    async def close_session(self, s: Session) -> None:
        await self._release(s)

    async def _release(self, s: Session) -> None:
        if s.state == "CLOSED":
            return
        handle = self._reclaim.pop(s.id, None)
        if handle is not None:
            handle.cancel()
        if s.seq is not None:
            await self.on_stream(s, s.seq.release)  # drops the state's CUDA graphs and views
            s.seq = None
        await self.memory.free_session(s)
        if s.model is not None:
            self.models.release(s.model)
        s.move("CLOSED")
        self.memory.streams.release(s.stream)
        self.sessions.remove(s.id)
        self.memory.policy.forget(s.id)

    def connection_closed(self, conn: Connection) -> None:
        """Reclaim a disconnected client's sessions after the grace period (0: at once)."""
        if self.shutting_down:
            return  # shutdown() releases every session itself
        now = time.monotonic()
        loop = asyncio.get_event_loop()
        for s in self.sessions.of_connection(conn.id):
            s.disconnected_s = now
            s.conn_id = None
            self._reclaim[s.id] = loop.call_later(self.config.grace_s, self._reclaim_now, s)

    def _reclaim_now(self, s: Session) -> None:
        self._reclaim.pop(s.id, None)
        if s.state != "CLOSED" and s.disconnected_s is not None:
            log.info("reclaiming session %s of uid %d (client gone for %.1fs)", s.id, s.uid, self.config.grace_s)
            asyncio.ensure_future(self._reclaim_locked(s))

    async def _reclaim_locked(self, s: Session) -> None:
        async with s.lock:
            await self._release(s)

    def adopt(self, s: Session, call: Call) -> None:
        """A reconnecting owner may keep using its session; it is then not reclaimed."""
        if s.disconnected_s is not None and s.uid == call.uid:
            s.disconnected_s = None
            s.conn_id = call.peer.id
            handle = self._reclaim.pop(s.id, None)
            if handle is not None:
                handle.cancel()

    # -- running work on the device ---------------------------------------------------

    async def on_device(self, s: Session, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the worker for session `s`: page it in first, mark it RUNNING meanwhile."""
        await self._device_begin(s)
        try:
            return await self.worker.run(self._in_scope, s.stream, fn, *args)
        finally:
            self._device_end(s)

    async def decode_step(self, s: Session, model: Any, gen: Any) -> Any:
        """`next(gen, None)` for a generation on session `s`, as on_device runs a call; decode steps of
        several sessions that wait together run as one batched pass (kernel/batching.py)."""
        await self._device_begin(s)
        try:
            return await self.batcher.step(model, gen, s.stream)
        finally:
            self._device_end(s)

    async def _device_begin(self, s: Session) -> None:
        await self.memory.ensure_resident(s, cause="syscall")
        if s.phase != "COMPUTE":  # a GPU syscall means the session computes again
            s.phase, s.phase_since_s, s.expected_ms = "COMPUTE", time.monotonic(), None
        s.move("RUNNING")
        s.busy += 1

    def _device_end(self, s: Session) -> None:
        s.busy -= 1
        s.touch()
        if s.state == "RUNNING":
            s.paused_at = getattr(s.seq, "paused_at", None) if s.seq is not None else None
            s.move(rest_state(s))

    def _in_scope(self, stream: int | None, fn: Callable[..., T], *args: Any) -> T:
        """On the worker: fn(*args) with compute stream `stream` current, in a Stack scope."""
        vmu = self.memory.vmu

        def in_stack_scope() -> T:
            with vmu.stack_scope():
                return fn(*args)

        return self.memory.streams.call_on(stream, in_stack_scope)

    async def on_stream(self, s: Session, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the worker with session `s`'s compute stream current: work on its tensors that
        is not a model call (its state's creation and release, checkpoint and restore bookkeeping)."""
        return await self.worker.run(self.memory.streams.call_on, s.stream, fn, *args)

    def owned(self, obj_uid: int, call: Call, what: str) -> None:
        if call.uid not in (0, obj_uid):
            raise EPERM(f"{what} belongs to uid {obj_uid}, not to you (uid {call.uid})")

    # -- stat ---------------------------------------------------------------------

    def stat(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "version": self.version,
            "protocol": abi.PROTOCOL_VERSION,
            "pid": os.getpid(),
            "uptime_s": now - self.started_s,
            "device": self.device_name,
            "policy": self.config.policy,
            "models": self.models.snapshot(),
            "sessions": [s.snapshot(now) for s in self.sessions],
            "syscalls": self.stats.snapshot(),
            "memory": self.memory.snapshot(),
            "connections": len(self.connections),
            "checkpoints": self.memory.checkpoint_snapshot(),
            "cpus": {"loop": _loop_cpus(), "worker": self.worker.cpus, "torch_threads": self.memory.torch_threads},
            "worker": {"calls": self.worker.calls, "busy_s": self.worker.busy_s, "wait_s": self.worker.wait_s,
                       **(self.memory.streams.snapshot() if self.memory.streams is not None else {}),
                       "decode_batching": self.batcher.snapshot()},
        }


def _loop_cpus() -> list[int] | None:
    """The CPUs the calling thread (the event loop's, where stat runs) may run on; None off Linux."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
