"""Listeners and the per-connection protocol (the asyncio shell around the sans-IO codec).

Rules:
- Bytes go straight from the socket into the decoder's preallocated buffers
  (`asyncio.BufferedProtocol`); large payloads land in buffers from the payload
  pool. Replies leave through `write` / `writelines` of bytes and memoryviews.
- `buffer_updated` feeds the decoder and hands each whole frame to the
  dispatcher (a read that is one usual request without tensors as its envelope
  alone, `Decoder.take_lone`), which checks it there and then, in arrival order: a control
  syscall (plain handler) is answered at once, any other starts one task. It
  never waits. On Python 3.12 and later the task starts eagerly: it runs inside
  this callback up to its first real wait, so a forward's device call is queued
  before the read returns, not a turn of the loop later. The reply to a read's
  only request is written at once, before the bookkeeping; replies to the
  requests of a read that carries several leave together in one write. Too many
  tasks in flight pause reading (backpressure).
- The device worker may write a forward/resume reply itself (`send_now`) when
  nothing is queued on the connection: writes from both threads take the
  connection's lock, the worker's go through a dup of the socket, and bytes the
  socket does not take at once are written by the loop before anything else.
  A request read before the loop has finished such a reply's request waits for
  it (`_held`), so it sees that request's effects.
- A protocol error answers EPROTO (request id 0) and closes that connection
  only. Every other connection carries on.
- The Unix socket is 0660. An existing socket file is replaced only after a test
  connect to it fails (no live daemon behind it).
"""

from __future__ import annotations

import asyncio
import collections
import errno as errno_mod
import itertools
import logging
import os
import socket
import stat as stat_mod
import struct
import sys
import threading
from typing import TYPE_CHECKING, Any

from .codec import FLAG_MORE, LONE_FRAME, SEND_BUFFER_NBYTES, Decoder, Frame, Part, ProtocolError
from .config import check_socket_dir
from .dispatch import dispatch_now
from .errors import EIO, EPROTO, KernelError
from .tensors import PAYLOAD_POOL, EncodedReply, encode_message, encode_reply, unpack

if TYPE_CHECKING:
    from .core import Kernel

__all__ = ["Connection", "bind_unix_socket", "parse_tcp"]

log = logging.getLogger("djinn.server")
_conn_ids = itertools.count(1)
_SEND_NOW_MAX_PARTS = 512  # os.writev's limit (IOV_MAX) is 1024 on Linux


if sys.version_info >= (3, 12):
    def _new_task(loop: asyncio.AbstractEventLoop, work: Any) -> asyncio.Task[None]:
        """A task for `work` that runs at once, up to its first wait: it takes its session lock and queues
        its device call inside the protocol callback. Requests keep their order: each one has run as far as
        it can before the next frame is looked at."""
        return asyncio.Task(work, loop=loop, eager_start=True)
else:
    def _new_task(loop: asyncio.AbstractEventLoop, work: Any) -> asyncio.Task[None]:
        return loop.create_task(work)


class Connection(asyncio.BufferedProtocol):
    """One client connection. Owned by the loop thread."""

    def __init__(self, kernel: Kernel, kind: str) -> None:
        self.kernel = kernel
        self.kind = kind
        self.id = next(_conn_ids)
        self.uid: int | None = None
        self.pid = 0
        self.authed = False
        self.closed = False
        self.close_after_reply = False
        self.transport: asyncio.Transport | None = None
        self.decoder = Decoder(kernel.limits, alloc_payload=kernel.alloc_payload or PAYLOAD_POOL)
        # The event loop binds get_buffer once, when the connection is made, and calls it before every
        # read: the decoder's own method, with no frame of ours around it.
        self.get_buffer = self.decoder.get_buffer  # type: ignore[method-assign]
        self.tasks: set[asyncio.Task[None]] = set()
        self._corking = False  # inside buffer_updated: replies wait in _corked and leave together at its end
        self._corked: list[Part] = []
        self._reading_paused = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        # Writes from two threads (see send_now): the loop's and the device worker's go one at a time
        # under _send_lock, through a descriptor of our own (a dup, closed in connection_lost, so it can
        # never name another connection's socket), and a reply the worker could not send whole leaves
        # its rest in _deferred, which the loop writes before anything else.
        self._send_lock = threading.Lock()
        self._fd = -1  # guarded by _send_lock
        self._deferred: list[Part] = []  # guarded by _send_lock
        self._loop: asyncio.AbstractEventLoop | None = None
        # Requests whose reply the worker sent before the loop finished them (session state, stats),
        # request id -> the send's sequence number. A frame read meanwhile waits in _held with the
        # newest sequence number sent before it was read, and starts once every reply up to that one
        # is finished: a request sent after such a reply arrived sees all of its effects, as it would
        # had the loop sent the reply, and replies sent later never hold it back.
        self._early: dict[int, int] = {}  # guarded by _send_lock; the loop reads its truth unlocked
        self._early_seq = 0  # guarded by _send_lock
        self._cancelled: set[int] = set()  # guarded by _send_lock: requests the worker must not answer
        self._held: collections.deque[tuple[int, Any]] = collections.deque()  # loop only: (sequence, frame)
        self._held_paused = False

    # -- asyncio.BufferedProtocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if self.kind == "unix" and sock is not None:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            self.pid, self.uid, _gid = struct.unpack("3i", raw)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_NBYTES)
        if sock is not None:  # a real socket: the worker may write replies to it (send_now)
            self._loop = asyncio.get_running_loop()
            self._fd = os.dup(sock.fileno())
        self.kernel.connections.add(self)
        log.debug("connection %d (%s) from uid=%s pid=%s", self.id, self.kind, self.uid, self.pid)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        decoder = self.decoder
        try:
            if self._early or self._held:  # a reply the worker sent is not finished here yet: later requests wait
                decoder.buffer_updated(nbytes)
                self._hold()
                return
            lone = decoder.take_lone(nbytes)
            if lone is not None:  # the usual read, one request without tensors, in fewer steps: it starts here
                rid, name, args = lone
                if name is None:
                    raise EPROTO("a request header needs a 'call' field")
                self._begin(rid, name, args, LONE_FRAME)
                return
            frame = decoder.next_frame()
            if frame is None:
                return
            following = decoder.next_frame()
            if following is None:  # the usual read, one request: its reply leaves at once, not after the bookkeeping
                self._start(frame)
                return
            self._corking = True
            self._start(frame)
            while following is not None:
                self._start(following)
                following = decoder.next_frame()
        except KernelError as err:  # ProtocolError from the decoder, EPROTO from _start
            self.protocol_error(err)
        finally:
            if self._corking:
                self._corking = False
                if self._corked:
                    self._flush()

    def _hold(self) -> None:
        seq = self._early_seq
        while (frame := self.decoder.next_frame()) is not None:
            self._held.append((seq, frame))
        if len(self._held) >= self.kernel.limits.max_inflight and not self._held_paused and self.transport:
            self._held_paused = True
            self.transport.pause_reading()
        self._release_held()  # what it waits for may be finished already

    def _release_held(self) -> None:
        """Start, in arrival order, the held requests whose early replies are all finished."""
        held = self._held
        with self._send_lock:
            oldest = min(self._early.values(), default=None)
        outer = self._corking  # inside buffer_updated (or another release): that one flushes
        self._corking = True
        try:
            while held and not self.closed and (oldest is None or held[0][0] < oldest):
                self._start(held.popleft()[1])
        except KernelError as err:
            self.protocol_error(err)
        finally:
            self._corking = outer
            if not outer and self._corked:
                self._flush()
        if self._held_paused and not held and not self.closed and self.transport is not None:
            self._held_paused = False
            if not self._reading_paused:
                self.transport.resume_reading()

    def _settle(self, rid: int) -> bool:
        """The loop is replying to request `rid`. True if the worker had already sent its reply; then
        the requests held behind it may start, once the rest of this one's bookkeeping is done: this
        runs inside reply(), before the request's task lets go of its session lock and records its
        stats, so they start from the loop's next turn and see all of it."""
        with self._send_lock:
            if self._early.pop(rid, None) is None:
                return False
        if self._held and not self.closed:
            asyncio.get_running_loop().call_soon(self._release_held)
        return True

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        with self._send_lock:
            self.closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._deferred = []
            self._early.clear()
            self._cancelled.clear()
        self._held.clear()
        self._can_write.set()
        self.kernel.connections.discard(self)
        for task in list(self.tasks):
            if getattr(task, "djinn_cancel_on_close", True):
                task.cancel()
        self.kernel.connection_closed(self)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- requests ------------------------------------------------------------------

    def _start(self, frame: Any) -> None:
        # The decoder checked the envelope: a frame with 'call' has an unsigned id,
        # a text call and map args. A frame without one is a reply, which no client sends.
        header = frame.header
        name = header.get("call")
        if name is None:
            raise EPROTO("a request header needs a 'call' field")
        self._begin(header["id"], name, header["args"], frame)

    def _begin(self, rid: int, name: str, args: dict[str, Any], frame: Frame) -> None:
        """Start request `rid` of `frame` (its tensors): check it and answer it, or start its task."""
        if args or frame.tensors:
            try:
                args = unpack(args, frame)
            except KernelError as err:
                self.reply_error(rid, err)
                return
        work = dispatch_now(self.kernel, self, rid, name, args)  # checks it now; answers a control syscall
        if work is None:
            return
        task = _new_task(asyncio.get_running_loop(), work)
        if task.done():  # answered without waiting (eager start): nothing to track
            return
        self.tasks.add(task)
        task.add_done_callback(self._done)
        if len(self.tasks) >= self.kernel.limits.max_inflight and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self._reading_paused and len(self.tasks) <= self.kernel.limits.max_inflight // 2 and not self.closed:
            self._reading_paused = False
            assert self.transport is not None
            if not self._held_paused:
                self.transport.resume_reading()

    def protocol_error(self, err: KernelError) -> None:
        log.info("connection %d: protocol error: %s", self.id, err.message)
        self.reply_error(0, err if err.errno == "EPROTO" else EPROTO(err.message, details=err.details))
        self.close()

    # -- replies -------------------------------------------------------------------

    def reply(self, rid: int, result: Any, *, more: bool = False) -> None:
        if self.closed or self.transport is None:
            return
        if type(result) is EncodedReply:  # encoded on the device worker, where it was made
            if result.sent:  # and sent from there (send_now): only the bookkeeping is left
                self._settle(result.rid)
            elif result.rid == rid and not more:
                self._queue(result.parts)
            else:
                self._queue(self._error_parts(rid, EIO(f"internal error: a reply encoded for request {result.rid}")))
            return
        try:
            parts = encode_reply(rid, result, flags=FLAG_MORE if more else 0, limits=self.kernel.limits)
        except KernelError as err:
            parts = self._error_parts(rid, err)
        if self._corking:  # _queue, inline: this is every reply's path
            self._corked += parts
        else:
            self._write(parts)

    def reply_error(self, rid: int, err: KernelError) -> None:
        if self.closed or self.transport is None:
            return
        if self._settle(rid):  # its success went out from the worker; a request gets one reply
            log.error("request %d failed after its reply was sent: %s", rid, err.message)
            return
        self._queue(self._error_parts(rid, err))
        if self.close_after_reply:
            self.close()

    def _error_parts(self, rid: int, err: KernelError) -> list[Part]:
        """An error reply. One that cannot be encoded (a message past the header limit, say, when
        it echoes a huge name) goes without its details and with its message cut: never raises."""
        limits = self.kernel.limits
        try:
            return encode_message({"id": rid, "ok": False, "error": err.to_wire()}, limits=limits)
        except KernelError:
            bare = {"errno": err.errno, "code": err.code, "message": err.message[:1000] + " [cut]"}
            return encode_message({"id": rid, "ok": False, "error": bare}, limits=limits)

    def _queue(self, parts: list[Part]) -> None:
        if self._corking:
            self._corked += parts
        else:
            self._write(parts)

    def _flush(self) -> None:
        """Write the corked replies, after the rest of a reply the worker began."""
        parts, self._corked = self._corked, []
        if (parts or self._deferred) and self.transport is not None and not self.transport.is_closing():
            self._write(parts)

    def _write(self, parts: list[Part]) -> None:
        assert self.transport is not None
        lock = self._send_lock
        lock.acquire()  # every reply's path: `with` costs twice as much on Python 3.12
        try:
            if self._deferred:  # the rest of a reply the worker began: it goes first
                parts, self._deferred = self._deferred + parts, []
            if len(parts) == 1:
                self.transport.write(parts[0])
            elif all(type(part) is bytes for part in parts):
                self.transport.write(b"".join(parts))  # small replies from one read: one send
            else:
                self.transport.writelines(parts)  # tensors: scatter-gather from their memory
        finally:
            lock.release()

    def send_now(self, rid: int, parts: list[Part]) -> bool:
        """Write the reply to request `rid` from another thread (the device worker, which just made it),
        without waiting for the loop to wake up. Only when nothing is queued on the connection, so frames
        never interleave: bytes the socket does not take at once are left for the loop, ahead of any later
        write. Until the loop settles `rid` (Connection.reply with the EncodedReply), requests read on
        this connection wait. False: nothing was written (closing, something queued, the socket full, too
        many parts, the request cancelled); the caller replies as usual."""
        if len(parts) > _SEND_NOW_MAX_PARTS:
            return False
        with self._send_lock:
            transport = self.transport
            if (self._fd < 0 or self.closed or self._deferred or transport is None or transport.is_closing()
                    or transport.get_write_buffer_size()):
                return False
            if rid in self._cancelled:  # the loop gave up on it and answered it itself
                self._cancelled.discard(rid)
                return False
            # Recorded before the first byte leaves: os.writev lets go of the GIL, and the client may
            # answer this reply before the worker has it back.
            self._early_seq += 1
            self._early[rid] = self._early_seq
            try:
                sent = os.writev(self._fd, parts)
            except OSError:  # full (EAGAIN) or broken: the loop's write finds out which, and acts
                sent = 0
            if sent < sum(memoryview(part).nbytes for part in parts):
                self._deferred = _after(parts, sent)
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._flush)
            return True

    def cancelled(self, rid: int) -> None:
        """The loop stopped waiting for request `rid` (its task was cancelled) and answers it with an error
        (see dispatch), unless the worker already sent its reply (reply_error then drops the error): from here on
        the worker does not send one."""
        with self._send_lock:
            if rid not in self._early and not self.closed:
                self._cancelled.add(rid)

    async def drain(self) -> None:
        await self._can_write.wait()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            with self._send_lock:  # no reply from the worker starts after this
                self.closed = True
            self._flush()  # the corked replies, after the rest of one the worker began
            self.transport.close()
        self.closed = True


def _after(parts: list[Part], nbytes: int) -> list[Part]:
    """What is left of `parts` once their first `nbytes` bytes are written."""
    rest: list[Part] = []
    for part in parts:
        view = memoryview(part).cast("B") if not isinstance(part, bytes) else part
        size = len(view)
        if nbytes >= size:
            nbytes -= size
            continue
        rest.append(view[nbytes:] if nbytes else part)
        nbytes = 0
    return rest


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def bind_unix_socket(path: str) -> socket.socket:
    """A listening Unix socket at `path`, mode 0660. Raises OSError(EADDRINUSE) if a live daemon holds it,
    PermissionError if another user controls its directory (config.check_socket_dir)."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o750, exist_ok=True)
    check_socket_dir(parent)
    if os.path.lexists(path):
        if not stat_mod.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno_mod.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
        if _socket_is_live(path):
            raise OSError(errno_mod.EADDRINUSE, f"another djinnd is serving {path}")
        log.warning("replacing stale socket %s (nothing answered a test connect)", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def parse_tcp(spec: str) -> tuple[str, int]:
    """'HOST:PORT' or ':PORT' (loopback) -> (host, port). Raises ValueError."""
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"tcp must be HOST:PORT, got {spec!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)

