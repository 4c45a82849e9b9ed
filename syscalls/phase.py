"""Handler: signal_phase. Answers at once; any paging it causes runs in the background."""

from __future__ import annotations

from typing import Any


async def signal_phase(k: Any, call: Any, *, session: Any, phase: str, expected_ms: float | None) -> dict[str, Any]:
    return k.memory.signal(session, phase, expected_ms)
