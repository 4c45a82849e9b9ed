"""The plain-text rendering of a View: `djinn-top --once`, and the lines the terminal UI reuses.

Rules: pure functions from model records to strings, no I/O, no colour. Each
function returns whole lines without trailing newlines.
"""

from __future__ import annotations

from .fmt import (
    COLUMNS,
    bar,
    column_widths,
    fmt_bytes,
    fmt_count,
    fmt_duration,
    fmt_rate_bytes,
    fmt_us,
    format_line,
    session_cells,
)
from .model import Header, Rates, SegmentBar, SessionRow, SyscallRow, View

__all__ = ["header_lines", "bar_line", "rates_lines", "syscall_lines", "table_lines", "render_text"]


def _model_text(header: Header) -> str:
    if not header.models:
        return "models: none loaded"
    parts = []
    for m in header.models:
        facts = [f for f in (m.dtype, f"{fmt_count(m.params)} params" if m.params else "") if f]
        facts.append(f"{fmt_bytes(m.text_nbytes)} text")
        facts.append(f"{m.sessions} session{'s' if m.sessions != 1 else ''}")
        parts.append(f"{m.name} ({', '.join(facts)})")
    return "models: " + "; ".join(parts)


def header_lines(header: Header) -> list[str]:
    """Two lines: daemon, uptime, device, policy; then the loaded models."""
    version = f"djinnd {header.version}" if header.version else "djinnd"
    pid = f" pid {header.pid}" if header.pid is not None else ""
    first = (
        f"{version}{pid}  up {fmt_duration(header.uptime_s)}  device {header.device}  "
        f"policy {header.policy}  sessions {header.session_count}  checkpoints {header.checkpoint_count}"
    )
    return [first, _model_text(header)]


def bar_line(seg: SegmentBar, width: int = 30) -> str:
    """`Data  [|||||     ]  12.0M/64.0M  19%`; a segment with no capacity shows `n/a`."""
    label = f"{seg.label:<5}"
    if seg.capacity_nbytes <= 0:
        return f"{label} [{bar(0.0, width)}]  {fmt_bytes(seg.used_nbytes)}/n/a"
    pct = f"{100 * seg.fraction:3.0f}%"
    return (
        f"{label} [{bar(seg.fraction, width)}]  "
        f"{fmt_bytes(seg.used_nbytes)}/{fmt_bytes(seg.capacity_nbytes)} {pct}"
    )


def rates_lines(rates: Rates) -> list[str]:
    """Paging and syscall rates and the window they cover, swap totals and causes, prefetch counters."""
    window = "average since boot" if rates.since_boot else f"last {rates.window_s:.2f}s"
    causes = " ".join(f"{k} {v}" for k, v in rates.by_cause) or "-"
    return [
        f"page-in  {fmt_rate_bytes(rates.page_in_bps):>9}  "
        f"page-out {fmt_rate_bytes(rates.page_out_bps):>9}  ({window})",
        f"syscalls {fmt_count(rates.syscalls_per_s):>7}/s  errors   {fmt_count(rates.errors_per_s):>7}/s",
        f"swap-in  {fmt_bytes(rates.swap_in_nbytes):>9}  swap-out {fmt_bytes(rates.swap_out_nbytes):>9}  (total)",
        f"causes   {causes}",
        f"prefetch pending {rates.prefetch_pending}  on-time {rates.prefetch_on_time}  late {rates.prefetch_late}",
    ]


NAME_WIDTH = 18  # the longest syscall name (checkpoint_status) and a cell to spare
SYSCALL_HEADING = f"{'SYSCALL':<{NAME_WIDTH}} {'CALLS/S':>8} {'COUNT':>8} {'ERR':>5} {'P50':>8} {'P99':>8}"


def syscall_lines(rows: tuple[SyscallRow, ...], limit: int | None = None) -> list[str]:
    """A heading and one line per syscall (busiest first), at most `limit` rows."""
    shown = rows if limit is None else rows[:limit]
    lines = [SYSCALL_HEADING]
    for r in shown:
        lines.append(
            f"{r.name[:NAME_WIDTH]:<{NAME_WIDTH}} {fmt_count(r.per_s):>8} {fmt_count(r.count):>8} {fmt_count(r.errors):>5} "
            f"{fmt_us(r.p50_us):>8} {fmt_us(r.p99_us):>8}"
        )
    if not rows:
        lines.append("(no syscalls yet)")
    elif limit is not None and len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more")
    return lines


def table_lines(rows: tuple[SessionRow, ...]) -> list[str]:
    """The session table: a heading line, then one line per row."""
    cells = [session_cells(r) for r in rows]
    widths = column_widths(cells)
    heading = format_line(tuple(c.title for c in COLUMNS), widths)
    return [heading] + [format_line(c, widths).rstrip() for c in cells]


def render_text(view: View, rows: tuple[SessionRow, ...] | None = None) -> str:
    """The whole snapshot as plain text; `rows` (already sorted and filtered) defaults to every session."""
    rows = view.sessions if rows is None else rows
    lines = ["djinn-top " + header_lines(view.header)[0], header_lines(view.header)[1], ""]
    lines += [bar_line(b) for b in view.bars]
    lines.append("")
    lines += rates_lines(view.rates)
    lines.append("")
    lines += syscall_lines(view.syscalls)
    lines.append("")
    if rows:
        lines += table_lines(rows)
    else:
        lines.append("no sessions" if not view.sessions else "no sessions match the filter")
    return "\n".join(line.rstrip() for line in lines) + "\n"
