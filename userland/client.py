"""The blocking client: `djinn.connect()` returns a Kernel; syscalls are method calls.

Rules:
- One socket per Kernel. Several threads may share it: sends are serialised,
  and whichever thread is reading hands frames for other request ids to their
  owners, so replies may arrive in any order.
- Replies are received straight into the decoder's buffers (`recv_into`); a
  large payload lands in a buffer from the payload pool, which the returned
  tensors view. Large requests leave by scatter-gather from the tensors' memory.
  A reply that is the whole of one read and carries no tensors is taken as its
  envelope alone (`Decoder.take_lone`), with no Frame made.
- A reply's error is raised as the same KernelError subclass the kernel meant.
- `post()` sends a request whose reply nobody waits for: it has no inbox, and
  the reader drops the frames of an id without one (its result or its error
  alike), so they never pile up.
- Waiting for a reply blocks in the kernel by default. With `busy_poll_us` the
  reading thread first polls the socket without blocking for up to that long:
  it spends a CPU core while it waits, and in return skips the wake-up from a
  blocking read and finds its caches warm when the reply comes (a latency mode
  for a few latency-bound clients, not for hundreds of agents on one host).
"""

from __future__ import annotations

import collections
import itertools
import os
import socket
import threading
import time
from typing import Any, Iterator, NoReturn

from djinn.kernel import abi
from djinn.kernel.codec import FLAG_MORE, LONE_FRAME, SEND_BUFFER_NBYTES, Decoder, envelope_frame, send_frame
from djinn.kernel.config import client_socket_path
from djinn.kernel.errors import from_wire
from djinn.kernel.tensors import PAYLOAD_POOL, encode_request, unpack

from .session import Checkpoint, Session

__all__ = ["Kernel", "connect", "syscall", "default_kernel"]

_SMALL_FRAME = 64 << 10  # below this, one joined sendall beats a scatter-gather send
_MSG_WAITALL = socket.MSG_WAITALL
_MSG_DONTWAIT = socket.MSG_DONTWAIT


def _busy_poll_s(busy_poll_us: float | None) -> float:
    """Seconds to poll before a blocking read: the argument, else $DJINN_BUSY_POLL_US, else 0."""
    if busy_poll_us is None:
        raw = os.environ.get("DJINN_BUSY_POLL_US", "").strip()
        try:
            busy_poll_us = float(raw) if raw else 0.0
        except ValueError:
            raise ValueError(f"DJINN_BUSY_POLL_US must be a number of microseconds, got {raw!r}") from None
    if not busy_poll_us >= 0:  # also catches NaN
        raise ValueError(f"busy_poll_us must be >= 0, got {busy_poll_us!r}")
    return busy_poll_us / 1e6


def _open_socket(path: str | None, tcp: str | None) -> socket.socket:
    if tcp:
        host, _, port = tcp.rpartition(":")
        sock = socket.create_connection((host or "127.0.0.1", int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    target = client_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_NBYTES)
    try:
        sock.connect(target)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise type(e)(e.errno, f"no djinnd is listening on {target}: start one with `djinnd` "
                               f"(or point DJINN_SOCKET at the daemon's socket)") from None
    return sock


class Kernel:
    """A connection to djinnd. Use as a context manager, or call close().

    `busy_poll_us`: poll for a reply this long before blocking (default $DJINN_BUSY_POLL_US, else 0;
    see the module notes).
    """

    def __init__(self, path: str | None = None, *, tcp: str | None = None, token: str | None = None,
                 client: str = "djinn-python", busy_poll_us: float | None = None) -> None:
        self._busy_poll_s = _busy_poll_s(busy_poll_us)
        self._sock = _open_socket(path, tcp or os.environ.get("DJINN_TCP"))
        self._decoder = Decoder(alloc_payload=PAYLOAD_POOL)  # used only by the thread that holds _reading
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._reading = False  # guarded by _lock: a thread is reading the socket
        self._waiting = 0  # guarded by _lock: threads asleep in _cv.wait()
        self._inbox: dict[int, collections.deque[Any]] = {}  # guarded by _lock: request id -> frames not yet taken
        self._closed = False
        args: dict[str, Any] = {"protocol": abi.PROTOCOL_VERSION, "client": client}
        token = token or os.environ.get("DJINN_TOKEN")
        if token:
            args["token"] = token
        self.server = self.syscall("hello", **args)

    # -- the wire -------------------------------------------------------------------

    def submit(self, name: str, /, **args: Any) -> int:
        """Send a request without waiting; returns its id for `result(id)`."""
        if self._closed:
            raise _closed_error()
        rid = next(self._ids)
        parts = encode_request(rid, name, args)
        with self._lock:
            self._inbox[rid] = collections.deque()
        with self._send_lock:
            self._send(parts)
        return rid

    def post(self, name: str, /, **args: Any) -> None:
        """Send a request and do not wait for its reply (fire and forget). Its reply, a result or an error,
        is dropped when whichever thread reads the socket next comes to it; nothing is raised for it."""
        if self._closed:
            raise _closed_error()
        parts = encode_request(next(self._ids), name, args)
        with self._send_lock:
            self._send(parts)

    def _send(self, parts: list[Any]) -> None:
        """Write one or more frames' parts. Holds _send_lock."""
        try:
            if len(parts) == 1:
                self._sock.sendall(parts[0])
            elif sum(len(p) for p in parts) <= _SMALL_FRAME:
                self._sock.sendall(b"".join(parts))
            else:
                send_frame(self._sock, parts)  # scatter-gather straight from the tensors' memory
        except OSError as e:
            self._lost(e)

    def _lost(self, cause: OSError | None = None) -> NoReturn:
        """Raise what a failed read or write means. The daemon closed the connection (it stopped, or
        restarted): close this end too, so that the default connection (`djinn.syscall`) opens a new one
        at its next call, and say so. This end was closed already (by another thread that saw the same):
        say that. Any other OSError goes on as it is."""
        if self._closed:
            raise _closed_error() from cause
        if cause is not None and not isinstance(cause, ConnectionError):
            raise cause
        self.close()
        why = f" ({cause.strerror or cause})" if cause is not None else ""
        raise ConnectionError(f"djinnd closed the connection{why}; connect again once it is back") from cause

    def _next_frame_for(self, rid: int) -> Any:
        """Block until a frame for request `rid` arrives; frames for other ids go to their inboxes.

        One thread at a time reads the socket; the others sleep until their frame
        is in their inbox or the reader's chair is free.
        """
        cv = self._cv
        with self._lock:
            while True:
                box = self._inbox.get(rid)
                if box is None:
                    raise KeyError(f"request {rid} is not outstanding")
                if box:
                    return box.popleft()
                if not self._reading:
                    self._reading = True
                    break
                self._waiting += 1
                try:
                    cv.wait()
                finally:
                    self._waiting -= 1
        try:
            return self._read_until(rid)
        finally:
            self._release_reader()

    def _read_until(self, rid: int) -> Any:
        """The next frame for `rid`, routing frames for other requests to their inboxes. The caller holds
        the reader's chair (`_reading`)."""
        while True:
            frame = self._read_frame()
            if frame.header["id"] == rid:
                return frame
            self._route(frame)

    def _release_reader(self) -> None:
        lock = self._lock
        lock.acquire()  # not `with`: see syscall
        try:
            self._reading = False
            if self._waiting:
                self._cv.notify_all()
        finally:
            lock.release()

    def _route(self, frame: Any) -> None:
        """Hand a frame read for another request to its inbox; a frame of an id with no inbox (a post()ed
        request's, or one whose reader gave up) is dropped. Raises the error of an id-0 error frame."""
        fid = frame.header["id"]
        with self._lock:
            target = self._inbox.get(fid)
            if target is not None:
                target.append(frame)
                if self._waiting:
                    self._cv.notify_all()
                return
        if fid == 0 and not frame.header.get("ok", True):
            raise from_wire(frame.header.get("error"))

    def _read_result(self, rid: int) -> Any:
        """The decoded result of request `rid` (of its final frame), read by the thread in the reader's
        chair, which routes frames for other requests to their inboxes. The usual reply, one frame
        that is the whole of one read, is taken in fewer steps (`Decoder.take_lone`)."""
        decoder = self._decoder
        frame = decoder.next_frame()
        if frame is None:
            lone = decoder.take_lone(self._recv(decoder))
            if lone is not None:
                if lone[0] == rid and lone[1] is None:
                    return unpack(lone[2], LONE_FRAME)
                frame = envelope_frame(lone)
        if frame is None or frame.header["id"] != rid:
            if frame is not None:
                self._route(frame)
            frame = self._read_until(rid)
        while frame.flags & FLAG_MORE:
            self._decode(frame)
            frame = self._read_until(rid)
        return self._decode(frame)

    def _read_frame(self) -> Any:
        decoder = self._decoder
        while (frame := decoder.next_frame()) is None:
            decoder.buffer_updated(self._recv(decoder))
        return frame

    def _recv(self, decoder: Decoder) -> int:
        """Read the next bytes of the stream into `decoder.get_buffer()`; returns how many (> 0)."""
        buffer = decoder.get_buffer()
        try:
            n = self._poll_into(buffer) if self._busy_poll_s else -1
            if n < 0:
                # A payload is received straight into its buffer, and in one call: the
                # view ends where the frame's payload does, so waiting for all of it is safe.
                n = self._sock.recv_into(buffer, 0, _MSG_WAITALL if decoder.in_place else 0)
        except OSError as e:
            self._lost(e)
        if n == 0:
            self._lost()
        return n

    def _poll_into(self, buffer: memoryview) -> int:
        """Read what has arrived into `buffer` without blocking, polling for up to busy_poll_us;
        -1 if nothing came in that time."""
        recv_into = self._sock.recv_into
        deadline = time.perf_counter() + self._busy_poll_s
        while True:
            try:
                return recv_into(buffer, 0, _MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() >= deadline:
                    return -1

    def _decode(self, frame: Any) -> Any:
        h = frame.header
        if h.get("ok") is not True:
            raise from_wire(h.get("error"))
        return unpack(h["result"], frame)

    def result(self, rid: int) -> Any:
        """The reply to request `rid` (all frames gathered for a streamed one: the final frame's result)."""
        try:
            while True:
                frame = self._next_frame_for(rid)
                if not frame.flags & FLAG_MORE:
                    return self._decode(frame)
                self._decode(frame)
        finally:
            with self._lock:
                self._inbox.pop(rid, None)

    def syscall(self, name: str, /, **args: Any) -> Any:
        """Make one syscall and return its decoded result. Raises djinn.errors.* on failure, ConnectionError
        when the connection is closed or the daemon goes away."""
        if self._closed:
            raise _closed_error()
        rid = next(self._ids)
        parts = encode_request(rid, name, args)
        # The locks of this path are taken with acquire/release: `with` costs twice as much on
        # Python 3.12, and a null syscall's own time is a few microseconds.
        lock = self._lock
        lock.acquire()
        try:
            reader = not self._reading
            if reader:
                self._reading = True
            else:  # another thread reads: wait for an inbox like submit() does
                self._inbox[rid] = collections.deque()
        finally:
            lock.release()
        if not reader:
            with self._send_lock:
                self._send(parts)
            return self.result(rid)
        # The usual case: no thread is reading, so this one reads its own reply
        # directly, with no inbox, routing any frame for another request to its inbox.
        try:
            send_lock = self._send_lock
            send_lock.acquire()
            try:
                if len(parts) == 1:  # _send's first case, inline: every small request
                    try:
                        self._sock.sendall(parts[0])
                    except OSError as e:
                        self._lost(e)
                else:
                    self._send(parts)
            finally:
                send_lock.release()
            return self._read_result(rid)
        finally:
            self._release_reader()

    def stream(self, name: str, /, **args: Any) -> Iterator[Any]:
        """A streamed syscall: yields each frame's result until the final one (not yielded)."""
        rid = self.submit(name, **args)
        try:
            while True:
                frame = self._next_frame_for(rid)
                result = self._decode(frame)
                if not frame.more:
                    return
                yield result
        finally:
            with self._lock:
                self._inbox.pop(rid, None)

    def batch(self, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Pipeline several syscalls: send them all (in as few writes as possible), then gather the replies in order."""
        ids = [next(self._ids) for _ in calls]
        parts: list[Any] = []
        for rid, (name, args) in zip(ids, calls):
            parts += encode_request(rid, name, args)
        with self._lock:
            for rid in ids:
                self._inbox[rid] = collections.deque()
        with self._send_lock:
            self._send(parts)
        return [self.result(rid) for rid in ids]

    # -- conveniences ---------------------------------------------------------------

    def stat(self) -> dict[str, Any]:
        return self.syscall("stat")

    def open_session(self, model: str | None = None, **opts: Any) -> Session:
        reply = self.syscall("open_session", model=model, **opts)
        return Session(self, reply["session"], reply)

    def session(self, sid: str) -> Session:
        """A handle on an existing session of yours (e.g. after a reconnect)."""
        return Session(self, sid, {})

    def fork(self, checkpoint: Checkpoint | str) -> Session:
        ck = checkpoint.id if isinstance(checkpoint, Checkpoint) else checkpoint
        reply = self.syscall("fork", checkpoint=ck)
        return Session(self, reply["session"], reply)

    def load_model(self, spec: str, *, name: str | None = None, dtype: str | None = None) -> dict[str, Any]:
        return self.syscall("load_model", spec=spec, name=name, dtype=dtype)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._sock.close()
            except OSError:
                pass

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _closed_error() -> ConnectionError:
    return ConnectionError("this connection to djinnd is closed; open a new one with djinn.connect()")


def connect(path: str | None = None, **kw: Any) -> Kernel:
    """Open a connection to djinnd at `path` (default: $DJINN_SOCKET, then the documented default)."""
    return Kernel(path, **kw)


_default: Kernel | None = None
_default_lock = threading.Lock()


def default_kernel() -> Kernel:
    """The process-wide connection `djinn.syscall` uses; opened on first use, thread-safe."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = Kernel()
        return _default


def syscall(name: str, /, **args: Any) -> Any:
    """`djinn.syscall("stat")`: a syscall on the lazily opened default connection."""
    return default_kernel().syscall(name, **args)

