"""Replies sent by the device worker (Connection.send_now): whole frames, never interleaved, the loop's
bookkeeping finished before any later request of that connection starts, one reply per request; and the
connection's backpressure on a real socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
from typing import Any, AsyncIterator

import pytest
import torch

from djinn.kernel import abi
from djinn.kernel.codec import Decoder
from djinn.kernel.errors import ECANCELED, EIO
from djinn.kernel.server import Connection
from djinn.kernel.tensors import EncodedReply, encode_message, encode_reply, unpack
from tests.fakes import ConnectionKernel


@contextlib.asynccontextmanager
async def _served() -> AsyncIterator[tuple[Connection, socket.socket]]:
    """A Connection on a real Unix socket of the running loop, and the client's end (non-blocking)."""
    loop = asyncio.get_running_loop()
    path = os.path.join(tempfile.mkdtemp(prefix="djinn-test-"), "s.sock")
    made: asyncio.Future[Connection] = loop.create_future()

    def factory() -> Connection:
        conn = Connection(ConnectionKernel(), "unix")  # type: ignore[arg-type]
        conn.authed = True
        made.set_result(conn)
        return conn

    server = await loop.create_unix_server(factory, path)
    client = socket.socket(socket.AF_UNIX)
    client.setblocking(False)
    try:
        await loop.sock_connect(client, path)
        conn = await made
        while conn.transport is None:  # connection_made runs after the factory
            await asyncio.sleep(0.001)
        yield conn, client
    finally:
        client.close()
        server.close()


async def _frames(client: socket.socket, n: int) -> list[Any]:
    dec = Decoder()
    out: list[Any] = []
    loop = asyncio.get_running_loop()
    while len(out) < n:
        data = await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 5)
        assert data, "the server closed the connection"
        dec.feed(data)
        while (f := dec.next_frame()) is not None:
            out.append(f)
    return out


def _on_worker(fn: Any) -> Any:
    """Run fn on a thread of its own, as the device worker would, and return its result."""
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join()
    return box[0]


async def test_a_reply_sent_from_the_worker_arrives_whole_and_later_requests_wait_for_the_loop():
    async with _served() as (conn, client):
        parts = encode_reply(7, {"position": 3})
        assert _on_worker(lambda: conn.send_now(7, parts))
        assert [f.header["id"] for f in await _frames(client, 1)] == [7]
        # The client's next request arrives before the loop settled request 7: it waits.
        client.send(encode_message({"id": 8, "call": "nop", "args": {}})[0])
        await asyncio.sleep(0.05)
        assert len(conn._held) == 1
        conn.reply(7, EncodedReply(7, parts, sent=True))  # the loop finishes request 7
        assert [f.header["id"] for f in await _frames(client, 1)] == [8]
        assert not conn._held and not conn._early


async def test_the_worker_defers_to_bytes_the_loop_has_queued():
    async with _served() as (conn, client):
        conn.transport.pause_reading()
        big = encode_reply(1, {"blob": torch.full((8 << 20,), 120, dtype=torch.uint8)})  # more than one send takes
        conn._write(big)
        assert conn.transport.get_write_buffer_size() > 0
        assert not _on_worker(lambda: conn.send_now(2, encode_reply(2, {})))  # would interleave: refused
        conn.reply(2, {})
        frames = await _frames(client, 2)
        assert [f.header["id"] for f in frames] == [1, 2]
        assert torch.equal(unpack(frames[0].header["result"], frames[0])["blob"], torch.full((8 << 20,), 120, dtype=torch.uint8))


async def test_what_the_socket_does_not_take_is_written_by_the_loop_before_anything_else():
    async with _served() as (conn, client):
        blob = torch.arange(8 << 20, dtype=torch.int32).to(torch.uint8)
        big = encode_reply(1, {"blob": blob})
        assert _on_worker(lambda: conn.send_now(1, big))
        assert conn._deferred, "the socket took all of 8 MiB at once; the test needs a partial write"
        conn.reply(2, {"after": True})  # a later reply from the loop goes after the rest of reply 1
        frames = await _frames(client, 2)
        assert [f.header["id"] for f in frames] == [1, 2]
        assert torch.equal(unpack(frames[0].header["result"], frames[0])["blob"], blob)


async def test_an_error_after_the_reply_went_out_is_not_a_second_reply(caplog):
    async with _served() as (conn, client):
        assert _on_worker(lambda: conn.send_now(5, encode_reply(5, {"ok": 1})))
        conn.reply_error(5, EIO("failed in the bookkeeping"))
        conn.reply(6, {})
        frames = await _frames(client, 2)
        assert [(f.header["id"], f.header["ok"]) for f in frames] == [(5, True), (6, True)]
        assert "after its reply was sent" in caplog.text


async def test_nothing_is_sent_from_the_worker_once_the_connection_closes():
    async with _served() as (conn, client):
        conn.close()
        assert not _on_worker(lambda: conn.send_now(3, encode_reply(3, {})))
        for _ in range(100):  # connection_lost runs on a later turn of the loop
            if conn.kernel.closed:
                break
            await asyncio.sleep(0.01)
        assert conn.kernel.closed == [conn] and conn._fd == -1  # the dup is closed with the connection
        assert not _on_worker(lambda: conn.send_now(3, encode_reply(3, {})))


@pytest.mark.parametrize("n_parts", [513])
async def test_too_many_parts_go_through_the_loop(n_parts):
    async with _served() as (conn, client):
        assert not _on_worker(lambda: conn.send_now(4, [b"x"] * n_parts))
        assert not conn._early


async def test_a_held_request_waits_only_for_replies_sent_before_it_was_read():
    async with _served() as (conn, client):
        first, second = encode_reply(7, {"n": 1}), encode_reply(9, {"n": 2})
        assert _on_worker(lambda: conn.send_now(7, first))
        client.send(encode_message({"id": 8, "call": "nop", "args": {}})[0])
        await asyncio.sleep(0.05)
        assert _on_worker(lambda: conn.send_now(9, second))  # sent after request 8 was read
        assert [f.header["id"] for f in await _frames(client, 2)] == [7, 9]
        assert len(conn._held) == 1
        conn.reply(7, EncodedReply(7, first, sent=True))
        assert [f.header["id"] for f in await _frames(client, 1)] == [8]  # 9 is still unfinished
        client.send(encode_message({"id": 10, "call": "nop", "args": {}})[0])  # read after 9 was sent: waits
        await asyncio.sleep(0.05)
        assert [seq for seq, _ in conn._held] == [2]
        conn.reply(9, EncodedReply(9, second, sent=True))
        assert [f.header["id"] for f in await _frames(client, 1)] == [10]


async def test_reading_pauses_while_too_many_requests_are_held_and_resumes_after():
    async with _served() as (conn, client):
        conn.kernel.limits = abi.Limits(max_inflight=2)
        parts = encode_reply(1, {})
        assert _on_worker(lambda: conn.send_now(1, parts))
        client.send(b"".join(encode_message({"id": i, "call": "nop", "args": {}})[0] for i in (2, 3, 4)))
        await asyncio.sleep(0.05)
        assert conn._held_paused and len(conn._held) == 3
        conn.reply(1, EncodedReply(1, parts, sent=True))
        assert [f.header["id"] for f in await _frames(client, 4)] == [1, 2, 3, 4]
        assert not conn._held_paused and not conn._held


async def test_the_reply_is_marked_sent_before_its_first_byte_leaves(monkeypatch):
    import djinn.kernel.server as server_mod

    async with _served() as (conn, client):
        seen: list[bool] = []
        real = server_mod.os.writev

        def writev(fd: int, parts: Any) -> int:
            seen.append(7 in conn._early)  # the client may answer the moment these bytes land
            return real(fd, parts)

        monkeypatch.setattr(server_mod.os, "writev", writev)
        assert _on_worker(lambda: conn.send_now(7, encode_reply(7, {})))
        assert seen == [True]


async def test_a_failed_write_is_left_to_the_loop_and_still_settles(monkeypatch):
    import djinn.kernel.server as server_mod

    async with _served() as (conn, client):
        def full(fd: int, parts: Any) -> int:
            raise BlockingIOError

        monkeypatch.setattr(server_mod.os, "writev", full)
        parts = encode_reply(7, {"n": 7})
        assert _on_worker(lambda: conn.send_now(7, parts))
        monkeypatch.undo()
        assert [f.header["id"] for f in await _frames(client, 1)] == [7]  # the loop wrote it
        conn.reply(7, EncodedReply(7, parts, sent=True))
        assert not conn._early


async def test_a_cancelled_request_gets_one_reply_and_holds_nothing():
    async with _served() as (conn, client):
        conn.cancelled(5)  # its task was cancelled while the worker still ran it
        conn.reply_error(5, ECANCELED("cancelled"))
        assert not _on_worker(lambda: conn.send_now(5, encode_reply(5, {})))  # the worker finishes: not sent
        client.send(encode_message({"id": 6, "call": "nop", "args": {}})[0])
        frames = await _frames(client, 2)
        assert [(f.header["id"], f.header["ok"]) for f in frames] == [(5, False), (6, True)]
        assert not conn._early and not conn._held and not conn._cancelled


async def test_close_writes_the_rest_of_a_reply_the_worker_began():
    async with _served() as (conn, client):
        blob = torch.arange(8 << 20, dtype=torch.int32).to(torch.uint8)
        assert _on_worker(lambda: conn.send_now(1, encode_reply(1, {"blob": blob})))
        assert conn._deferred
        conn.close()  # before the loop wrote the rest
        frames = await _frames(client, 1)
        assert torch.equal(unpack(frames[0].header["result"], frames[0])["blob"], blob)


async def test_reading_resumes_when_the_last_task_ends_even_with_one_request_in_flight_allowed():
    async with _served() as (conn, client):
        conn.kernel.limits = abi.Limits(max_inflight=1)
        task = asyncio.ensure_future(asyncio.sleep(0))
        await task
        conn.tasks.add(task)
        conn._reading_paused = True
        conn.transport.pause_reading()
        conn._done(task)
        assert not conn._reading_paused and conn.transport.is_reading()
