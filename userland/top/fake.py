"""Synthetic snapshots and a fake StatSource, for tests, `djinn-top --demo` and the benchmark's fallback.

Rules: `synthetic_snapshot` is a pure function of (sessions, time, seed) that
follows the schema in docs/INTERNALS.md; its counters only grow with time.
`FakeSource` behaves like KernelSource (Unavailable when "down", EPERM for
sessions the caller does not own) without any socket.
"""

from __future__ import annotations

import os
import random
import threading
from typing import Any, Callable

from .source import Unavailable

__all__ = ["synthetic_snapshot", "FakeSource"]

_STATES = ("READY", "RUNNING", "PAUSED", "IO_WAIT", "SWAPPED")
_MiB = 1 << 20


def _session(i: int, t_s: float, rng: random.Random, uid: int) -> dict[str, Any]:
    state = _STATES[(i + int(t_s / 3)) % len(_STATES)]
    arena = (16 + 16 * (i % 4)) * _MiB
    max_tokens = 2048
    tokens = min(max_tokens, 37 + i * 11 + int(t_s * (1 + i % 3)))
    return {
        "id": f"s-{i:04x}",
        "uid": uid if i % 3 else uid + 1,
        "pid": 4000 + i // 4,
        "model": "demo" if i % 5 else "dummy:gpt2",
        "state": state,
        "paused_at": 6 if state == "PAUSED" else None,
        "phase": "IO_WAIT" if state in ("IO_WAIT", "SWAPPED") else "COMPUTE",
        "phase_s": round((t_s + i) % 7, 3),
        "expected_ms": 2000 if state == "IO_WAIT" else None,
        "residency": "host" if state == "SWAPPED" else "device",
        "arena_nbytes": arena,
        "arena_used_nbytes": min(arena, tokens * 8192),
        "tokens": tokens,
        "max_tokens": max_tokens,
        "age_s": round(t_s + 5 + i * 0.5, 3),
        "idle_s": round((t_s * (1 + i % 2) + rng.random()) % (5 + i % 40), 3),
        "checkpoints": i % 2,
    }


def _seg(capacity: int, used: int) -> dict[str, int]:
    used = min(capacity, used)
    return {"capacity_nbytes": capacity, "used_nbytes": used, "free_nbytes": capacity - used,
            "largest_free_nbytes": capacity - used}


def synthetic_snapshot(sessions: int = 8, t_s: float = 10.0, seed: int = 0, uid: int | None = None) -> dict[str, Any]:
    """A plausible `stat` reply for a daemon `t_s` seconds after boot with `sessions` open sessions."""
    rng = random.Random(seed * 1_000_003 + int(t_s * 1000))
    owner = os.getuid() if uid is None else uid
    rows = [_session(i, t_s, rng, owner) for i in range(sessions)]
    data_used = sum(s["arena_nbytes"] for s in rows if s["residency"] == "device")
    host_used = sum(s["arena_nbytes"] for s in rows if s["residency"] == "host")
    calls = int(t_s * 400)
    return {
        "version": "0.1.0",
        "protocol": 1,
        "pid": 1234 + seed,
        "uptime_s": t_s,
        "device": "cpu",
        "policy": "proactive",
        "models": [
            {"name": "demo", "spec": "demo", "dtype": "float32", "params": 1_234_567,
             "text_nbytes": 4_938_268, "sessions": sum(1 for s in rows if s["model"] == "demo")},
            {"name": "dummy:gpt2", "spec": "dummy:gpt2", "dtype": "float16", "params": 124_439_808,
             "text_nbytes": 248_879_616, "sessions": sum(1 for s in rows if s["model"] != "demo")},
        ],
        "sessions": rows,
        "syscalls": {
            "stat": {"count": int(t_s * 4), "errors": 0, "p50_us": 40.0, "p99_us": 120.0},
            "forward": {"count": calls, "errors": calls // 500, "p50_us": 812.0, "p99_us": 1500.0},
            "signal_phase": {"count": calls // 4, "errors": 0, "p50_us": 22.0, "p99_us": 90.0},
            "open_session": {"count": sessions, "errors": 0, "p50_us": 300.0, "p99_us": 900.0},
        },
        "memory": {
            "segments": {
                "text": _seg(512 * _MiB, 4_938_268 + 248_879_616),
                "data": _seg(max(data_used, 1) * 2, data_used),
                "stack": _seg(256 * _MiB, int(64 * _MiB * (1 + (t_s % 2)))),
                "host": _seg(max(host_used, 1) * 4, host_used),
            },
            "swap": {
                "out": {"bytes": int(t_s * 24 * _MiB), "ops": int(t_s), "seconds": t_s / 100},
                "in": {"bytes": int(t_s * 20 * _MiB), "ops": int(t_s), "seconds": t_s / 100},
                "by_cause": {"signal": int(t_s), "idle": 0, "pressure": 0, "syscall": 1, "prefetch": int(t_s)},
            },
            "prefetch": {"pending": sessions // 10, "late": 0, "on_time": int(t_s)},
        },
        "checkpoints": [{"id": "c-0001", "session": "s-0000", "nbytes": _MiB, "ready": True}] if sessions else [],
    }


class FakeSource:
    """A StatSource without a daemon.

    `snapshot` makes each reply from the fake's clock (seconds since it started,
    or `clock()` when given). Set `down` to make every call raise Unavailable,
    as a stopped daemon would; closed sessions disappear from later snapshots;
    closing a session owned by another uid raises EPERM unless `uid` is 0.
    """

    def __init__(
        self,
        sessions: int = 8,
        *,
        uid: int | None = None,
        snapshot: Callable[[float], dict[str, Any]] | None = None,
        clock: Callable[[], float] | None = None,
        target: str = "fake",
    ) -> None:
        import time

        self.uid = os.getuid() if uid is None else uid
        self.down = False
        self.calls = 0
        self.closed: set[str] = set()
        self._sessions = sessions
        self._snapshot = snapshot
        start = time.monotonic()
        self._clock = clock or (lambda: 10.0 + time.monotonic() - start)
        self._target = target
        self._lock = threading.Lock()

    @property
    def target(self) -> str:
        return self._target

    def _check(self) -> None:
        if self.down:
            raise Unavailable(self._target, "connection refused")

    def stat(self) -> dict[str, Any]:
        with self._lock:
            self._check()
            self.calls += 1
            t = self._clock()
            snap = self._snapshot(t) if self._snapshot else synthetic_snapshot(self._sessions, t, uid=self.uid)
            if self.closed:
                snap = dict(snap, sessions=[s for s in snap.get("sessions", []) if s.get("id") not in self.closed])
            return snap

    def close_session(self, session: str) -> None:
        from djinn.kernel.errors import ENOENT, EPERM

        with self._lock:
            self._check()
            t = self._clock()
            snap = self._snapshot(t) if self._snapshot else synthetic_snapshot(self._sessions, t, uid=self.uid)
            row = next((s for s in snap.get("sessions", []) if s.get("id") == session), None)
            if row is None or session in self.closed:
                raise ENOENT(f"no session {session}")
            if self.uid != 0 and row.get("uid") != self.uid:
                raise EPERM(f"session {session} belongs to uid {row.get('uid')}; only its owner or root may close it")
            self.closed.add(session)

    def close(self) -> None:
        pass
