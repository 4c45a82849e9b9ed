"""The dispatcher: one request frame in, one or more reply frames out.

Rules:
- Lookup, argument validation and the ownership check happen here, once, for
  every syscall; handlers receive clean arguments and a resolved Session.
- Requests of one session run in arrival order (the session's lock, FIFO);
  requests of different sessions, and control syscalls, interleave freely.
- Every outcome is a reply: a KernelError becomes its errno, anything else is a
  bug, logged with its traceback and answered EIO. CancelledError propagates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from djinn.syscalls.schema import validate
from djinn.syscalls.table import TABLE

from .errors import EACCES, ECANCELED, EIO, ENOSYS, EPROTO, KernelError
from .sessions import InvalidTransition

if TYPE_CHECKING:
    from .core import Kernel

__all__ = ["Call", "Peer", "dispatch"]

log = logging.getLogger("djinn.dispatch")


class Peer(Protocol):
    """What the dispatcher needs of a connection."""

    id: int
    uid: int | None
    pid: int
    authed: bool
    closed: bool

    def reply(self, rid: int, result: Any, *, more: bool = False) -> None: ...
    def reply_error(self, rid: int, err: KernelError) -> None: ...
    async def drain(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Call:
    """The context of one request, handed to its handler."""

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


async def dispatch(kernel: Kernel, peer: Peer, rid: int, name: Any, raw_args: Any) -> None:
    """Run one request to completion and send its reply (or replies). Never raises but CancelledError."""
    t0 = time.perf_counter()
    ok = False
    label = name if isinstance(name, str) and name in TABLE else "<unknown>"
    try:
        row = TABLE.get(name) if isinstance(name, str) else None
        if row is None:
            raise ENOSYS(f"no syscall named {name!r}; see docs/PROTOCOL.md for the list")
        if not peer.authed and "preauth" not in row.flags:
            if peer.uid is None:
                raise EACCES(f"{name}: authenticate first with hello and the daemon's token")
            raise EPROTO(f"{name}: the first request on a connection must be hello")
        if raw_args is None:
            raw_args = {}
        args = validate(name, row.args, raw_args)
        call = Call(rid, name, peer)
        if kernel.shutting_down and name != "hello":
            kernel.refuse_new_work(name)
        if "session" in row.flags:
            session = kernel.sessions.get(args["session"], call.uid)
            args["session"] = session
            async with session.lock:
                session.touch()
                await _run(row, kernel, call, args, peer, rid)
        else:
            await _run(row, kernel, call, args, peer, rid)
        ok = True
    except KernelError as err:
        peer.reply_error(rid, err)
    except asyncio.CancelledError:
        if not peer.closed:
            peer.reply_error(rid, ECANCELED(f"{name}: cancelled (the daemon is shutting down)"))
        raise
    except InvalidTransition as exc:
        kernel.quarantine(exc)
        peer.reply_error(rid, EIO(f"{name}: internal state error; the session was closed: {exc}"))
    except Exception as exc:  # noqa: BLE001 - a bug in a handler must not take the daemon down
        log.exception("syscall %s failed with an unexpected error", name)
        peer.reply_error(rid, EIO(f"{name}: internal error ({type(exc).__name__}: {exc})"))
    finally:
        kernel.stats.record(label, time.perf_counter() - t0, ok)


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
    return last

