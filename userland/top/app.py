"""`djinn-top`: the command line. The interactive UI, or one snapshot as text (`--once`) or JSON (`--json`).

Rules: exit status 0 on success, 1 when no daemon answers (with a message
naming the socket tried and how to start one) or the stat call fails, 2 for
bad arguments. `--once` and `--json` never import textual.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Sequence

from djinn.kernel.errors import KernelError

from .model import build_view
from .plain import render_text
from .query import SORT_KEYS, parse_filter, select
from .source import KernelSource, StatSource, Unavailable, no_daemon_message

__all__ = ["main", "parse_args", "print_once", "make_source"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="djinn-top",
        description="Watch a Djinn daemon: sessions, memory segments, paging and syscall rates.",
        epilog="Keys in the UI: ? for help, s/</> sort, r reverse, / filter, k close session, q quit.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="print one snapshot as plain text and exit "
                      "(rates are averages since the daemon booted)")
    mode.add_argument("--json", action="store_true", help="print one raw stat snapshot as JSON and exit")
    p.add_argument("--socket", metavar="PATH", help="the daemon's socket (default: $DJINN_SOCKET, else "
                   "$XDG_RUNTIME_DIR/djinn/djinnd.sock, else /run/djinn/djinnd.sock for root)")
    p.add_argument("--interval", type=float, default=0.25, metavar="S",
                   help="seconds between refreshes (default 0.25)")
    p.add_argument("--sort", choices=tuple(SORT_KEYS), default="id", help="the session table's sort key")
    p.add_argument("--reverse", action="store_true", help="reverse the sort order")
    p.add_argument("--filter", default="", metavar="TEXT",
                   help="show only matching sessions: words, or field:value terms (state:io uid:1000)")
    p.add_argument("--demo", type=int, metavar="N", help="show N synthetic sessions instead of a daemon")
    args = p.parse_args(argv)
    if not (args.interval > 0 and math.isfinite(args.interval)):
        p.error("--interval must be a positive number of seconds")
    if args.demo is not None and args.demo < 0:
        p.error("--demo takes a number of sessions >= 0")
    return args


def make_source(args: argparse.Namespace) -> StatSource:
    """The source the arguments ask for: a fake for `--demo`, else the daemon at `--socket`."""
    if args.demo is not None:
        from .fake import FakeSource

        return FakeSource(args.demo, target="demo")
    return KernelSource(args.socket)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def print_once(source: StatSource, args: argparse.Namespace, out: Any = None, err: Any = None) -> int:
    """Print one snapshot as `args` asks (text or JSON) to `out`; the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        snap = source.stat()
    except Unavailable as e:
        print(no_daemon_message(e.socket, e.reason), file=err)
        return 1
    except KernelError as e:
        print(f"djinn-top: stat failed at {source.target}: {e}", file=err)
        return 1
    finally:
        source.close()
    if args.json:
        json.dump(snap, out, indent=2, sort_keys=True, default=_json_default)
        out.write("\n")
        return 0
    view = build_view(None, snap, 0.0)
    out.write(render_text(view, select(view.sessions, args.sort, args.reverse, parse_filter(args.filter))))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The console script's entry point; returns the exit status."""
    args = parse_args(argv)
    source = make_source(args)
    if args.once or args.json:
        try:
            return print_once(source, args)
        except BrokenPipeError:
            return 0
    from .ui import TopApp

    app = TopApp(source, interval_s=args.interval, sort=args.sort, reverse=args.reverse, filter_text=args.filter)
    app.run()
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
