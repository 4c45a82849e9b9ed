"""Handler: stat. A plain function answered inline on the event loop from plain counters; never waits on the device."""

from __future__ import annotations

from typing import Any


def stat(k: Any, call: Any) -> dict[str, Any]:
    return k.stat()
