"""The djinn-top terminal UI: a Textual app that polls one StatSource about four times a second.

Rules: one `stat` call per tick, made on a single worker thread (every call to
the source goes through it, so the connection is never shared between
threads), and never two at once. A failed call marks the UI disconnected and
the next tick simply tries again. What is drawn comes from `model.build_view`
and `model.select`; widgets repaint only what changed.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from typing import Any, Callable, TypeVar

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Static

from djinn.kernel.errors import KernelError

from .model import SessionRow, View, build_view
from .plain import header_lines, rates_lines
from .query import SORT_KEYS, parse_filter, select
from .source import StatSource, Unavailable, no_daemon_message
from .widgets import HeaderPanel, MemoryPanel, RatesPanel, SessionTable, StatusLine, SyscallPanel

__all__ = ["TopApp", "HELP_TEXT"]

T = TypeVar("T")
SORT_ORDER = tuple(SORT_KEYS)
MESSAGE_S = 8.0  # how long a message (a close result, an error) stays on the status line
CLOSE_S = 1.0  # on quit, how long to wait for the connection to close before leaving it to the OS


class _Worker:
    """One daemon thread that runs the source's blocking calls in order.

    A daemon thread, not a ThreadPoolExecutor, because the interpreter joins an
    executor's threads at exit: a call stuck on a hung daemon would stop `q` from quitting.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="djinn-top-source", daemon=True).start()

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run fn(*args) on the thread; the future completes on the calling loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            try:
                result, error = fn(*args), None
            except BaseException as e:  # handed to the awaiting coroutine, which decides
                result, error = None, e
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop has closed: nobody is waiting
                pass


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

HELP_TEXT = """\
djinn-top: the Djinn kernel's sessions, memory and syscalls, refreshed about 4 times a second.

  Up/Down PgUp/PgDn Home/End   move the cursor (the mouse wheel and clicks work too)
  s  >  F6                     sort by the next column
  <                            sort by the previous column
  r                            reverse the sort order
  /  F4                        filter: type words, or field:value terms
                               (id: uid: pid: model: state: res: phase:), Enter to keep
  Esc                          clear the filter
  k  F9                        close the session under the cursor (its owner or root only;
                               the kernel refuses others with EPERM, shown on the status line)
  ?  h  F1                     this help
  q  F10                       quit

Columns: LAST is the time since the session's last syscall; ARENA is used/size
of its Data-segment arena; RES is where the arena lives (device, host, none).
Rates cover the last refresh interval (averages since boot until there are two snapshots).

Press any key to return."""


class HelpScreen(ModalScreen[None]):
    """The key list. Any key closes it."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static { width: auto; max-width: 100%; height: auto; border: round $accent;
                          padding: 1 2; background: $panel; }
    """

    def compose(self) -> ComposeResult:
        yield Static(HELP_TEXT, id="help")

    def on_key(self, event: Any) -> None:
        event.stop()
        self.dismiss(None)

    def on_click(self) -> None:
        self.dismiss(None)


class ConfirmClose(ModalScreen[bool]):
    """Asks before closing a session: y or Enter closes it, anything else cancels."""

    DEFAULT_CSS = """
    ConfirmClose { align: center middle; }
    ConfirmClose > Static { width: auto; height: auto; border: round $warning; padding: 1 2;
                            background: $panel; }
    """

    def __init__(self, row: SessionRow, uid: int) -> None:
        super().__init__()
        self.row = row
        self.uid = uid

    def compose(self) -> ComposeResult:
        row = self.row
        text = f"Close session {row.id} (uid {row.uid}, pid {row.pid}, {row.model}, {row.state_label})?"
        if self.uid != 0 and row.uid is not None and row.uid != self.uid:
            text += f"\nYou are uid {self.uid}, not its owner: the kernel will refuse (EPERM)."
        yield Static(text + "\n\n[y] close   [n] cancel", markup=False)

    def on_key(self, event: Any) -> None:
        event.stop()
        self.dismiss(event.key in ("y", "Y", "enter"))


class TopApp(App[int]):
    """djinn-top. `source` is polled every `interval_s`; `sort`, `reverse`, `filter_text` set the start state."""

    TITLE = "djinn-top"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    Screen { layout: vertical; }
    HeaderPanel, MemoryPanel, RatesPanel, SyscallPanel, StatusLine { text-wrap: nowrap; text-overflow: clip; }
    HeaderPanel { height: 2; }
    #top { height: 10; margin-top: 1; }
    #left { width: 1fr; }
    MemoryPanel { height: 4; }
    RatesPanel { height: 5; margin-top: 1; }
    SyscallPanel { width: 60; height: 10; margin-left: 2; }
    SessionTable { height: 1fr; margin-top: 1; }
    StatusLine { height: 1; background: $boost; }
    #filter { display: none; height: 1; border: none; padding: 0 1; }
    #filter.editing { display: block; }
    """
    BINDINGS = [
        Binding("q,f10", "quit", "Quit"),
        Binding("question_mark,h,f1", "help", "Help"),
        Binding("s,greater_than_sign,f6", "sort(1)", "Sort"),
        Binding("less_than_sign", "sort(-1)", "Sort back", show=False),
        Binding("r", "reverse", "Reverse"),
        Binding("slash,f4", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("k,f9", "close_session", "Close session"),
    ]

    def __init__(
        self,
        source: StatSource,
        *,
        interval_s: float = 0.25,
        sort: str = "id",
        reverse: bool = False,
        filter_text: str = "",
        uid: int | None = None,
    ) -> None:
        super().__init__()
        if sort not in SORT_KEYS:
            raise ValueError(f"unknown sort key {sort!r}; one of {', '.join(SORT_KEYS)}")
        self.source = source
        self.interval_s = interval_s
        self.sort = sort
        self.reverse = reverse
        self.filter = parse_filter(filter_text)
        self.uid = os.getuid() if uid is None else uid
        self.view: View | None = None
        self.connected = False
        self.down_reason = ""
        self.ticks = 0
        self.shown: tuple[SessionRow, ...] = ()
        self._prev: dict[str, Any] | None = None
        self._prev_t = 0.0
        self._busy = False
        self._message = ("", "", 0.0)
        self._worker = _Worker()

    def compose(self) -> ComposeResult:
        yield HeaderPanel()
        with Horizontal(id="top"):
            with Vertical(id="left"):
                yield MemoryPanel()
                yield RatesPanel()
            yield SyscallPanel()
        yield SessionTable(id="sessions")
        yield StatusLine()
        yield Input(placeholder="filter: words or field:value (state:io uid:1000); Enter keeps, Esc clears",
                    id="filter")
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one(SessionTable).focus()
        self._render_status()
        await self.tick()
        self.set_interval(self.interval_s, self.tick)

    async def on_unmount(self) -> None:
        try:
            await asyncio.wait_for(self._call(self.source.close), CLOSE_S)
        except asyncio.TimeoutError:
            pass
        self._worker.stop()

    def _call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return self._worker.submit(fn, *args)

    async def tick(self) -> None:
        """One refresh: a stat call, then the view. Skipped while the previous one is still out."""
        if self._busy:
            return
        self._busy = True
        try:
            snap = await self._call(self.source.stat)
        except Unavailable as e:
            self._set_down(e.reason)
        except KernelError as e:
            self.connected, self.down_reason = True, ""
            self._say(f"stat failed: {e}", "error")
            self._render_view()
        except Exception as e:  # a client bug must not take the UI down; it retries on the next tick
            await self._call(self.source.close)
            self._set_down(f"{type(e).__name__}: {e}")
        else:
            self._show(snap)
        finally:
            self._busy = False
            self.ticks += 1

    def _set_down(self, reason: str) -> None:
        self.connected = False
        self.down_reason = reason
        self._prev = None
        self._render_view()

    def _show(self, snap: dict[str, Any]) -> None:
        now = time.monotonic()
        if not self.connected and self.view is not None:
            self._say("reconnected", "info")
        self.connected = True
        self.down_reason = ""
        dt = now - self._prev_t if self._prev is not None else 0.0
        self.view = build_view(self._prev, snap, dt)
        self._prev, self._prev_t = snap, now
        self._render_view()

    def _render_view(self) -> None:
        view = self.view
        if view is not None:
            self.query_one(HeaderPanel).show(tuple(header_lines(view.header)))
            self.query_one(MemoryPanel).show(view.bars)
            self.query_one(RatesPanel).show(tuple(rates_lines(view.rates)))
            self.query_one(SyscallPanel).show(view.syscalls)
            self.shown = select(view.sessions, self.sort, self.reverse, self.filter)
        if not self.connected:
            placeholder = no_daemon_message(self.source.target, self.down_reason)
        elif view is None:
            placeholder = "waiting for the first snapshot"
        elif view.sessions:
            placeholder = f"no sessions match the filter {self.filter.text!r}"
        else:
            placeholder = "no sessions open"
        self.query_one(SessionTable).set_rows(self.shown, self.sort, placeholder)
        self._render_status()

    def _say(self, message: str, severity: str = "") -> None:
        self._message = (message, severity, time.monotonic() + MESSAGE_S)
        self._render_status()

    def _render_status(self) -> None:
        order = "desc" if (SORT_KEYS[self.sort][1] != self.reverse) else "asc"
        total = len(self.view.sessions) if self.view is not None else 0
        left = f"sort {self.sort} {order}  filter {self.filter.text or '-'}  {len(self.shown)}/{total} sessions"
        text, severity, until = self._message
        if text and time.monotonic() > until:
            text, severity = "", ""
        if not self.connected:
            down = f"disconnected, retrying: no daemon at {self.source.target}"
            if self.down_reason:
                down += f" ({self.down_reason})"
            text, severity = (f"{text} | {down}" if text else down), "error"
        self.query_one(StatusLine).show((left, text, severity))

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_sort(self, step: int) -> None:
        self.sort = SORT_ORDER[(SORT_ORDER.index(self.sort) + step) % len(SORT_ORDER)]
        self._render_view()

    def action_reverse(self) -> None:
        self.reverse = not self.reverse
        self._render_view()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = self.filter.text
        box.add_class("editing")
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("editing")
        self.filter = parse_filter("")
        self.query_one(SessionTable).focus()
        self._render_view()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter = parse_filter(event.value)
        self._render_view()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.input.remove_class("editing")
        self.query_one(SessionTable).focus()

    def action_close_session(self) -> None:
        row = self.query_one(SessionTable).selected
        if row is None or not self.connected:
            self._say("no session selected" if self.connected else "cannot close: not connected", "error")
            return

        async def decided(yes: bool | None) -> None:
            if yes:
                await self.close_session(row.id)

        self.push_screen(ConfirmClose(row, self.uid), decided)

    async def close_session(self, session: str) -> bool:
        """Ask the kernel to close `session`; the outcome goes to the status line. True on success."""
        try:
            await self._call(self.source.close_session, session)
        except KernelError as e:
            self._say(f"close {session}: {e}", "error")
            return False
        except Unavailable as e:
            self._say(f"close {session}: no daemon ({e.reason})", "error")
            return False
        self._say(f"closed {session}", "info")
        await self.tick()
        return True
