"""The session table and the session state machine.

Rules:
- Only the kernel changes a session's state, and only along TRANSITIONS; any
  other move is a bug (InvalidTransition), which ends that session, not the daemon.
- Session ids are unguessable (`secrets`), so knowing one proves nothing: every
  lookup also checks the caller's uid against the owner (root may touch any).
- All fields are owned by the event-loop thread. The device worker receives
  what it needs as arguments and never reads this table.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import EBUSY, ENOENT, EPERM

__all__ = ["Session", "SessionTable", "TRANSITIONS", "InvalidTransition", "new_id"]

# state -> states it may move to. SWAPPED means the arena lives in the host pool;
# a paused session may also be swapped (paused_at stays set while SWAPPED).
TRANSITIONS: dict[str, frozenset[str]] = {
    "READY": frozenset({"RUNNING", "PAUSED", "IO_WAIT", "SWAPPED", "CLOSED"}),  # PAUSED: restoring a paused checkpoint
    "RUNNING": frozenset({"READY", "PAUSED", "CLOSED"}),
    "PAUSED": frozenset({"RUNNING", "READY", "IO_WAIT", "SWAPPED", "CLOSED"}),
    "IO_WAIT": frozenset({"READY", "RUNNING", "PAUSED", "SWAPPED", "CLOSED"}),
    "SWAPPED": frozenset({"READY", "PAUSED", "IO_WAIT", "CLOSED"}),
    "CLOSED": frozenset(),
}


class InvalidTransition(RuntimeError):
    """A kernel bug: a state change not in TRANSITIONS. `.session` is the session it happened to."""

    def __init__(self, session: str, message: str) -> None:
        super().__init__(message)
        self.session = session


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_urlsafe(12)}"


@dataclass(eq=False)
class Session:
    """One client session. Owned by the loop thread; `lock` orders its requests."""

    id: str
    uid: int
    pid: int
    conn_id: int | None
    model: str | None
    max_tokens: int
    created_s: float = field(default_factory=time.monotonic)
    last_used_s: float = field(default_factory=time.monotonic)
    state: str = "READY"
    phase: str = "COMPUTE"
    phase_since_s: float = field(default_factory=time.monotonic)
    expected_ms: float | None = None
    paused_at: int | None = None
    disconnected_s: float | None = None
    arena: Any = None  # drivers.vmu Arena; touched only on the worker
    seq: Any = None  # drivers.model SeqState; touched only on the worker
    stream: int | None = None  # its compute stream in the device's StreamPool (None on CPU)
    checkpoints: set[str] = field(default_factory=set)
    busy: int = 0  # requests of this session running now
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def move(self, new: str) -> None:
        if new == self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise InvalidTransition(self.id, f"session {self.id}: {self.state} -> {new} is not allowed")
        self.state = new

    def touch(self) -> None:
        self.last_used_s = time.monotonic()

    @property
    def resident(self) -> bool:
        return self.arena is not None and getattr(self.arena, "residency", "device") == "device"

    @property
    def residency(self) -> str:
        if self.arena is None:
            return "none"
        return str(getattr(self.arena, "residency", "device"))

    @property
    def tokens(self) -> int:
        """Tokens the session's context holds (a generated token not yet run through the model included)."""
        return int(getattr(self.seq, "n_tokens", 0)) if self.seq is not None else 0

    def display_state(self) -> str:
        if self.state == "PAUSED" and self.paused_at is not None:
            return f"PAUSED@{self.paused_at}"
        return self.state

    def snapshot(self, now: float) -> dict[str, Any]:
        arena = self.arena
        return {
            "id": self.id,
            "uid": self.uid,
            "pid": self.pid,
            "model": self.model,
            "state": self.state,
            "paused_at": self.paused_at,
            "phase": self.phase,
            "phase_s": now - self.phase_since_s,
            "expected_ms": self.expected_ms,
            "residency": self.residency,
            "arena_nbytes": int(getattr(arena, "nbytes", 0)) if arena is not None else 0,
            "arena_used_nbytes": int(getattr(arena, "used_nbytes", 0)) if arena is not None else 0,
            "tokens": self.tokens,
            "max_tokens": self.max_tokens,
            "age_s": now - self.created_s,
            "idle_s": now - self.last_used_s,
            "checkpoints": len(self.checkpoints),
            "connected": self.disconnected_s is None,
        }


class SessionTable:
    """id -> Session, with the ownership check every syscall goes through."""

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self):
        return iter(list(self._by_id.values()))

    def add(self, session: Session) -> Session:
        self._by_id[session.id] = session
        return session

    def get(self, sid: str, uid: int) -> Session:
        """The session `sid` if `uid` owns it (or is root). ENOENT / EPERM otherwise."""
        s = self._by_id.get(sid)
        if s is None or s.state == "CLOSED":
            raise ENOENT(f"no session {sid!r}: it was closed, reclaimed, or never existed")
        if uid != 0 and uid != s.uid:
            raise EPERM(f"session {sid} belongs to uid {s.uid}, not to you (uid {uid})")
        return s

    def find(self, sid: str) -> Session | None:
        """The session `sid`, without an ownership check (for the kernel's own bookkeeping)."""
        return self._by_id.get(sid)

    def remove(self, sid: str) -> Session | None:
        return self._by_id.pop(sid, None)

    def of_connection(self, conn_id: int) -> list[Session]:
        return [s for s in self._by_id.values() if s.conn_id == conn_id]

    def require_idle(self, s: Session) -> None:
        if s.busy:
            raise EBUSY(f"session {s.id} has a request running; wait for it first")
