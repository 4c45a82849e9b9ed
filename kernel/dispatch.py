"""The dispatcher: one request frame in, one or more reply frames out.

Rules:
- Lookup, argument validation and the ownership check happen here, once, for
  every syscall; handlers receive clean arguments and a resolved Session.
- Every request is checked at once, in arrival order, inside the protocol
  callback that read its frame (`dispatch_now`). A handler's kind then says how
  it runs. A plain function is a control syscall that never waits: it runs there
  and then, with no task; plain handlers take no session and touch no device. A
  coroutine (or async generator) runs in a task of its own (`dispatch`).
- Requests of one session run in arrival order (the session's lock, FIFO);
  requests of different sessions, and control syscalls, interleave freely.
- Every outcome is a reply: a KernelError becomes its errno, anything else is a
  bug, logged with its traceback and answered EIO. CancelledError propagates.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, Protocol

from djinn.syscalls.schema import validate
from djinn.syscalls.table import TABLE

from .errors import EACCES, ECANCELED, EIO, ENOSYS, EPROTO, ESHUTDOWN, KernelError
from .sessions import InvalidTransition

if TYPE_CHECKING:
    from .core import Kernel

__all__ = ["ASYNC_CALLS", "BARE_CALLS", "Call", "Peer", "dispatch", "dispatch_now"]

log = logging.getLogger("djinn.dispatch")
_now = time.perf_counter

# Syscalls whose handler awaits: each runs in a task. Every other name, unknown
# ones included, is answered by dispatch_now without a task.
ASYNC_CALLS: frozenset[str] = frozenset(
    name for name, row in TABLE.items()
    if inspect.iscoroutinefunction(row.handler) or inspect.isasyncgenfunction(row.handler)
)

# For syscalls without required arguments: the arguments validate() makes of an
# empty map, so that a call with no arguments skips the validator.
_NO_ARGS: dict[str, dict[str, Any]] = {
    name: {a.name: a.default for a in row.args} for name, row in TABLE.items() if not any(a.required for a in row.args)
}


# Plain syscalls that take no arguments (nop, stat, models): one called with none, by an authenticated
# peer while the kernel runs, has nothing to check or validate, and its handler is called at once.
BARE_CALLS: frozenset[str] = frozenset(name for name, row in TABLE.items() if name not in ASYNC_CALLS and not row.args)


class Peer(Protocol):
    """What the dispatcher needs of a connection."""

    id: int
    uid: int | None
    pid: int
    authed: bool
    closed: bool

    def reply(self, rid: int, result: Any, *, more: bool = False) -> None: ...
    def reply_error(self, rid: int, err: KernelError) -> None: ...
    def send_now(self, rid: int, parts: list[Any]) -> bool: ...
    def cancelled(self, rid: int) -> None: ...
    async def drain(self) -> None: ...


class Call(NamedTuple):
    """The context of one request, handed to its handler.

    Immutable; a NamedTuple rather than a frozen dataclass because one is made per
    request and a frozen dataclass costs three times as much to build.
    """

    id: int
    name: str
    peer: Peer

    @property
    def uid(self) -> int:
        assert self.peer.uid is not None, "authenticated calls always have a uid"
        return self.peer.uid

    @property
    def pid(self) -> int:
        return self.peer.pid


_new_call = tuple.__new__  # Call(...) through its generated __new__ costs twice as much


def _refuse_unauthed(peer: Peer, name: str) -> NoReturn:
    if peer.uid is None:
        raise EACCES(f"{name}: authenticate first with hello and the daemon's token")
    raise EPROTO(f"{name}: the first request on a connection must be hello")


def dispatch_now(kernel: Kernel, peer: Peer, rid: int, name: Any, raw_args: Any) -> Coroutine[Any, Any, None] | None:
    """The part of every request that runs at once, in arrival order, inside the protocol callback:
    lookup, the hello/token check, argument validation and the shutdown refusal. A plain handler
    (a name not in ASYNC_CALLS) then runs and is answered before this returns (None). For any other
    the coroutine that runs the handler is returned, for the caller to start as a task; a request
    that fails here is answered at once (None). Never raises. The handler must not block.

    Checking every request before any handler of a later one runs keeps "hello first" true for
    pipelined requests: hello, answered inline, cannot authenticate a call sent before it.
    """
    t0 = _now()
    try:
        if type(name) is str and not raw_args and name in BARE_CALLS and peer.authed and not kernel.shutting_down:
            result = TABLE[name].handler(kernel, _new_call(Call, (rid, name, peer)))  # the usual control call
        else:
            # Look the syscall up, check the caller may make it, validate its arguments.
            row = TABLE.get(name) if type(name) is str else None
            if row is None:
                raise ENOSYS(f"no syscall named {name!r}; see docs/PROTOCOL.md for the list")
            if not peer.authed and "preauth" not in row.flags:
                _refuse_unauthed(peer, name)
            defaults = _NO_ARGS.get(name) if not raw_args and (raw_args is None or type(raw_args) is dict) else None
            if defaults is not None:
                args = dict(defaults) if defaults else {}
            else:
                args = validate(name, row.args, {} if raw_args is None else raw_args)
            if kernel.shutting_down and name != "hello":
                kernel.refuse_new_work(name)
            call = _new_call(Call, (rid, name, peer))
            if name in ASYNC_CALLS:
                return dispatch(kernel, peer, row, call, args, t0)  # it records the stats
            result = row.handler(kernel, call, **args) if args else row.handler(kernel, call)
        peer.reply(rid, {} if result is None else result)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reply; see _reply_failure
        _reply_failure(kernel, peer, rid, name, exc)
        kernel.stats.record(name if type(name) is str and name in TABLE else "<unknown>", _now() - t0, False)
        return None
    kernel.stats.record(name, _now() - t0, True)
    return None


async def dispatch(kernel: Kernel, peer: Peer, row: Any, call: Call, args: dict[str, Any], t0: float) -> None:
    """Run a checked request (from dispatch_now) to completion and send its reply (or replies).
    Never raises but CancelledError."""
    ok = False
    rid, name = call.id, call.name
    try:
        if "session" in row.flags:
            session = kernel.sessions.get(args["session"], call.uid)
            args["session"] = session
            try:
                async with session.lock:
                    session.touch()
                    await _run(row, kernel, call, args, peer, rid)
            finally:
                kernel.memory.request_ended()  # its memory may go to a request waiting for room
        else:
            await _run(row, kernel, call, args, peer, rid)
        ok = True
    except asyncio.CancelledError:
        if not peer.closed:
            peer.cancelled(rid)  # a device call still running must not answer it as well
            peer.reply_error(rid, _cancelled_error(kernel, name))
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reply; see _reply_failure
        _reply_failure(kernel, peer, rid, name, exc)
    finally:
        kernel.stats.record(name, _now() - t0, ok)


def _cancelled_error(kernel: Kernel, name: str) -> KernelError:
    """The answer to a request whose task was cancelled: ESHUTDOWN when shutdown() gave up on it
    (the shutdown timeout ended first), ECANCELED for any other cancellation."""
    if kernel.shutting_down:
        return ESHUTDOWN(f"{name}: still running when the shutdown timeout ended; the daemon is shutting down, "
                         "retry after it restarts")
    return ECANCELED(f"{name}: cancelled")


def _reply_failure(kernel: Kernel, peer: Peer, rid: int, name: Any, exc: Exception) -> None:
    """Answer a request that raised. A KernelError is its own errno. A session state-machine bug
    quarantines that session and answers EIO; any other exception is a handler bug: logged, EIO.
    Either way the daemon and every other session carry on."""
    if isinstance(exc, KernelError):
        peer.reply_error(rid, exc)
    elif isinstance(exc, InvalidTransition):
        kernel.quarantine(exc)
        peer.reply_error(rid, EIO(f"{name}: internal state error; the session was closed: {exc}"))
    else:
        log.error("syscall %s failed with an unexpected error", name, exc_info=exc)
        peer.reply_error(rid, EIO(f"{name}: internal error ({type(exc).__name__}: {exc})"))


async def _run(row: Any, kernel: Kernel, call: Call, args: dict[str, Any], peer: Peer, rid: int) -> None:
    if "stream" in row.flags and args.get("stream", True):
        n = 0
        async for item in row.handler(kernel, call, **args):
            if peer.closed:
                raise ECANCELED(f"{call.name}: the client went away")
            peer.reply(rid, item, more=True)
            n += 1
            await peer.drain()
        peer.reply(rid, {"done": True, "frames": n})
        return
    if "stream" in row.flags:
        items = [item async for item in row.handler(kernel, call, **args)]
        peer.reply(rid, _merge_stream(items))
        return
    result = await row.handler(kernel, call, **args)
    peer.reply(rid, {} if result is None else result)


def _merge_stream(items: list[Any]) -> Any:
    """A streamed handler called with stream=False: its last item, with every token id gathered."""
    if not items:
        return {"tokens": []}
    last = dict(items[-1]) if isinstance(items[-1], dict) else {"value": items[-1]}
    if all(isinstance(i, dict) and "token" in i for i in items):
        last["tokens"] = [i["token"] for i in items]
        last.pop("token", None)
        if all("text" in i for i in items):
            last["text"] = "".join(i["text"] for i in items)
    return last

