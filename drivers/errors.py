"""Errors a driver raises. The kernel maps each to its errno in one place (kernel/errors.py's caller).

Rules: drivers never import the kernel, so they raise these; each class names the
errno the kernel will answer with. Messages say what was wrong and what to do.
"""

from __future__ import annotations

__all__ = ["DriverError", "OutOfMemory", "BadArgument", "NotFound", "Busy"]


class DriverError(Exception):
    """Base of every driver error. `errno` is the code the kernel answers with."""

    errno = "EIO"


class OutOfMemory(DriverError):
    """A segment or the host pool cannot satisfy an allocation. Retryable once memory is freed."""

    errno = "ENOMEM"

    def __init__(
        self,
        what: str,
        *,
        requested_nbytes: int,
        largest_free_nbytes: int,
        total_free_nbytes: int,
        hint: str = "free or page out other sessions, or raise the segment size in the config",
    ) -> None:
        self.what = what
        self.requested_nbytes = requested_nbytes
        self.largest_free_nbytes = largest_free_nbytes
        self.total_free_nbytes = total_free_nbytes
        self.hint = hint
        super().__init__(
            f"{what}: requested {requested_nbytes} bytes, largest free range {largest_free_nbytes} bytes, "
            f"total free {total_free_nbytes} bytes; hint: {hint}"
        )

    @property
    def details(self) -> dict[str, int | str]:
        return {
            "segment": self.what,
            "requested_nbytes": self.requested_nbytes,
            "largest_free_nbytes": self.largest_free_nbytes,
            "total_free_nbytes": self.total_free_nbytes,
            "hint": self.hint,
        }


class BadArgument(DriverError, ValueError):
    """An argument a driver received is out of range or of the wrong shape or dtype."""

    errno = "EINVAL"


class NotFound(DriverError, LookupError):
    """A model, arena, or checkpoint the driver was asked for does not exist."""

    errno = "ENOENT"


class Busy(DriverError):
    """The object is in a state that forbids the request (e.g. resume without a pause)."""

    errno = "EBUSY"
