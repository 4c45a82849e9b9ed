"""Sorting and filtering djinn-top's session rows.

Rules: pure functions over `model.SessionRow`, no I/O. Every order is total:
ties fall back to the session id (ascending, even when the order is reversed),
so rows never swap places between refreshes on equal keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .model import SessionRow

__all__ = ["SORT_KEYS", "Filter", "parse_filter", "select"]


def _state_order(row: SessionRow) -> tuple[int, int]:
    order = ("RUNNING", "PAUSED", "READY", "IO_WAIT", "SWAPPED", "CLOSED")
    rank = order.index(row.state) if row.state in order else len(order)
    return rank, row.paused_at if row.paused_at is not None else -1


# Sort key name -> (key function, descending by default). Ties fall back to the session id.
SORT_KEYS: dict[str, tuple[Callable[[SessionRow], Any], bool]] = {
    "id": (lambda r: r.id, False),
    "owner": (lambda r: (r.uid if r.uid is not None else -1, r.pid if r.pid is not None else -1), False),
    "model": (lambda r: r.model, False),
    "state": (_state_order, False),
    "residency": (lambda r: r.residency, False),
    "arena": (lambda r: (r.arena_used_nbytes, r.arena_nbytes), True),
    "tokens": (lambda r: r.tokens, True),
    "last": (lambda r: r.idle_s, False),
}

_FIELDS = ("id", "uid", "pid", "model", "state", "residency", "phase")


@dataclass(frozen=True, slots=True)
class Filter:
    """A parsed filter. Every term must match (AND).

    `field:value` terms match one field: uid and pid exactly, the others by
    case-insensitive substring (state matches the shown label, so `state:paused@6`
    works). Bare words match any of id, model, state, residency, phase, uid, pid.
    """

    text: str
    fielded: tuple[tuple[str, str], ...]
    words: tuple[str, ...]

    def matches(self, row: SessionRow) -> bool:
        for field, value in self.fielded:
            if field in ("uid", "pid"):
                if str(getattr(row, field)) != value:
                    return False
            elif value not in _field_text(row, field):
                return False
        if self.words:
            hay = " ".join(_field_text(row, f) for f in _FIELDS)
            return all(w in hay for w in self.words)
        return True


def _field_text(row: SessionRow, field: str) -> str:
    if field == "state":
        return row.state_label.lower()
    value = getattr(row, field)
    return "" if value is None else str(value).lower()


def parse_filter(text: str) -> Filter:
    """Parse user filter text. Unknown `field:` prefixes are searched as plain words."""
    fielded: list[tuple[str, str]] = []
    words: list[str] = []
    for term in text.lower().split():
        field, sep, value = term.partition(":")
        if sep and field in ("res", "owner"):
            field = {"res": "residency", "owner": "uid"}[field]
        if sep and value and field in _FIELDS:
            fielded.append((field, value))
        else:
            words.append(term)
    return Filter(text=text, fielded=tuple(fielded), words=tuple(words))


def select(
    rows: tuple[SessionRow, ...], sort: str = "id", reverse: bool = False, filter: Filter | None = None
) -> tuple[SessionRow, ...]:
    """Rows kept by `filter`, ordered by sort key `sort` (its natural direction, flipped by `reverse`).

    Raises KeyError for an unknown sort key.
    """
    key, descending = SORT_KEYS[sort]
    kept = [r for r in rows if filter.matches(r)] if filter is not None and filter.text.strip() else list(rows)
    kept.sort(key=lambda r: r.id)
    kept.sort(key=key, reverse=descending != reverse)
    return tuple(kept)
