"""The records the memory policies take and give (see kernel/policy.py), and their validation.

Rules: plain frozen records, no behaviour beyond checking arguments; no torch, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .abi import PHASES
from .errors import EINVAL

__all__ = [
    "CAUSES",
    "Cause",
    "Direction",
    "SessionView",
    "PageOut",
    "PageIn",
    "Action",
    "Eviction",
    "PolicyStats",
    "validate_phase",
    "validate_expected_ms",
]

Cause = Literal["signal", "idle", "pressure", "syscall", "prefetch"]
Direction = Literal["out", "in"]

CAUSES: tuple[Cause, ...] = ("signal", "idle", "pressure", "syscall", "prefetch")


def validate_phase(phase: object) -> str:
    """Return `phase` if it is one of abi.PHASES. Raises EINVAL otherwise."""
    if not isinstance(phase, str) or phase not in PHASES:
        raise EINVAL(
            f"unknown phase {phase!r}; signal one of {', '.join(PHASES)}",
            details={"phase": str(phase), "phases": list(PHASES)},
        )
    return phase


def validate_expected_ms(expected_ms: object) -> float | None:
    """Return expected_ms as a float, or None for None. Raises EINVAL unless a finite number >= 0."""
    if expected_ms is None:
        return None
    if isinstance(expected_ms, bool) or not isinstance(expected_ms, (int, float)):
        raise EINVAL(f"expected_ms must be a number of milliseconds or null, not {type(expected_ms).__name__}")
    if not math.isfinite(expected_ms) or expected_ms < 0:
        raise EINVAL(f"expected_ms must be finite and >= 0, got {expected_ms!r}")
    return float(expected_ms)


@dataclass(frozen=True, slots=True)
class SessionView:
    """What the kernel knows of one session at `now`; the core never keeps one past a call.

    nbytes: the device bytes paging it out frees. resident: the arena is on the device.
    busy: a request runs on it, or it must not move now.
    phase, phase_since_s, expected_ms: the last signal (expected_ms None if it gave none).
    phase_since_s and last_used_s are on the clock `now` is on.
    """

    sid: str
    nbytes: int
    resident: bool
    busy: bool
    phase: str
    phase_since_s: float
    expected_ms: float | None
    last_used_s: float


@dataclass(frozen=True, slots=True)
class PageOut:
    """Move this session's arena to the host pool. Report the result with on_transfer_done."""

    sid: str
    cause: Cause


@dataclass(frozen=True, slots=True)
class PageIn:
    """Move this session's arena back to the device. Report the result with on_transfer_done."""

    sid: str
    cause: Cause


Action = PageOut | PageIn


@dataclass(frozen=True, slots=True)
class Eviction:
    """make_room's answer.

    ok: carrying out every victim frees freed_nbytes >= need_nbytes.
    not ok: victims is empty (nothing was decided) and freed_nbytes is the most this policy could
    free now; the kernel answers ENOMEM, retryable, with both figures.
    """

    victims: tuple[PageOut, ...]
    freed_nbytes: int
    need_nbytes: int
    ok: bool


@dataclass(frozen=True, slots=True)
class PolicyStats:
    """A snapshot of the counters. Transfers are counted when decided. prefetch_scheduled always
    equals pending + late + on_time + cancelled."""

    policy: str
    page_outs: int
    page_ins: int
    by_cause: dict[str, int]
    prefetch_scheduled: int
    prefetch_pending: int
    prefetch_late: int
    prefetch_on_time: int
    prefetch_cancelled: int
    out_bytes_per_s: float
    in_bytes_per_s: float

    def as_stat(self) -> dict[str, object]:
        """The `by_cause` and `prefetch` maps of the stat snapshot (docs/INTERNALS.md)."""
        return {
            "by_cause": dict(self.by_cause),
            "prefetch": {
                "pending": self.prefetch_pending,
                "late": self.prefetch_late,
                "on_time": self.prefetch_on_time,
                "cancelled": self.prefetch_cancelled,
            },
        }
