"""djinn-top's widgets: summary panels and the session table.

Rules: widgets only draw; the app owns the data and pushes model records in.
Every setter compares with what is shown and repaints only on a change, so an
idle screen costs nothing. The session table draws with the line API: it
formats only the rows on screen and repaints only the lines that changed.
"""

from __future__ import annotations

from typing import Any, cast

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget

from .fmt import COLUMNS, bar, fmt_bytes, format_line, session_cells
from .model import SegmentBar, SessionRow, SyscallRow
from .plain import syscall_lines

__all__ = ["HeaderPanel", "MemoryPanel", "RatesPanel", "SyscallPanel", "SessionTable", "StatusLine"]

_STATE_STYLES = {
    "RUNNING": Style(color="green", bold=True),
    "PAUSED": Style(color="yellow"),
    "IO_WAIT": Style(color="cyan"),
    "SWAPPED": Style(color="magenta"),
    "CLOSED": Style(dim=True),
}
_HEADING = Style(bold=True, reverse=True)
_HEADING_SORTED = Style(bold=True, color="black", bgcolor="cyan")
_CURSOR = Style(reverse=True)


class _Panel(Widget):
    """A widget whose content is a value; `show(value)` repaints only when the value changed."""

    _value: Any = None

    def show(self, value: Any) -> None:
        if value != self._value:
            self._value = value
            self.refresh()


class HeaderPanel(_Panel):
    """Daemon, uptime, device, policy, models. Value: the two lines of `plain.header_lines`, or None."""

    def render(self) -> Text:
        if not self._value:
            return Text("djinn-top: waiting for the daemon...", style="bold")
        first, models = self._value
        return Text.assemble(("djinn-top ", "bold cyan"), (first, "bold"), "\n", models, no_wrap=True,
                             overflow="ellipsis")


class MemoryPanel(_Panel):
    """One bar per segment. Value: tuple[SegmentBar, ...]."""

    def render(self) -> Text:
        bars: tuple[SegmentBar, ...] = self._value or ()
        out = Text(no_wrap=True, overflow="crop")
        for i, seg in enumerate(bars):
            if i:
                out.append("\n")
            figures = (
                f" {fmt_bytes(seg.used_nbytes)}/{fmt_bytes(seg.capacity_nbytes)} {100 * seg.fraction:3.0f}%"
                if seg.capacity_nbytes > 0
                else f" {fmt_bytes(seg.used_nbytes)}/n/a"
            )
            width = max(4, self.size.width - 8 - len(figures))
            fill = bar(seg.fraction, width)
            used = fill.rstrip(" ")
            colour = "red" if seg.fraction >= 0.9 else "yellow" if seg.fraction >= 0.7 else "green"
            out.append(f"{seg.label:<5} [", "bold")
            out.append(used, colour)
            out.append(fill[len(used):])
            out.append("]", "bold")
            out.append(figures)
        return out


class RatesPanel(_Panel):
    """Paging and syscall rates. Value: the lines of `plain.rates_lines`, or None."""

    def render(self) -> Text:
        return Text("\n".join(self._value or ()), no_wrap=True, overflow="crop")


class SyscallPanel(_Panel):
    """Busiest syscalls with p50/p99 latency. Value: tuple[SyscallRow, ...]."""

    def render(self) -> Text:
        rows: tuple[SyscallRow, ...] = self._value or ()
        lines = syscall_lines(rows, limit=max(1, self.size.height - 2))
        out = Text(no_wrap=True, overflow="crop")
        out.append(lines[0], "bold reverse")
        for line in lines[1:]:
            out.append("\n" + line)
        return out


class StatusLine(_Panel):
    """One line: sort and filter state on the left, the latest message on the right.

    Value: (left, message, severity) with severity one of "", "info", "error".
    """

    def render(self) -> Text:
        left, message, severity = self._value or ("", "", "")
        style = {"error": "bold white on red", "info": "bold green"}.get(severity, "")
        out = Text(no_wrap=True, overflow="ellipsis")
        out.append(left, "dim")
        if message:
            out.append("  ")
            out.append(message, style)
        return out


class SessionTable(Widget, can_focus=True):
    """The session table: a fixed heading line, then one line per row, with a cursor.

    `set_rows(rows, sort)` replaces the rows (already sorted and filtered); the
    cursor follows its session id across updates. `placeholder` (one or more
    lines) is shown when there are no rows.
    """

    BINDINGS = [
        Binding("up", "move(-1)", "Up", show=False),
        Binding("down", "move(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "jump(0)", "First", show=False),
        Binding("end", "jump(-1)", "Last", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.rows: tuple[SessionRow, ...] = ()
        self.cursor = 0
        self.placeholder = ""
        self._sort = "id"
        self._selected_id: str | None = None
        self._top = 0
        self._widths = tuple(max(c.min_width, len(c.title)) for c in COLUMNS)
        self._drawn: list[object] = []
        self._strips: dict[object, Strip] = {}

    @property
    def selected(self) -> SessionRow | None:
        """The row under the cursor, or None when the table is empty."""
        return self.rows[self.cursor] if 0 <= self.cursor < len(self.rows) else None

    @property
    def _page(self) -> int:
        return max(1, self.size.height - 1)

    def set_rows(self, rows: tuple[SessionRow, ...], sort: str = "id", placeholder: str = "") -> None:
        """Show `rows`; repaint only the lines whose text changed."""
        self.rows = rows
        self.placeholder = placeholder
        if self._selected_id is not None:
            for i, row in enumerate(rows):
                if row.id == self._selected_id:
                    self.cursor = i
                    break
        self._sort = sort
        self._clamp()
        self._repaint()

    def _clamp(self) -> None:
        n = len(self.rows)
        self.cursor = min(max(0, self.cursor), max(0, n - 1))
        self._selected_id = self.rows[self.cursor].id if n else None
        page = self._page
        if self.cursor < self._top:
            self._top = self.cursor
        elif self.cursor >= self._top + page:
            self._top = self.cursor - page + 1
        self._top = max(0, min(self._top, n - page))

    def _keys(self, height: int) -> list[object]:
        """What each of `height` lines shows; equal keys draw equal lines. Widths only grow."""
        cells = [session_cells(row) for row in self.rows[self._top : self._top + max(0, height - 1)]]
        widths = list(self._widths)
        for row_cells in cells:
            for j, cell in enumerate(row_cells):
                if len(cell) > widths[j]:
                    widths[j] = len(cell)
        self._widths = tuple(widths)
        keys: list[object] = [("heading", self._widths, self._sort)]
        focused = self.has_focus
        keys += [(c, self._widths, focused and self._top + i == self.cursor) for i, c in enumerate(cells)]
        if not self.rows:
            keys += [("placeholder", line) for line in self.placeholder.splitlines()]
        keys += [None] * (height - len(keys))
        return keys[:height]

    def _repaint(self, full: bool = False) -> None:
        if not self.is_mounted:
            return
        width, height = self.size
        keys = self._keys(height)
        if full or len(keys) != len(self._drawn):
            self._drawn = keys
            self.refresh()
            return
        dirty = [Region(0, y, width, 1) for y, (a, b) in enumerate(zip(keys, self._drawn)) if a != b]
        self._drawn = keys
        if dirty:
            self.refresh(*dirty)

    def render_line(self, y: int) -> Strip:
        width, height = self.size
        if len(self._drawn) != height:
            self._drawn = self._keys(height)
        key = self._drawn[y] if y < height else None
        if key is None:
            return Strip.blank(width)
        cached = self._strips.get((key, width))
        if cached is not None:
            return cached
        strip = self._make_strip(y, key, width)
        if len(self._strips) > 4096:
            self._strips.clear()
        self._strips[(key, width)] = strip
        return strip

    def _make_strip(self, y: int, key: object, width: int) -> Strip:
        if y == 0:
            segments = []
            for j, (col, w) in enumerate(zip(COLUMNS, self._widths)):
                title = col.title.rjust(w) if col.right else col.title.ljust(w)
                sep = " " if j < len(COLUMNS) - 1 else ""
                segments.append(Segment(title + sep, _HEADING_SORTED if col.sort == self._sort else _HEADING))
            used = sum(len(s.text) for s in segments)
            segments.append(Segment(" " * max(0, width - used), _HEADING))
            return Strip(segments).crop(0, width)
        if isinstance(key, tuple) and key and key[0] == "placeholder":
            return Strip([Segment(key[1], Style(italic=True))]).adjust_cell_length(width)
        cells, widths, is_cursor = cast(tuple[tuple[str, ...], tuple[int, ...], bool], key)
        line = format_line(cells, widths)
        state_col = 4
        start = sum(widths[:state_col]) + state_col
        end = start + widths[state_col]
        state = cells[state_col].partition("@")[0]
        state_style = _STATE_STYLES.get(state, Style())
        segments = [Segment(line[:start]), Segment(line[start:end], state_style), Segment(line[end:])]
        strip = Strip(segments).adjust_cell_length(width)
        if is_cursor:
            strip = strip.apply_style(_CURSOR)
        return strip

    def action_move(self, delta: int) -> None:
        self.cursor += delta
        self._after_move()

    def action_page(self, direction: int) -> None:
        self.cursor += direction * self._page
        self._after_move()

    def action_jump(self, where: int) -> None:
        self.cursor = 0 if where == 0 else len(self.rows) - 1
        self._after_move()

    def _after_move(self) -> None:
        self._clamp()
        self._repaint()

    def on_focus(self) -> None:
        self._repaint()

    def on_blur(self) -> None:
        self._repaint()

    def on_resize(self) -> None:
        self._clamp()
        self._repaint(full=True)

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        self.action_move(3)

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        self.action_move(-3)

    def on_click(self, event: events.Click) -> None:
        if event.y >= 1 and self._top + event.y - 1 < len(self.rows):
            self.cursor = self._top + event.y - 1
            self._after_move()
