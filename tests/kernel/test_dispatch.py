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
from djinn.kernel.errors import EBUSY, ESHUTDOWN, KernelError
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

    def refuse_new_work(self, name: str) -> None:
        raise ESHUTDOWN(f"{name}: shutting down")


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
    monkeypatch.setattr(dispatch_mod, "BARE_CALLS", frozenset({name}) if inline else frozenset())
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
    monkeypatch.setattr(dispatch_mod, "BARE_CALLS", dispatch_mod.BARE_CALLS - {"models"})
    kernel, peer = FakeKernel(), FakePeer()
    task = asyncio.ensure_future(dispatch_mod.dispatch_now(kernel, peer, 4, "models", {}))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert peer.cancelled_ids == [4]  # before the ECANCELED, so a device call still running cannot answer too
    assert [(rid, err.errno) for rid, err in peer.errors] == [(4, "ECANCELED")] and peer.replies == []


# -- the bare lane: a plain syscall without arguments skips the look-up and validation, nothing else --


def test_bare_calls_are_the_plain_syscalls_without_arguments() -> None:
    bare = dispatch_mod.BARE_CALLS
    assert {"nop", "stat", "models"} <= bare and not {"hello", "echo", "forward", "open_session"} & bare
    assert not bare & dispatch_mod.ASYNC_CALLS and all(not TABLE[name].args for name in bare)


@pytest.mark.parametrize("name", sorted(dispatch_mod.BARE_CALLS))
@pytest.mark.parametrize("raw_args", [{}, None])
def test_a_bare_call_is_answered_and_counted(monkeypatch, name: str, raw_args: Any) -> None:
    seen: list[Any] = []

    def handler(k: Any, call: Any) -> dict[str, Any]:
        seen.append(call)
        return {"answered": call.name}

    monkeypatch.setitem(TABLE, name, dataclasses.replace(TABLE[name], handler=handler))
    kernel, peer = FakeKernel(), FakePeer()
    assert dispatch_mod.dispatch_now(kernel, peer, 9, name, raw_args) is None
    assert peer.replies == [(9, {"answered": name})] and peer.errors == []
    assert [(c.id, c.name, c.peer) for c in seen] == [(9, name, peer)]
    assert kernel.stats.snapshot()[name]["count"] == 1


@pytest.mark.parametrize(("authed", "uid", "shutting_down", "errno"), [
    (False, 0, False, "EPROTO"),  # hello comes first
    (False, None, False, "EACCES"),  # over TCP without the token
    (True, 0, True, "ESHUTDOWN"),
])
def test_a_bare_call_is_refused_as_any_other(authed: bool, uid: int | None, shutting_down: bool, errno: str) -> None:
    kernel, peer = FakeKernel(), FakePeer()
    kernel.shutting_down = shutting_down
    peer.authed, peer.uid = authed, uid
    assert dispatch_mod.dispatch_now(kernel, peer, 3, "nop", {}) is None
    assert peer.replies == [] and [(rid, err.errno) for rid, err in peer.errors] == [(3, errno)]
    assert kernel.stats.snapshot()["nop"]["errors"] == 1


@pytest.mark.parametrize("name", [["nop"], {"nop": 1}, 7, None])
def test_a_name_that_is_not_text_is_enosys(name: Any) -> None:
    kernel, peer = FakeKernel(), FakePeer()
    assert dispatch_mod.dispatch_now(kernel, peer, 6, name, {}) is None
    assert peer.replies == [] and [(rid, err.errno) for rid, err in peer.errors] == [(6, "ENOSYS")]


def test_arguments_to_a_bare_call_are_validated() -> None:
    kernel, peer = FakeKernel(), FakePeer()
    assert dispatch_mod.dispatch_now(kernel, peer, 5, "nop", {"surprise": 1}) is None
    assert peer.replies == [] and [(rid, err.errno) for rid, err in peer.errors] == [(5, "EINVAL")]
    assert "surprise" in peer.errors[0][1].message
