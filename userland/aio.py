"""The asyncio twin of the client: `await djinn.aio.connect()` returns an AsyncKernel.

Rules: one connection, many requests in flight; a reader protocol routes each
reply frame to its request's future (or stream queue) by id, and drops the
frames of an id nobody waits for (a `post()`ed request's).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from typing import Any, AsyncIterator

from djinn.kernel import abi
from djinn.kernel.codec import Decoder, ProtocolError
from djinn.kernel.config import client_socket_path
from djinn.kernel.errors import from_wire
from djinn.kernel.tensors import PAYLOAD_POOL, encode_request, unpack

from .session import Result, result_from_reply

__all__ = ["AsyncKernel", "AsyncSession", "connect"]


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.decoder = Decoder(alloc_payload=PAYLOAD_POOL)
        self.waiters: dict[int, asyncio.Queue[Any]] = {}
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.decoder.buffer_updated(nbytes)
            while (frame := self.decoder.next_frame()) is not None:
                q = self.waiters.get(frame.header.get("id"))
                if q is not None:
                    q.put_nowait(frame)
                elif frame.header.get("id") == 0:
                    self._fail(from_wire(frame.header.get("error")))
        except ProtocolError as e:
            self._fail(e)
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("djinnd closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        for q in self.waiters.values():
            q.put_nowait(exc)


class AsyncKernel:
    """An asyncio connection to djinnd; `async with` closes it."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._proto = protocol
        self._ids = itertools.count(1)
        self.server: dict[str, Any] = {}

    def _submit(self, name: str, args: dict[str, Any]) -> tuple[int, asyncio.Queue[Any]]:
        q: asyncio.Queue[Any] = asyncio.Queue()
        return self._write(name, args, q), q

    def _write(self, name: str, args: dict[str, Any], q: asyncio.Queue[Any] | None) -> int:
        """Send one request; its frames go to `q`, or with None are dropped as they arrive."""
        if self._proto.lost is not None:
            raise ConnectionError(f"connection to djinnd is gone: {self._proto.lost}")
        rid = next(self._ids)
        parts = encode_request(rid, name, args)
        if q is not None:
            self._proto.waiters[rid] = q
        if len(parts) == 1:
            self._transport.write(parts[0])  # sent at once; writelines() would wait for the loop's next turn
        else:
            self._transport.writelines(parts)
        return rid

    def post(self, name: str, /, **args: Any) -> None:
        """Send a request and do not wait for its reply (fire and forget): the reader drops its frames,
        a result or an error alike, and nothing is raised for them. Raises ConnectionError only if the
        connection is already gone."""
        self._write(name, args, None)

    @staticmethod
    def _decode(frame: Any) -> Any:
        if isinstance(frame, BaseException):
            raise frame
        h = frame.header
        if not h.get("ok", False):
            raise from_wire(h.get("error"))
        return unpack(h.get("result"), frame)

    async def syscall(self, name: str, /, **args: Any) -> Any:
        async with contextlib.aclosing(self._replies(name, args)) as replies:
            async for result, _more in replies:
                pass  # every frame is decoded (an error raises); the final one's result is the reply
        return result

    async def stream(self, name: str, /, **args: Any) -> AsyncIterator[Any]:
        async with contextlib.aclosing(self._replies(name, args)) as replies:
            async for result, more in replies:
                if not more:
                    return
                yield result

    async def _replies(self, name: str, args: dict[str, Any]) -> AsyncIterator[tuple[Any, bool]]:
        """(decoded result, more frames follow) for each frame of the reply, up to the final one."""
        rid, q = self._submit(name, args)
        try:
            while True:
                frame = await q.get()
                result = self._decode(frame)
                yield result, bool(frame.more)
                if not frame.more:
                    return
        finally:
            self._proto.waiters.pop(rid, None)

    async def stat(self) -> dict[str, Any]:
        return await self.syscall("stat")

    async def open_session(self, model: str | None = None, **opts: Any) -> AsyncSession:
        reply = await self.syscall("open_session", model=model, **opts)
        return AsyncSession(self, reply["session"], reply)

    async def fork(self, checkpoint: str) -> AsyncSession:
        reply = await self.syscall("fork", checkpoint=checkpoint)
        return AsyncSession(self, reply["session"], reply)

    async def close(self) -> None:
        self._transport.close()

    async def __aenter__(self) -> AsyncKernel:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncSession:
    """The async twin of djinn.Session."""

    def __init__(self, kernel: AsyncKernel, sid: str, info: dict[str, Any]) -> None:
        self.kernel = kernel
        self.id = sid
        self.info = info

    async def _call(self, name: str, **args: Any) -> Any:
        return await self.kernel.syscall(name, session=self.id, **args)

    async def forward(self, input_ids: Any, *, return_logits: str | int = "last", pause_at: int | None = None,
                      return_activation: str = "none") -> Result:
        return result_from_reply(await self._call("forward", input_ids=input_ids, return_logits=return_logits,
                                                  pause_at=pause_at, return_activation=return_activation))

    async def resume(self, activation: Any = None, *, pause_at: int | None = None, return_logits: str | int = "last",
                     return_activation: str = "none") -> Result:
        return result_from_reply(await self._call("resume", activation=activation, pause_at=pause_at,
                                                  return_logits=return_logits, return_activation=return_activation))

    async def generate(self, input_ids: Any, max_new_tokens: int = 16, **opts: Any) -> list[int]:
        return (await self._call("generate", input_ids=input_ids, max_new_tokens=max_new_tokens, stream=False,
                                 **opts))["tokens"]

    async def generate_stream(self, input_ids: Any, max_new_tokens: int = 16, **opts: Any) -> AsyncIterator[int]:
        async for item in self.kernel.stream("generate", session=self.id, input_ids=input_ids,
                                             max_new_tokens=max_new_tokens, stream=True, **opts):
            yield int(item["token"])

    async def signal_phase(self, phase: str, expected_ms: float | None = None, *,
                           wait: bool = True) -> dict[str, Any] | None:
        """As Session.signal_phase: with wait=False the request is only sent (AsyncKernel.post) and None is
        returned; its reply, or its error, is dropped."""
        if not wait:
            self.kernel.post("signal_phase", session=self.id, phase=phase, expected_ms=expected_ms)
            return None
        return await self._call("signal_phase", phase=phase, expected_ms=expected_ms)

    async def checkpoint(self) -> str:
        return (await self._call("checkpoint"))["checkpoint"]

    async def restore(self, checkpoint: str) -> None:
        await self._call("restore", checkpoint=checkpoint)

    async def alloc_arena(self, nbytes: int) -> dict[str, Any]:
        """As Session.alloc_arena: reserve or grow the arena; {arena_nbytes, used_nbytes}."""
        return await self._call("alloc_arena", nbytes=nbytes)

    async def free_arena(self) -> None:
        """As Session.free_arena: ENOENT with no arena, EBUSY if it holds a model's KV cache."""
        await self._call("free_arena")

    async def page_out(self) -> dict[str, Any]:
        return await self._call("page_out")

    async def page_in(self) -> dict[str, Any]:
        return await self._call("page_in")

    async def close(self) -> None:
        await self._call("close_session")


async def connect(path: str | None = None, *, tcp: str | None = None, token: str | None = None,
                  client: str = "djinn-python-aio") -> AsyncKernel:
    """Open an asyncio connection and complete the hello handshake."""
    loop = asyncio.get_running_loop()
    tcp = tcp or os.environ.get("DJINN_TCP")
    if tcp:
        host, _, port = tcp.rpartition(":")
        transport, proto = await loop.create_connection(_Protocol, host or "127.0.0.1", int(port))
    else:
        target = client_socket_path(path)
        try:
            transport, proto = await loop.create_unix_connection(_Protocol, target)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise type(e)(e.errno, f"no djinnd is listening on {target}: start one with `djinnd`") from None
    k = AsyncKernel(transport, proto)  # type: ignore[arg-type]
    args: dict[str, Any] = {"protocol": abi.PROTOCOL_VERSION, "client": client}
    token = token or os.environ.get("DJINN_TOKEN")
    if token:
        args["token"] = token
    k.server = await k.syscall("hello", **args)
    return k
