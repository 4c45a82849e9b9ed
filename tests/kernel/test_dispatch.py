"""The dispatcher's failure paths, with a fake kernel and peer: every failure is a reply, none escapes.

A KernelError answers its own errno; a session state-machine bug quarantines and answers EIO; any
other exception from a handler is logged and answers EIO. The same holds for inline (plain) handlers
and for handlers that run in a task.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import pytest

from djinn.kernel import dispatch as dispatch_mod
from djinn.kernel.errors import EBUSY, KernelError
from djinn.kernel.sessions import InvalidTransition
from djinn.kernel.stats import SyscallStats
from djinn.syscalls.table import TABLE


class FakePeer:
    authed, uid, pid, closed = True, 0, 1, False

    def __init__(self) -> None:
        self.replies: list[tuple[int, Any]] = []
        self.errors: list[tuple[int, KernelError]] = []
        self.cancelled_ids: list[int] = []
        self.drains = 0

    def reply(self, rid: int, result: Any, *, more: bool = False) -> None:
        self.replies.append((rid, result))

    def send_now(self, rid: int, parts: list[Any]) -> bool:
        return False

    def cancelled(self, rid: int) -> None:
        self.cancelled_ids.append(rid)

    def reply_error(self, rid: int, err: KernelError) -> None:
        self.errors.append((rid, err))

    async def drain(self) -> None:
        self.drains += 1


class FakeKernel:
    shutting_down = False

    def __init__(self) -> None:
        self.stats = SyscallStats()
        self.quarantined: list[Exception] = []

    def quarantine(self, exc: Exception) -> None:
        self.quarantined.append(exc)


FAILURES = [
    (EBUSY("busy now"), "EBUSY", False),
    (InvalidTransition("s-1", "RUNNING -> CLOSED"), "EIO", True),
    (ZeroDivisionError("a handler bug"), "EIO", False),
]


@pytest.mark.parametrize(("exc", "errno", "quarantined"), FAILURES)
@pytest.mark.parametrize("inline", [True, False])
def test_every_failure_is_a_reply(monkeypatch, caplog, exc, errno, quarantined, inline) -> None:
    def plain(k: Any, call: Any) -> None:
        raise exc

    async def in_task(k: Any, call: Any) -> None:
        raise exc

    # the same handler run inline (as nop) or in a task (models made async here)
    name = "nop" if inline else "models"
    monkeypatch.setitem(TABLE, name, dataclasses.replace(TABLE[name], handler=plain if inline else in_task))
    monkeypatch.setattr(dispatch_mod, "ASYNC_CALLS", frozenset() if inline else frozenset({name}))
    kernel, peer = FakeKernel(), FakePeer()
    with caplog.at_level(logging.ERROR, logger="djinn.dispatch"):
        work = dispatch_mod.dispatch_now(kernel, peer, 7, name, {})
        assert (work is None) == inline
        if work is not None:
            asyncio.run(work)
    assert peer.replies == [] and len(peer.errors) == 1
    rid, err = peer.errors[0]
    assert rid == 7 and err.errno == errno
    assert bool(kernel.quarantined) == quarantined
    assert ("a handler bug" in caplog.text) == isinstance(exc, ZeroDivisionError)
    stats = kernel.stats.snapshot()[name]
    assert stats["count"] == 1 and stats["errors"] == 1


async def test_a_cancelled_request_is_marked_for_the_peer_then_answered_ecanceled(monkeypatch) -> None:
    started = asyncio.Event()

    async def forever(k: Any, call: Any) -> None:
        started.set()
        await asyncio.Event().wait()

    monkeypatch.setitem(TABLE, "models", dataclasses.replace(TABLE["models"], handler=forever))
    monkeypatch.setattr(dispatch_mod, "ASYNC_CALLS", frozenset({"models"}))
    kernel, peer = FakeKernel(), FakePeer()
    task = asyncio.ensure_future(dispatch_mod.dispatch_now(kernel, peer, 4, "models", {}))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert peer.cancelled_ids == [4]  # before the ECANCELED, so a device call still running cannot answer too
    assert [(rid, err.errno) for rid, err in peer.errors] == [(4, "ECANCELED")] and peer.replies == []
