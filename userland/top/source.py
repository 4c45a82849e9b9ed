"""Where djinn-top's snapshots come from: a live daemon through the `djinn` client, or a fake.

Rules: a source is used from one thread at a time (the UI funnels every call
through one worker thread). `stat()` connects lazily and raises `Unavailable`
whenever there is no daemon to talk to, having dropped the connection, so the
next call tries afresh: that is the whole reconnect logic. Errors the kernel
answers with (`djinn.KernelError`, e.g. EPERM) pass through unchanged.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

__all__ = ["StatSource", "KernelSource", "Unavailable", "resolve_socket", "no_daemon_message"]

# Kernel errors that mean the daemon is going away rather than that a request was wrong.
_GOING_AWAY = frozenset({"ECANCELED", "ESHUTDOWN", "EPROTO"})


class Unavailable(ConnectionError):
    """No daemon answers at `socket`; `reason` says what happened (refused, missing, dropped)."""

    def __init__(self, socket: str, reason: str) -> None:
        super().__init__(f"{socket}: {reason}")
        self.socket = socket
        self.reason = reason


class StatSource(Protocol):
    """What the UI needs from a daemon."""

    @property
    def target(self) -> str:
        """What this source talks to, for messages (a socket path)."""
        ...

    def stat(self) -> dict[str, Any]:
        """One snapshot. Raises Unavailable when no daemon answers."""
        ...

    def close_session(self, session: str) -> None:
        """Close a session. Raises djinn.KernelError (EPERM, ENOENT) or Unavailable."""
        ...

    def close(self) -> None:
        """Drop the connection, if any. Idempotent."""
        ...


def resolve_socket(path: str | os.PathLike[str] | None = None) -> str:
    """The socket djinn-top should use: `path`, else the one `djinn.connect()` would pick.

    That is $DJINN_SOCKET, else $XDG_RUNTIME_DIR/djinn/djinnd.sock (falling back to
    the system socket /run/djinn/djinnd.sock when only that exists), and the
    system socket for root.
    """
    if path is not None:
        return os.fspath(path)
    from djinn.kernel.config import default_socket_path

    return default_socket_path(for_client=True)


def no_daemon_message(socket: str, reason: str = "") -> str:
    """What to tell a user when nothing answers at `socket`: what was tried and how to start a daemon."""
    why = f" ({reason})" if reason else ""
    default = resolve_socket(None)
    start = "djinnd" if socket == default else f"DJINN_SOCKET={socket} djinnd"
    return (
        f"djinn-top: no djinn daemon is running at {socket}{why}.\n"
        f"Start one with:  {start}\n"
        f"(djinnd listens on $DJINN_SOCKET when set; djinn-top --socket PATH looks elsewhere.)"
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such socket"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, EOFError)):
        return "connection dropped"
    if isinstance(exc, PermissionError):
        return "permission denied"
    text = str(exc).strip()
    return text or type(exc).__name__


class KernelSource:
    """A StatSource over `djinn.connect(path)`. Not thread-safe: call it from one thread."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._path = resolve_socket(path)
        self._kernel: Any = None

    @property
    def target(self) -> str:
        return self._path

    @property
    def connected(self) -> bool:
        return self._kernel is not None

    def _connect(self) -> Any:
        if self._kernel is None:
            import djinn

            try:
                self._kernel = djinn.connect(path=self._path)
            except (OSError, EOFError) as e:
                raise Unavailable(self._path, _reason(e)) from e
        return self._kernel

    def _call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        from djinn import KernelError

        kernel = self._connect()
        try:
            return getattr(kernel, fn)(*args, **kwargs)
        except (OSError, EOFError) as e:
            self.close()
            raise Unavailable(self._path, _reason(e)) from e
        except KernelError as e:
            if e.errno in _GOING_AWAY:
                self.close()
                raise Unavailable(self._path, str(e)) from e
            raise

    def stat(self) -> dict[str, Any]:
        return self._call("stat")

    def close_session(self, session: str) -> None:
        self._call("syscall", "close_session", session=session)

    def close(self) -> None:
        kernel, self._kernel = self._kernel, None
        if kernel is not None:
            try:
                kernel.close()
            except Exception:  # a dying connection may fail to close; it is dropped either way
                pass
