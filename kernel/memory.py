"""The kernel's side of memory: arenas, paging, pressure, the policy's timers, checkpoints.

Rules:
- The VMU (drivers/vmu) does the copies on the device worker; this module
  decides when, keeps session states right, and never blocks the loop: a copy's
  completion is awaited in a helper thread, not on the loop or the worker.
- A session's arena moves only while its lock is held, so a request never
  sees its arena half moved. Background moves (policy, prefetch) take the lock;
  moves made under pressure take a victim's lock only if it is free at once.
- Nothing is ever dropped: when neither the device nor the host pool has room
  the request fails with ENOMEM (retryable), and every arena stays where it was.
- With `memory_wait_ms` set, a syscall that finds no room and nothing the policy
  may page out waits for memory instead, in a queue (RoomWaiters). The waiter
  at the front tries again whenever memory is freed (an arena freed, a page-out
  finished, a checkpoint freed) or may be freed (a session's request ended, so
  the policy may page it out now), and at least every RECHECK_S, until it fits
  or its wait is over (then ENOMEM, retryable, with `waited_ms`); then the next
  one has its turn. While waiting it pages out only sessions that wait on a tool
  or sit idle, never one merely between two calls. Prefetches never wait, and
  while a syscall waits none starts: they are guesses, and would take the room
  ahead of the queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import EBUSY, EINVAL, ENOENT, ENOMEM, KernelError
from .policy import PageIn, PageOut, SessionView, make_policy
from .sessions import Session, new_id

if TYPE_CHECKING:
    from .core import Kernel
    from .dispatch import Call

__all__ = ["Memory", "Checkpoint", "RoomWaiters"]

log = logging.getLogger("djinn.memory")

RECHECK_S = 0.1  # the front waiter tries again at least this often: a session may become evictable with no event


@dataclass(eq=False)
class Checkpoint:
    id: str
    uid: int
    session: str
    model: str | None
    max_tokens: int
    host: Any  # drivers.vmu HostCopy
    meta: Any  # the model driver's small per-session state
    nbytes: int
    created_s: float = field(default_factory=time.monotonic)


def default_cpu_threads(worker_pinned: bool) -> int:
    """torch's CPU threads when cpu_threads is 0, from the worker thread (which starts them, so they may run
    where it may). Unpinned: every CPU the process may use but one, which the loop keeps, since it must
    answer control syscalls within a millisecond. Pinned: one per CPU the worker has (more would only take
    turns on them, and torch's idle threads spin before they sleep, against the worker itself)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return cpus if worker_pinned else max(1, cpus - 1)


async def _wait_copy(job: Any) -> None:
    """Await a copy job without blocking the loop: a helper thread sleeps until it is done (it does not
    spin, which would take a CPU from the loop or the worker for the whole copy)."""
    if not job.query():
        await asyncio.get_running_loop().run_in_executor(None, job.sleep)


def rest_state(s: Session) -> str:
    """The state a session settles in when nothing runs on it and its arena is on the device."""
    if s.paused_at is not None:
        return "PAUSED"
    return "IO_WAIT" if s.phase == "IO_WAIT" else "READY"


class RoomWaiters:
    """Syscalls waiting for memory, in a queue. `notify()` (memory was freed, or may be freed now) wakes the
    one at the front to try again; it keeps its place if it still does not fit, and passes the turn on when
    it leaves (room found, or its wait over). One try per event, not one per waiter: a hundred waiters must
    not each take a turn of the device worker every time a request ends. Loop thread only."""

    def __init__(self) -> None:
        self._queue: deque[asyncio.Future[None]] = deque()
        self.waiting = 0  # waits begun and not ended (queued, or trying again now)
        self.waits = 0  # waits begun
        self.admitted = 0  # waits that ended with the room found
        self.timed_out = 0  # waits that ended in ENOMEM
        self.abandoned = 0  # waits that ended otherwise (the request cancelled, another error)
        self.wait_s = 0.0  # total time spent waiting, over ended waits

    def begin(self) -> bool:
        """A wait begins; True if it is at the front (no one else waits)."""
        self.waits += 1
        self.waiting += 1
        return not self._queue

    async def wait(self, timeout_s: float, *, front: bool) -> None:
        """Until this waiter's turn (a notify() that reaches it) or `timeout_s`. `front`: take the place at the
        front (a waiter whose turn came and who still did not fit), else join at the back."""
        fut = asyncio.get_running_loop().create_future()
        if front:
            self._queue.appendleft(fut)
        else:
            self._queue.append(fut)
        try:
            await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            pass
        finally:
            try:
                self._queue.remove(fut)
            except ValueError:  # notify() took it
                pass

    def notify(self) -> None:
        """Wake the waiter at the front, if any."""
        while self._queue:
            fut = self._queue.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def end(self, seconds: float, outcome: str) -> None:
        """A wait ended: `outcome` "admitted", "timed_out" or "abandoned". Passes the turn on."""
        self.waiting -= 1
        self.wait_s += seconds
        if outcome == "admitted":
            self.admitted += 1
        elif outcome == "timed_out":
            self.timed_out += 1
        else:
            self.abandoned += 1
        self.notify()

    def snapshot(self) -> dict[str, Any]:
        return {"waiting": self.waiting, "waits": self.waits, "admitted": self.admitted,
                "timed_out": self.timed_out, "abandoned": self.abandoned, "wait_s": self.wait_s}


class Memory:
    """Owned by the loop thread; `vmu` is owned by the device worker (stat() excepted)."""

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel
        cfg = kernel.config
        self.vmu: Any = None
        self.device: Any = None
        self.streams: Any = None  # drivers.cuda StreamPool: acquire/release here, call_on on the worker
        self.torch_threads: int | None = None  # torch's CPU threads, as the worker set them at boot
        settings: dict[str, Any] = {}
        if cfg.policy in ("reactive", "proactive"):
            settings["idle_timeout_s"] = cfg.idle_timeout_s
        if cfg.policy == "proactive":
            settings.update(mode=cfg.proactive_mode, margin_s=cfg.prefetch_margin_ms / 1e3)
        self.policy = make_policy(cfg.policy, **settings)
        self.checkpoints: dict[str, Checkpoint] = {}
        self.room = RoomWaiters()
        self._wait_s = cfg.memory_wait_ms / 1e3
        self._timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()

    # -- boot ---------------------------------------------------------------------

    async def start(self) -> str:
        from djinn.drivers.cuda import StreamPool
        from djinn.drivers.vmu import VMU, resolve_device

        cfg = self.k.config

        def boot() -> tuple[Any, Any, Any, str, int]:
            import torch

            threads = cfg.cpu_threads or default_cpu_threads(cfg.worker_cpus is not None)
            torch.set_num_threads(threads)
            device, name = resolve_device(cfg.device)
            vmu = VMU.from_config(device, text=cfg.vmu_text, data=cfg.vmu_data, stack=cfg.vmu_stack,
                                  host=cfg.vmu_host, session_arena=cfg.vmu_session_arena_mb << 20)
            return device, vmu, StreamPool(device, cfg.cuda_streams), name, threads

        self.device, self.vmu, self.streams, name, self.torch_threads = await self.k.worker.run(boot)
        self.k.worker.after_call = self.vmu.stack.settle  # a request's peak is read after its reply
        return name

    # -- arenas -------------------------------------------------------------------

    async def alloc_arena(self, s: Session, nbytes: int) -> None:
        s.arena = await self._with_room(s, nbytes, lambda: self.vmu.alloc_arena(s.id, nbytes))

    async def alloc_or_grow(self, s: Session, nbytes: int) -> dict[str, Any]:
        if s.arena is None:
            await self.alloc_arena(s, nbytes)
        else:
            await self.ensure_resident(s, cause="syscall")
            if nbytes < s.arena.nbytes:
                raise EINVAL(f"alloc_arena: the arena already has {s.arena.nbytes} bytes; it grows, never shrinks "
                             "(free it first)", details={"argument": "nbytes"})
            await self._with_room(s, nbytes - s.arena.nbytes, lambda: self.vmu.grow_arena(s.arena, nbytes))
        return {"arena_nbytes": int(s.arena.nbytes), "used_nbytes": int(s.arena.used_nbytes)}

    async def _with_room(self, s: Session, nbytes: int, op: Any, *, wait: bool = True) -> Any:
        """Run `op` on the worker; on ENOMEM make room by the policy and retry. When the policy can page out
        nothing, wait for memory for up to memory_wait_ms (if `wait`; see RoomWaiters), else ENOMEM (retryable)."""
        made = 0  # rooms made in a row that the retry still did not fit
        began: float | None = None  # when this call began to wait
        outcome = "abandoned"
        front = False
        try:
            while True:
                try:
                    result = await self.k.worker.run(op)
                    outcome = "admitted"
                    return result
                except KernelError as err:
                    if err.errno != "ENOMEM":
                        raise
                    failure = err
                try:
                    if made == 2:  # the policy made room twice and it was taken both times: no room
                        raise failure
                    # Once waiting, only sessions that wait on a tool or sit idle make room: taking one in
                    # use lately (cause "pressure") each time a request ends would page agents out between
                    # their calls, and page them in again at the next.
                    await self.make_room(nbytes, exclude=s, original=failure, pressure=began is None)
                    made += 1
                    continue
                except KernelError as err:
                    if err.errno != "ENOMEM" or not wait or not self._wait_s:
                        raise
                    no_room = err
                made = 0
                now = time.monotonic()
                if began is None:
                    began = now
                    front = self.room.begin()
                left = began + self._wait_s - now
                if left <= 0:
                    no_room.details["waited_ms"] = round((now - began) * 1e3, 3)
                    outcome = "timed_out"
                    raise no_room
                # The waiter at the front also tries every RECHECK_S: a session may become evictable with no
                # event (its idle timeout passing). The others wait for their turn.
                await self.room.wait(min(left, RECHECK_S) if front else left, front=front)
                front = True  # its turn came (or its time is up): it keeps the front from here on
        finally:
            if began is not None:
                self.room.end(time.monotonic() - began, outcome)

    def request_ended(self) -> None:
        """A session's request ended and its lock is free: the policy may page it out now, so the waiter at
        the front, if any, tries again."""
        self.room.notify()

    async def free_arena(self, s: Session, explicit: bool = False) -> None:
        if s.arena is None:
            if explicit:
                raise ENOENT(f"session {s.id} has no arena")
            return
        if explicit and s.seq is not None:
            raise EBUSY(f"session {s.id} holds a model's KV cache in its arena; close the session instead")
        arena, s.arena = s.arena, None
        await self.k.worker.run(self.vmu.free_arena, arena)
        self.room.notify()

    async def free_session(self, s: Session) -> None:
        for ck_id in list(s.checkpoints):
            ck = self.checkpoints.pop(ck_id, None)
            if ck is not None:
                await self.k.worker.run(self.vmu.free_host, ck.host)
        s.checkpoints.clear()
        await self.free_arena(s)

    # -- paging -------------------------------------------------------------------

    def view(self, s: Session) -> SessionView:
        nbytes = int(s.arena.nbytes) if s.arena is not None else 0
        return SessionView(sid=s.id, nbytes=nbytes, resident=s.resident, busy=s.busy > 0 or s.state == "RUNNING",
                           phase=s.phase, phase_since_s=s.phase_since_s, expected_ms=s.expected_ms,
                           last_used_s=s.last_used_s)

    async def page_out(self, s: Session, cause: str) -> dict[str, Any]:
        """Move the arena to the host pool. The caller holds s.lock."""
        if s.arena is None:
            raise ENOENT(f"session {s.id} has no arena to page out")
        if not s.resident:
            return {"residency": "host", "nbytes": 0, "seconds": 0.0}
        job = await self.k.worker.run(self.vmu.page_out, s.arena)
        ok = False
        try:
            await _wait_copy(job)
            await self.k.worker.run(self.vmu.finish, job)
            ok = True
        finally:
            self._transfer_done(s, "out", job, ok)
        s.move("SWAPPED")
        self.room.notify()
        return {"residency": "host", "nbytes": int(job.nbytes), "seconds": float(job.seconds)}

    async def page_in(self, s: Session, cause: str) -> dict[str, Any]:
        """Bring the arena back to the device, making room if needed (a syscall's page-in may wait for it:
        see _with_room). The caller holds s.lock."""
        if s.arena is None:
            raise ENOENT(f"session {s.id} has no arena to page in")
        if s.resident:
            return {"residency": "device", "nbytes": 0, "seconds": 0.0}
        job = None
        try:
            job = await self._with_room(s, s.arena.nbytes, lambda: self.vmu.page_in(s.arena),
                                        wait=cause == "syscall")
            await _wait_copy(job)
            await self.k.worker.run(self.vmu.finish, job)
        finally:
            self._transfer_done(s, "in", job, job is not None)
        s.move(rest_state(s))
        return {"residency": "device", "nbytes": int(job.nbytes), "seconds": float(job.seconds)}

    def _transfer_done(self, s: Session, direction: str, job: Any, ok: bool) -> None:
        nbytes = int(getattr(job, "nbytes", 0) or 0)
        seconds = float(getattr(job, "seconds", 0.0) or 0.0)
        actions = self.policy.on_transfer_done(time.monotonic(), s.id, direction, nbytes, seconds, ok)
        self._spawn_actions(actions)

    async def ensure_resident(self, s: Session, cause: str) -> None:
        """Before GPU work on s (its lock held): tell the policy, and page in if swapped."""
        self.policy.on_gpu_syscall(time.monotonic(), self.view(s))
        if s.arena is not None and not s.resident:
            await self.page_in(s, cause)
        self._rearm()

    async def make_room(self, nbytes: int, *, exclude: Session | None, original: KernelError | None = None,
                        pressure: bool = True) -> None:
        """Page out sessions the policy picks until `nbytes` more are free (`pressure`: see Policy.make_room).
        ENOMEM (retryable) if it can't."""
        now = time.monotonic()
        views = [self.view(s) for s in self.k.sessions
                 if s is not exclude and s.arena is not None and not s.lock.locked()]
        ev = self.policy.make_room(now, nbytes, views, pressure=pressure)
        if not ev.ok:
            details = dict(original.details) if original is not None else {}
            details.update(requested_nbytes=nbytes, evictable_nbytes=ev.freed_nbytes, policy=self.policy.name)
            reason = original.message if original is not None else f"{nbytes} bytes are not free"
            raise ENOMEM(f"{reason}; the {self.policy.name} policy could page out only {ev.freed_nbytes} bytes "
                         "of idle sessions; retry later, close sessions, or signal IO_WAIT on idle ones",
                         retryable=True, details=details)
        for action in ev.victims:
            victim = self.k.sessions.find(action.sid)
            if victim is None or victim.lock.locked():
                self.policy.on_transfer_done(time.monotonic(), action.sid, "out", 0, 0.0, False)
                continue
            async with victim.lock:
                await self._carry_out_locked(victim, action)

    # -- phases and the policy's timers ---------------------------------------------

    def signal(self, s: Session, phase: str, expected_ms: float | None) -> dict[str, Any]:
        before = self.view(s)
        actions = self.policy.on_signal(time.monotonic(), before, phase, expected_ms)
        s.phase, s.phase_since_s, s.expected_ms = phase, time.monotonic(), expected_ms
        if phase == "IO_WAIT" and s.state in ("READY", "PAUSED"):
            s.move("IO_WAIT")
        elif phase != "IO_WAIT" and s.state == "IO_WAIT":
            s.move(rest_state(s))
        self._spawn_actions(actions)
        prefetch_at = self.policy.prefetch_at(s.id)
        return {"phase": phase, "actions": [f"{type(a).__name__}:{a.cause}" for a in actions],
                "prefetch_in_ms": None if prefetch_at is None else max(0.0, (prefetch_at - time.monotonic()) * 1e3)}

    def _spawn_actions(self, actions: list[Any]) -> None:
        for action in actions:
            task = asyncio.get_running_loop().create_task(self._carry_out(action))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        self._rearm()

    async def _carry_out(self, action: PageOut | PageIn) -> None:
        s = self.k.sessions.find(action.sid)
        if s is None or s.state == "CLOSED":
            self.policy.forget(action.sid)
            return
        async with s.lock:
            await self._carry_out_locked(s, action)

    async def _carry_out_locked(self, s: Session, action: PageOut | PageIn) -> None:
        direction = "out" if isinstance(action, PageOut) else "in"
        stale = s.state == "CLOSED" or s.arena is None or (
            direction == "out" and (not s.resident or s.busy or (action.cause == "signal" and s.phase != "IO_WAIT")))
        if direction == "in" and (s.arena is None or s.resident):
            stale = True
        if stale:
            self.policy.on_transfer_done(time.monotonic(), s.id, direction, 0, 0.0, direction == "in")
            return
        if action.cause == "prefetch" and self.room.waiting:
            # A prefetch is a guess, and it would take the room ahead of syscalls that wait for it: it is
            # cancelled, and the session's next syscall pages it in, in its turn.
            self.policy.on_transfer_done(time.monotonic(), s.id, direction, 0, 0.0, False)
            return
        try:
            if direction == "out":
                await self.page_out(s, action.cause)
            else:
                await self.page_in(s, action.cause)
        except KernelError as err:
            log.warning("%s of session %s (%s) failed: %s", direction, s.id, action.cause, err)

    def start_policy_timer(self) -> None:
        self._rearm()

    def stop_policy_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _rearm(self) -> None:
        if self.k.shutting_down:
            return
        deadline = self.policy.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        actions = self.policy.due(time.monotonic(), (self.view(s) for s in self.k.sessions))
        self._spawn_actions(actions)

    # -- checkpoints --------------------------------------------------------------

    async def checkpoint(self, s: Session) -> Checkpoint:
        """Start copying the session's state to the host pool; returns before the copy is done."""
        if s.arena is None:
            raise ENOENT(f"session {s.id} has no state to checkpoint")
        await self.ensure_resident(s, cause="syscall")
        seq = s.seq

        def start() -> tuple[Any, Any]:
            return self.vmu.snapshot(s.arena), (seq.snapshot_meta() if seq is not None else None)

        host, meta = await self.k.on_stream(s, start)
        ck = Checkpoint(id=new_id("c"), uid=s.uid, session=s.id, model=s.model, max_tokens=s.max_tokens,
                        host=host, meta=meta, nbytes=int(host.nbytes))
        self.checkpoints[ck.id] = ck
        s.checkpoints.add(ck.id)
        return ck

    def _get_checkpoint(self, call: Call, ck_id: str) -> Checkpoint:
        ck = self.checkpoints.get(ck_id)
        if ck is None:
            raise ENOENT(f"no checkpoint {ck_id!r}: it was freed, its session closed, or it never existed")
        self.k.owned(ck.uid, call, f"checkpoint {ck_id}")
        return ck

    async def checkpoint_status(self, call: Call, ck_id: str, *, wait: bool) -> dict[str, Any]:
        ck = self._get_checkpoint(call, ck_id)
        if wait:
            await _wait_copy(ck.host)
        ready = bool(ck.host.query())
        return {"checkpoint": ck.id, "ready": ready, "nbytes": ck.nbytes,
                "seconds": float(ck.host.seconds) if ready else None, "session": ck.session}

    async def restore(self, call: Call, s: Session, ck_id: str) -> dict[str, Any]:
        ck = self._get_checkpoint(call, ck_id)
        if ck.model != s.model:
            raise EINVAL(f"checkpoint {ck_id} is of model {ck.model!r}, the session runs {s.model!r}")
        if s.arena is None or ck.nbytes > s.arena.nbytes:
            raise EINVAL(f"checkpoint {ck_id} holds {ck.nbytes} bytes; the session's arena is too small")
        await self.ensure_resident(s, cause="syscall")
        await _wait_copy(ck.host)
        seq = s.seq

        def put_back() -> None:
            self.vmu.restore(s.arena, ck.host)
            if seq is not None:
                seq.restore_meta(ck.meta)

        await self.k.on_stream(s, put_back)
        s.paused_at = getattr(seq, "paused_at", None)
        s.move(rest_state(s))
        return {"restored": ck.id, "position": s.tokens, "paused_at": s.paused_at}

    async def fork(self, call: Call, ck_id: str) -> Session:
        ck = self._get_checkpoint(call, ck_id)
        child = await self.k.open_session(call, model=ck.model, max_tokens=ck.max_tokens, arena_nbytes=None,
                                          bare=False)
        async with child.lock:
            try:
                await self.restore(call, child, ck_id)
            except BaseException:
                await self.k.close_session(child)
                raise
        return child

    async def free_checkpoint(self, call: Call, ck_id: str) -> None:
        ck = self._get_checkpoint(call, ck_id)
        del self.checkpoints[ck_id]
        owner = self.k.sessions.find(ck.session)
        if owner is not None:
            owner.checkpoints.discard(ck_id)
        await _wait_copy(ck.host)
        await self.k.worker.run(self.vmu.free_host, ck.host)
        self.room.notify()

    async def free_all_checkpoints(self) -> None:
        for ck in list(self.checkpoints.values()):
            await _wait_copy(ck.host)
            await self.k.worker.run(self.vmu.free_host, ck.host)
        self.checkpoints.clear()

    # -- stat ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        vmu_stat = self.vmu.stat(arenas=False) if self.vmu is not None else {}
        ps = self.policy.statistics()
        checkpoint = vmu_stat.get("checkpoint", {})  # checkpoint copies: device -> host pool, and back
        return {
            "segments": vmu_stat.get("segments", {}),
            "swap": {**vmu_stat.get("swap", {}), "snapshot": checkpoint.get("out", {}),
                     "restore": checkpoint.get("in", {}), "by_cause": ps.by_cause},
            "prefetch": {"pending": ps.prefetch_pending, "late": ps.prefetch_late, "on_time": ps.prefetch_on_time,
                         "scheduled": ps.prefetch_scheduled, "cancelled": ps.prefetch_cancelled},
            "transfer_estimate_bytes_per_s": {"out": ps.out_bytes_per_s, "in": ps.in_bytes_per_s},
            "stack": vmu_stat.get("stack", {}),
            "room_waits": self.room.snapshot(),
        }

    def checkpoint_snapshot(self) -> list[dict[str, Any]]:
        return [{"id": c.id, "session": c.session, "uid": c.uid, "nbytes": c.nbytes, "ready": bool(c.host.query())}
                for c in self.checkpoints.values()]
