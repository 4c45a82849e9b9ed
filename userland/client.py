"""The blocking client: `djinn.connect()` returns a Kernel; syscalls are method calls.

Rules:
- One socket per Kernel. Several threads may share it: sends are serialised,
  and whichever thread is reading hands frames for other request ids to their
  owners, so replies may arrive in any order.
- Replies are received straight into the decoder's buffers (`recv_into`).
- A reply's error is raised as the same KernelError subclass the kernel meant.
"""

from __future__ import annotations

import collections
import itertools
import os
import socket
import threading
from typing import Any, Iterator

from djinn.kernel import abi
from djinn.kernel.codec import Decoder
from djinn.kernel.config import default_socket_path
from djinn.kernel.errors import from_wire
from djinn.kernel.tensors import encode_message, unpack

from .session import Checkpoint, Session

__all__ = ["Kernel", "connect", "syscall", "default_kernel"]

_RECV_CHUNK = 1 << 20
_SMALL_FRAME = 64 << 10  # below this, one joined sendall beats a scatter-gather send


def _open_socket(path: str | None, tcp: str | None) -> socket.socket:
    if tcp:
        host, _, port = tcp.rpartition(":")
        sock = socket.create_connection((host or "127.0.0.1", int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    target = path or default_socket_path(for_client=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(target)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        sock.close()
        raise type(e)(e.errno, f"no djinnd is listening on {target}: start one with `djinnd` "
                               f"(or point DJINN_SOCKET at the daemon's socket)") from None
    return sock


class Kernel:
    """A connection to djinnd. Use as a context manager, or call close()."""

    def __init__(self, path: str | None = None, *, tcp: str | None = None, token: str | None = None,
                 client: str = "djinn-python") -> None:
        self._sock = _open_socket(path, tcp or os.environ.get("DJINN_TCP"))
        self._decoder = Decoder()
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._cv = threading.Condition()
        self._reading = False
        self._inbox: dict[int, collections.deque[Any]] = {}
        self._closed = False
        args: dict[str, Any] = {"protocol": abi.PROTOCOL_VERSION, "client": client}
        token = token or os.environ.get("DJINN_TOKEN")
        if token:
            args["token"] = token
        self.server = self.syscall("hello", **args)

    # -- the wire -------------------------------------------------------------------

    def submit(self, name: str, /, **args: Any) -> int:
        """Send a request without waiting; returns its id for `result(id)`."""
        rid = next(self._ids)
        frames = encode_message({"id": rid, "call": name, "args": args})
        with self._cv:
            self._inbox[rid] = collections.deque()
        with self._send_lock:
            if sum(len(f) for f in frames) <= _SMALL_FRAME:
                self._sock.sendall(b"".join(frames))
            else:
                self._sendmsg(frames)
        return rid

    def _sendmsg(self, frames: list[Any]) -> None:
        views = [memoryview(f).cast("B") for f in frames]
        while views:
            sent = self._sock.sendmsg(views[:512])
            while sent and views:
                n = len(views[0])
                if sent >= n:
                    sent -= n
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def _next_frame_for(self, rid: int) -> Any:
        """Block until a frame for request `rid` arrives; frames for other ids go to their inboxes."""
        while True:
            with self._cv:
                box = self._inbox.get(rid)
                if box is None:
                    raise KeyError(f"request {rid} is not outstanding")
                if box:
                    return box.popleft()
                if self._reading:
                    self._cv.wait()
                    continue
                self._reading = True
            try:
                frame = self._read_frame()
            finally:
                with self._cv:
                    self._reading = False
                    self._cv.notify_all()
            fid = frame.header.get("id")
            with self._cv:
                target = self._inbox.get(fid)
                if target is None and fid == 0 and not frame.header.get("ok", True):
                    raise from_wire(frame.header.get("error"))
                if target is not None:
                    target.append(frame)
                self._cv.notify_all()

    def _read_frame(self) -> Any:
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame
            buf = self._decoder.get_buffer(_RECV_CHUNK)
            n = self._sock.recv_into(buf)
            if n == 0:
                self._closed = True
                raise ConnectionError("djinnd closed the connection")
            self._decoder.buffer_updated(n)

    def _decode(self, frame: Any) -> Any:
        h = frame.header
        if not h.get("ok", False):
            raise from_wire(h.get("error"))
        return unpack(h.get("result"), frame)

    def result(self, rid: int) -> Any:
        """The reply to request `rid` (all frames gathered for a streamed one: the final frame's result)."""
        try:
            while True:
                frame = self._next_frame_for(rid)
                if not frame.more:
                    return self._decode(frame)
                self._decode(frame)
        finally:
            with self._cv:
                self._inbox.pop(rid, None)

    def syscall(self, name: str, /, **args: Any) -> Any:
        """Make one syscall and return its decoded result. Raises djinn.errors.* on failure."""
        return self.result(self.submit(name, **args))

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
            with self._cv:
                self._inbox.pop(rid, None)

    def batch(self, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Pipeline several syscalls: send them all, then gather the replies in order."""
        ids = [self.submit(name, **args) for name, args in calls]
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

