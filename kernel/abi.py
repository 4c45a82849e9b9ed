"""The ABI shared by the kernel and every client: protocol version, errno codes, limits.

Rules: this module imports nothing from torch or the rest of the kernel, so that
`djinn` (userland) can import it cheaply. Changing a value here changes the wire;
bump PROTOCOL_VERSION when you do.
"""

from __future__ import annotations

__all__ = [
    "PROTOCOL_VERSION",
    "MAGIC",
    "ERRNO",
    "Limits",
    "DEFAULT_LIMITS",
    "PHASES",
    "SESSION_STATES",
]

PROTOCOL_VERSION = 1
MAGIC = b"DJNN"

# errno name -> (number, one-line meaning). Numbers follow Linux where one exists.
ERRNO: dict[str, tuple[int, str]] = {
    "EPERM": (1, "the caller does not own the object it touched"),
    "ENOENT": (2, "no such session, model, or checkpoint"),
    "EIO": (5, "an internal error in the kernel or a driver; the request failed, the daemon carries on"),
    "EAGAIN": (11, "try again later"),
    "ENOMEM": (12, "not enough device or host memory for the request"),
    "EBUSY": (16, "the object is in use or in a state that forbids the request"),
    "EEXIST": (17, "the object already exists"),
    "EINVAL": (22, "an argument is missing, of the wrong type, or out of range"),
    "E2BIG": (7, "a frame, tensor, or argument exceeds a limit"),
    "ENOSYS": (38, "no such syscall"),
    "EPROTO": (71, "the peer broke the wire protocol"),
    "ECANCELED": (125, "the request was cancelled (its client went away)"),
    "ESHUTDOWN": (108, "the daemon is shutting down: no new work, and work in flight past the shutdown timeout fails"),
    "EACCES": (13, "authentication failed or is missing"),
}


class Limits:
    """Wire limits, one comment each. The kernel enforces them; clients should too."""

    __slots__ = ("max_header_nbytes", "max_payload_nbytes", "max_tensors", "max_cbor_depth", "max_inflight")

    def __init__(
        self,
        max_header_nbytes: int = 1 << 20,  # CBOR header: arguments are small, tensors travel in the payload
        max_payload_nbytes: int = 4 << 30,  # raw tensor bytes in one frame
        max_tensors: int = 1024,  # rows in one frame's tensor table
        max_cbor_depth: int = 32,  # nesting of CBOR containers in the header
        max_inflight: int = 256,  # requests one connection may have outstanding
    ) -> None:
        self.max_header_nbytes = max_header_nbytes
        self.max_payload_nbytes = max_payload_nbytes
        self.max_tensors = max_tensors
        self.max_cbor_depth = max_cbor_depth
        self.max_inflight = max_inflight


DEFAULT_LIMITS = Limits()

# Phases a session may signal. Room for more: adding one is a policy decision, not a wire change.
PHASES = ("IO_WAIT", "COMPUTE")

SESSION_STATES = ("READY", "RUNNING", "PAUSED", "IO_WAIT", "SWAPPED", "CLOSED")
