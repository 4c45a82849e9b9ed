"""Handler: stat. A plain function answered inline on the event loop from plain counters; never waits on the device."""

from __future__ import annotations

from typing import Any

from djinn.kernel.tensors import Plain


def stat(k: Any, call: Any) -> Plain:
    return Plain(k.stat())  # the kernel's own counters: encoded without the walk that looks for tensors
