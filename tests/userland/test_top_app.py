"""djinn-top's shell: the Textual UI under the pilot (fake source and live daemon) and --once/--json."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from djinn.top.app import main, parse_args, print_once
from djinn.top.fake import FakeSource, synthetic_snapshot
from djinn.top.source import KernelSource, Unavailable, no_daemon_message
from djinn.top.ui import HelpScreen, TopApp
from djinn.top.widgets import SessionTable, StatusLine

SIZE = (140, 45)
UID = 1000  # the fake's sessions: i % 3 == 0 belong to uid 1001, the rest to 1000


def _kernel_ready() -> bool:
    try:
        import djinn.kernel.boot  # noqa: F401
        import djinn.kernel.core  # noqa: F401
        import djinn.kernel.server  # noqa: F401
        from djinn.drivers.model import load_model  # noqa: F401
        from djinn.drivers.vmu import VMU  # noqa: F401
    except ImportError:
        return False
    return True


live = pytest.mark.skipif(not _kernel_ready(), reason="the daemon has not landed yet")


def make_app(source: Any = None, **kw: Any) -> TopApp:
    """An app whose timer never fires during a test: each test drives `tick()` itself."""
    return TopApp(source if source is not None else FakeSource(12, uid=UID), interval_s=3600, uid=UID, **kw)


def status(app: TopApp) -> str:
    left, message, _severity = app.query_one(StatusLine)._value  # type: ignore[misc]
    return f"{left}  {message}"


def ids(app: TopApp) -> list[str]:
    return [r.id for r in app.query_one(SessionTable).rows]


def screen_text(app: TopApp) -> str:
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


# -- against a fake source ------------------------------------------------------------------


async def test_first_frame_shows_header_bars_rates_and_sessions():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        text = screen_text(app)
        for part in ("djinn-top djinnd 0.1.0", "device cpu", "policy proactive", "models: demo",
                     "Text  [", "Data  [", "Stack [", "Host  [", "page-in", "syscalls", "P99", "forward",
                     "ID", "STATE", "LAST", "s-0000", "PAUSED@6"):
            assert part in text, part
        assert len(ids(app)) == 12 and app.connected


async def test_sort_keys_cycle_and_reverse():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        assert app.sort == "owner" and "sort owner asc" in status(app)
        await pilot.press("greater_than_sign", "greater_than_sign", "greater_than_sign", "greater_than_sign")
        assert app.sort == "arena"
        sizes = [(r.arena_used_nbytes, r.arena_nbytes) for r in app.query_one(SessionTable).rows]
        assert sizes == sorted(sizes, reverse=True)
        await pilot.press("r")
        assert app.reverse and "sort arena asc" in status(app)
        assert [(r.arena_used_nbytes, r.arena_nbytes) for r in app.query_one(SessionTable).rows] == sorted(sizes)
        await pilot.press("less_than_sign")
        assert app.sort == "residency"


async def test_filter_by_typing_and_clear_with_escape():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("slash", *"uid:1001", "enter")
        assert ids(app) == ["s-0000", "s-0003", "s-0006", "s-0009"]
        assert "filter uid:1001  4/12 sessions" in status(app)
        assert app.query_one(SessionTable).has_focus
        await app.tick()
        assert len(ids(app)) == 4  # the filter holds across refreshes
        await pilot.press("slash", *" zzz", "enter")
        assert ids(app) == [] and "match the filter" in screen_text(app)
        await pilot.press("escape")
        assert len(ids(app)) == 12 and app.filter.text == ""


async def test_typing_k_in_the_filter_box_does_not_close_a_session():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("slash", "k", "q")
        assert app.filter.text == "kq" and not isinstance(app.screen, HelpScreen) and app.is_running


async def test_cursor_follows_its_session_across_resorting():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("down", "down", "down")
        table = app.query_one(SessionTable)
        assert table.selected is not None and table.selected.id == "s-0003"
        await pilot.press("r")
        assert table.selected.id == "s-0003" and ids(app)[0] == "s-000b"
        await pilot.press("end")
        assert table.selected.id == "s-0000"
        await pilot.press("home", "pagedown")
        assert table.selected.id == "s-0000"  # 12 rows fit on one page


async def test_close_own_session():
    source = FakeSource(12, uid=UID)
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("down")  # s-0001, uid 1000
        await pilot.press("k")
        await pilot.pause()
        assert "Close session s-0001" in screen_text(app)
        await pilot.press("y")
        await pilot.pause()
        assert source.closed == {"s-0001"}
        assert "closed s-0001" in status(app)
        assert "s-0001" not in ids(app)


async def test_close_someone_elses_session_shows_eperm():
    source = FakeSource(12, uid=UID)
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("k")  # s-0000 belongs to uid 1001
        await pilot.pause()
        assert "not its owner" in screen_text(app)
        await pilot.press("y")
        await pilot.pause()
        assert source.closed == set()
        assert "close s-0000: [EPERM]" in status(app) and app.query_one(StatusLine)._value[2] == "error"


async def test_close_can_be_cancelled():
    source = FakeSource(12, uid=UID)
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("down", "k", "n")
        await pilot.pause()
        assert source.closed == set() and "s-0001" in ids(app)


async def test_help_screen_opens_and_any_key_closes_it():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert "close the session under the cursor" in screen_text(app)
        await pilot.press("x")
        assert not isinstance(app.screen, HelpScreen) and app.is_running


async def test_disconnect_then_reconnect():
    source = FakeSource(12, uid=UID, target="/run/test/djinnd.sock")
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        source.down = True
        await app.tick()
        await pilot.pause()
        assert not app.connected
        assert "disconnected, retrying: no daemon at /run/test/djinnd.sock" in status(app)
        assert app.is_running and len(ids(app)) == 12  # the last rows stay on screen
        await app.tick()
        assert "disconnected, retrying" in status(app)
        source.down = False
        await app.tick()
        assert app.connected and "reconnected" in status(app)
        assert app.view is not None and app.view.rates.since_boot  # not diffed across the gap


async def test_no_daemon_at_start_says_where_and_how():
    source = FakeSource(uid=UID, target="/nowhere/djinnd.sock")
    source.down = True
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        text = screen_text(app)
        assert "disconnected, retrying: no daemon at /nowhere/djinnd.sock" in text
        assert "DJINN_SOCKET=/nowhere/djinnd.sock djinnd" in text
        await pilot.press("k")
        assert "not connected" in status(app)


async def test_no_sessions_and_malformed_snapshots_do_not_crash():
    snaps = iter([{"sessions": []}, {"sessions": "junk", "memory": 3}, {"pid": "x", "sessions": [None, {}]}])
    app = make_app(FakeSource(snapshot=lambda t: next(snaps)))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "no sessions open" in screen_text(app)
        await app.tick()
        await app.tick()
        await pilot.pause()
        assert app.is_running and ids(app) == ["?", "?"]


async def test_a_client_bug_is_reported_not_fatal():
    def boom(t: float) -> dict[str, Any]:
        raise RuntimeError("decoder fell over")

    app = make_app(FakeSource(snapshot=boom))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.is_running and "RuntimeError: decoder fell over" in status(app)


async def test_a_kernel_error_from_stat_is_shown_as_such():
    from djinn.kernel.errors import EIO

    def fail(t: float) -> dict[str, Any]:
        raise EIO("stat: internal error")

    app = make_app(FakeSource(snapshot=fail))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "stat failed: [EIO] stat: internal error" in status(app)
        assert "disconnected" not in status(app) and "waiting for the first snapshot" in screen_text(app)
    err = io.StringIO()
    assert print_once(FakeSource(snapshot=fail, target="/x.sock"), parse_args(["--once"]), err=err) == 1
    assert "stat failed at /x.sock: [EIO]" in err.getvalue()


async def test_an_unchanged_snapshot_repaints_nothing():
    snap = synthetic_snapshot(200, 10.0, uid=UID)
    app = make_app(FakeSource(snapshot=lambda t: snap))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        table = app.query_one(SessionTable)
        calls: list[Any] = []
        original = table.refresh
        table.refresh = lambda *a, **k: (calls.append(a), original(*a, **k))[1]  # type: ignore[method-assign]
        await app.tick()
        assert calls == []
        await pilot.press("down")
        assert len(calls) == 1 and len(calls[0]) == 2  # only the two cursor lines


async def test_a_real_timer_refreshes_about_four_times_a_second():
    """By default the source is polled every 0.25 s. The bounds hold however long the pause really took
    on a loaded machine: one poll at start, then at most one per 0.25 s that passed."""
    source = FakeSource(50, uid=UID)
    app = TopApp(source, uid=UID)
    assert app.interval_s == 0.25
    t0 = time.monotonic()  # the first poll and the timer start while the app mounts
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(1.05)
        calls, elapsed = source.calls, time.monotonic() - t0
    assert 2 <= calls <= 1 + math.floor(elapsed / 0.25), (calls, elapsed)


# -- --once / --json ----------------------------------------------------------------------


def test_once_prints_text():
    out = io.StringIO()
    assert print_once(FakeSource(5, uid=UID), parse_args(["--once", "--sort", "id", "--reverse"]), out=out) == 0
    text = out.getvalue()
    assert "average since boot" in text and "s-0004" in text and "\x1b" not in text
    lines = text.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("ID ")) + 1:]
    assert [line.split()[0] for line in table] == ["s-0004", "s-0003", "s-0002", "s-0001", "s-0000"]


def test_json_prints_the_raw_snapshot():
    out = io.StringIO()
    assert print_once(FakeSource(3, uid=UID), parse_args(["--json"]), out=out) == 0
    snap = json.loads(out.getvalue())
    assert len(snap["sessions"]) == 3 and snap["memory"]["segments"]["data"]["capacity_nbytes"] > 0


@pytest.mark.parametrize("mode", ["--once", "--json"])
def test_no_daemon_exits_non_zero_with_the_socket_and_how_to_start(tmp_path, mode, capsys):
    sock = str(tmp_path / "none.sock")
    assert main([mode, "--socket", sock]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"no djinn daemon is running at {sock}" in captured.err
    assert f"DJINN_SOCKET={sock} djinnd" in captured.err


def test_no_daemon_on_the_default_socket_says_plain_djinnd(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DJINN_SOCKET", str(tmp_path / "d.sock"))
    assert main(["--once"]) == 1
    assert "Start one with:  djinnd\n" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path):
    sock = str(tmp_path / "none.sock")
    done = subprocess.run([sys.executable, "-m", "djinn.top", "--once", "--socket", sock],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and sock in done.stderr and "djinnd" in done.stderr
    done = subprocess.run([sys.executable, "-m", "djinn.top", "--demo", "4", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and len(json.loads(done.stdout)["sessions"]) == 4
    assert "textual" not in subprocess.run(
        [sys.executable, "-c", "import sys; from djinn.top.app import main; main(['--demo', '1', '--once']);"
         "print(sorted(m for m in sys.modules if m.startswith('textual')), file=sys.stderr)"],
        capture_output=True, text=True, timeout=60).stderr


@pytest.mark.parametrize("argv", [["--interval", "0"], ["--sort", "cpu"], ["--once", "--json"], ["--demo", "-1"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


def test_unavailable_message_mentions_the_reason():
    msg = no_daemon_message("/x/d.sock", "connection refused")
    assert "/x/d.sock (connection refused)" in msg and "DJINN_SOCKET=/x/d.sock djinnd" in msg


def test_kernel_source_raises_unavailable_and_retries(tmp_path):
    source = KernelSource(str(tmp_path / "missing.sock"))
    for _ in range(2):
        with pytest.raises(Unavailable) as exc:
            source.stat()
        assert exc.value.socket.endswith("missing.sock") and not source.connected


# -- against a live daemon ----------------------------------------------------------------


@live
def test_once_and_json_against_the_live_daemon(djinnd, capsys):
    import djinn

    with djinn.connect(djinnd.path) as k:
        s = k.open_session()
        assert main(["--once", "--socket", djinnd.path]) == 0
        text = capsys.readouterr().out
        assert "models: demo" in text and s.id in text and "policy " in text
        assert main(["--json", "--socket", djinnd.path]) == 0
        snap = json.loads(capsys.readouterr().out)
        assert s.id in [row["id"] for row in snap["sessions"]] and snap["pid"] == os.getpid()


@live
async def test_ui_against_the_live_daemon_shows_and_closes_a_session(djinnd):
    import djinn

    with djinn.connect(djinnd.path) as k:
        sid = k.open_session().id
        app = TopApp(KernelSource(djinnd.path), interval_s=3600, filter_text=f"id:{sid}")
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert app.connected and ids(app) == [sid]
            assert "models: demo" in screen_text(app)
            await pilot.press("k", "y")
            await pilot.pause()
            assert await app.close_session(sid) is False  # already gone: ENOENT is shown, not raised
            assert "[ENOENT]" in status(app)
            await app.tick()
            assert ids(app) == []
        assert sid not in [row["id"] for row in k.stat()["sessions"]]


@live
async def test_ui_survives_a_daemon_restart(fresh_djinnd):
    from tests.daemon import LiveDaemon

    app = TopApp(KernelSource(fresh_djinnd.path), interval_s=3600)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.connected
        fresh_djinnd.stop()
        await app.tick()
        assert not app.connected and "disconnected, retrying" in status(app)
        again = LiveDaemon(fresh_djinnd.config).start()
        try:
            await app.tick()
            assert app.connected and "reconnected" in status(app)
        finally:
            again.stop()
