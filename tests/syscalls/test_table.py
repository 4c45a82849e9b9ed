"""The syscall table, its handlers and docs/PROTOCOL.md agree."""

from __future__ import annotations

import inspect
from pathlib import Path

from djinn.syscalls import doc
from djinn.syscalls.table import TABLE

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def test_handlers_take_exactly_the_schema_arguments():
    for name, row in TABLE.items():
        params = inspect.signature(row.handler).parameters
        kw = [p for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert [p.name for p in kw] == [a.name for a in row.args], name
        assert all(p.default is inspect.Parameter.empty for p in kw), f"{name}: defaults belong in the schema"
        if "stream" in row.flags:
            assert inspect.isasyncgenfunction(row.handler), name
        elif not inspect.iscoroutinefunction(row.handler):
            # A plain function is answered inline on the event loop: it must not wait,
            # so it may neither run on the device nor queue behind a session's lock.
            assert inspect.isfunction(row.handler), name
            assert not row.flags & {"gpu", "session"}, f"{name}: a plain handler cannot be {set(row.flags)}"


def test_control_syscalls_are_answered_without_a_task():
    from djinn.kernel.dispatch import ASYNC_CALLS

    assert {"nop", "echo", "stat", "hello", "models"}.isdisjoint(ASYNC_CALLS)
    assert {"forward", "open_session", "generate"} <= ASYNC_CALLS


def test_session_flag_matches_a_session_argument():
    for name, row in TABLE.items():
        has = any(a.name == "session" for a in row.args)
        assert has == ("session" in row.flags), name


def test_protocol_document_matches_the_table():
    text = PROTOCOL.read_text()
    assert doc.render() in text, "docs/PROTOCOL.md is stale: run python -m djinn.syscalls.doc --write docs/PROTOCOL.md"
    for name in TABLE:
        assert f"### `{name}`" in text


def test_every_errno_is_documented_with_its_number():
    import re

    from djinn.kernel.abi import ERRNO

    rows = dict(re.findall(r"^\| `(E[A-Z0-9]+)` \| (\d+) \|", PROTOCOL.read_text(), re.MULTILINE))
    assert {name: int(code) for name, code in rows.items()} == {name: code for name, (code, _meaning) in ERRNO.items()}
