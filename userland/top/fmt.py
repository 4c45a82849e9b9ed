"""Formatting for djinn-top: numbers to short strings, and the session table's columns.

Rules: pure functions, no I/O, no textual. Sizes are binary (KiB, MiB), rates
decimal per second; a value that is not known prints as "-". Both the
terminal UI and the plain-text `--once` output lay rows out with `COLUMNS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import SessionRow

__all__ = [
    "COLUMNS",
    "Column",
    "bar",
    "fmt_bytes",
    "fmt_count",
    "fmt_duration",
    "fmt_rate_bytes",
    "fmt_us",
    "format_line",
    "session_cells",
    "column_widths",
]

_UNITS = ("B", "K", "M", "G", "T", "P")


def fmt_bytes(nbytes: float | None) -> str:
    """`1536` -> `1.5K`, `0` -> `0B`; binary units, at most 5 characters for sizes below 1000P."""
    if nbytes is None:
        return "-"
    value = float(nbytes)
    for unit in _UNITS:
        if abs(value) < 1000 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{int(value)}B"
            return f"{value:.1f}{unit}" if abs(value) < 100 else f"{value:.0f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fmt_rate_bytes(bps: float | None) -> str:
    """Bytes per second in binary units, `12.0M/s`; `-` when unknown."""
    return "-" if bps is None else f"{fmt_bytes(bps)}/s"


def fmt_count(value: float | None) -> str:
    """`812` -> `812`, `12345` -> `12.3k`, fractional rates keep one decimal below 10."""
    if value is None:
        return "-"
    if value < 10 and value != int(value):
        return f"{value:.1f}"
    for limit, div, suffix in ((1e3, 1, ""), (1e6, 1e3, "k"), (1e9, 1e6, "M")):
        if value < limit:
            return f"{value / div:.0f}{suffix}" if div == 1 or value / div >= 100 else f"{value / div:.1f}{suffix}"
    return f"{value / 1e9:.1f}G"


def fmt_duration(seconds: float | None) -> str:
    """`0.43` -> `0.4s`, `75` -> `1m15s`, `7300` -> `2h01m`, `200000` -> `2d07h`."""
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f}s"
    whole = int(s)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def fmt_us(us: float | None) -> str:
    """Microseconds: `812us`, `1.5ms`, `2.0s`."""
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.0f}us"
    if us < 1e6:
        return f"{us / 1e3:.1f}ms"
    return f"{us / 1e6:.1f}s"


def bar(fraction: float, width: int, fill: str = "|", empty: str = " ") -> str:
    """A bar of `width` cells, `fraction` (clamped to [0, 1]) of them filled; any non-zero shows one cell."""
    width = max(0, width)
    f = min(1.0, max(0.0, fraction))
    n = round(f * width)
    if f > 0 and n == 0 and width:
        n = 1
    return fill * n + empty * (width - n)


@dataclass(frozen=True, slots=True)
class Column:
    """A session table column: its heading, minimum width, alignment, and the sort key it selects."""

    title: str
    min_width: int
    right: bool
    sort: str


COLUMNS: tuple[Column, ...] = (
    Column("ID", 6, False, "id"),
    Column("UID", 5, True, "owner"),
    Column("PID", 7, True, "owner"),
    Column("MODEL", 8, False, "model"),
    Column("STATE", 9, False, "state"),
    Column("RES", 6, False, "residency"),
    Column("ARENA", 13, True, "arena"),
    Column("ARENA%", 6, True, "arena"),
    Column("TOKENS", 11, True, "tokens"),
    Column("LAST", 6, True, "last"),
)


def session_cells(row: SessionRow) -> tuple[str, ...]:
    """One row's cells in `COLUMNS` order."""
    pct = "-" if row.arena_nbytes <= 0 else f"{100.0 * row.arena_used_nbytes / row.arena_nbytes:.0f}%"
    tokens = str(row.tokens) if row.max_tokens is None else f"{row.tokens}/{row.max_tokens}"
    return (
        row.id,
        "-" if row.uid is None else str(row.uid),
        "-" if row.pid is None else str(row.pid),
        row.model or "-",
        row.state_label,
        row.residency,
        f"{fmt_bytes(row.arena_used_nbytes)}/{fmt_bytes(row.arena_nbytes)}",
        pct,
        tokens,
        fmt_duration(row.idle_s),
    )


def column_widths(rows: tuple[SessionRow, ...] | list[tuple[str, ...]]) -> tuple[int, ...]:
    """Widths that fit the headings and every cell of `rows` (rows or already-made cells)."""
    widths = [max(c.min_width, len(c.title)) for c in COLUMNS]
    for row in rows:
        cells = session_cells(row) if isinstance(row, SessionRow) else row
        for i, cell in enumerate(cells):
            if len(cell) > widths[i]:
                widths[i] = len(cell)
    return tuple(widths)


def format_line(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    """Cells padded to `widths` and joined by one space; cells longer than their width are cut."""
    parts = []
    for cell, width, col in zip(cells, widths, COLUMNS):
        cell = cell if len(cell) <= width else cell[: max(0, width - 1)] + "…"
        parts.append(cell.rjust(width) if col.right else cell.ljust(width))
    return " ".join(parts)
