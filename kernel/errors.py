"""Errno-style errors: one KernelError subclass per code, shared by kernel and client.

Rules: a handler raises one of these to answer a request with an error; anything
else escaping a handler is a bug and is answered as EIO (and logged loudly). The
client decodes a reply's error into the same class by `errno` name.
"""

from __future__ import annotations

from typing import Any

from .abi import ERRNO

__all__ = ["KernelError", "error_class", "from_wire"] + list(ERRNO)


class KernelError(Exception):
    """A syscall failed. `.errno` is the code's name ("ENOMEM"), `.message` says what and what to do.

    `.retryable` is True when the same request may succeed later unchanged (memory
    freed, a page-out finished). `.details` carries structured facts (sizes, names).
    """

    errno: str = "EIO"

    def __init__(self, message: str, *, retryable: bool = False, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.details = dict(details or {})

    @property
    def code(self) -> int:
        return ERRNO[self.errno][0]

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"errno": self.errno, "code": self.code, "message": self.message}
        if self.retryable:
            out["retryable"] = True
        if self.details:
            out["details"] = self.details
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"

    def __str__(self) -> str:
        return f"[{self.errno}] {self.message}"


_REGISTRY: dict[str, type[KernelError]] = {}


def _make(name: str, doc: str) -> type[KernelError]:
    cls = type(name, (KernelError,), {"errno": name, "__doc__": f"{name}: {doc}."})
    _REGISTRY[name] = cls
    return cls


EPERM = _make("EPERM", ERRNO["EPERM"][1])
ENOENT = _make("ENOENT", ERRNO["ENOENT"][1])
EIO = _make("EIO", ERRNO["EIO"][1])
EAGAIN = _make("EAGAIN", ERRNO["EAGAIN"][1])
ENOMEM = _make("ENOMEM", ERRNO["ENOMEM"][1])
EBUSY = _make("EBUSY", ERRNO["EBUSY"][1])
EEXIST = _make("EEXIST", ERRNO["EEXIST"][1])
EINVAL = _make("EINVAL", ERRNO["EINVAL"][1])
E2BIG = _make("E2BIG", ERRNO["E2BIG"][1])
ENOSYS = _make("ENOSYS", ERRNO["ENOSYS"][1])
EPROTO = _make("EPROTO", ERRNO["EPROTO"][1])
ECANCELED = _make("ECANCELED", ERRNO["ECANCELED"][1])
ESHUTDOWN = _make("ESHUTDOWN", ERRNO["ESHUTDOWN"][1])
EACCES = _make("EACCES", ERRNO["EACCES"][1])


def error_class(errno: str) -> type[KernelError]:
    """The class for an errno name; unknown names map to the base KernelError with that errno."""
    cls = _REGISTRY.get(errno)
    if cls is not None:
        return cls
    return type(errno, (KernelError,), {"errno": errno})


def from_wire(err: Any) -> KernelError:
    """Rebuild the exception a reply's `error` map describes. Never raises on odd input."""
    if not isinstance(err, dict):
        return EPROTO(f"malformed error in reply: {err!r}")
    name = err.get("errno")
    if not isinstance(name, str):
        name = "EIO"
    cls = error_class(name)
    return cls(
        str(err.get("message", "")),
        retryable=bool(err.get("retryable", False)),
        details=err.get("details") if isinstance(err.get("details"), dict) else None,
    )
