"""djinn: the client library for the Djinn tensor operating system.

    import djinn
    with djinn.connect() as k:
        s = k.open_session()
        r = s.forward([1, 2, 3])

`djinn.syscall(name, **args)` uses a lazily opened default connection;
`djinn.aio.connect()` is the asyncio twin; errors are `djinn.errors.*`.

Rules: importing `djinn` is cheap (no torch); the client modules load on first
use, so `djinn.kernel`, `djinn.syscalls` and `djinn.drivers` import without them.
"""

from __future__ import annotations

import importlib
from typing import Any

from djinn.kernel.errors import KernelError

__version__ = "0.1.0"
__all__ = ["Checkpoint", "Kernel", "KernelError", "Result", "Session", "aio", "connect", "default_kernel", "errors",
           "syscall", "__version__"]

_LAZY = {
    "Kernel": "client", "connect": "client", "default_kernel": "client", "syscall": "client",
    "Checkpoint": "session", "Result": "session", "Session": "session",
}


def __getattr__(name: str) -> Any:
    if name in ("aio", "errors"):
        return importlib.import_module(f"djinn.{name}")
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'djinn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"djinn.{mod}"), name)
    globals()[name] = value
    return value
