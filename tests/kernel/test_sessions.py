"""The session state machine and the ownership check."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from djinn.kernel.errors import ENOENT, EPERM
from djinn.kernel.sessions import TRANSITIONS, InvalidTransition, Session, SessionTable, new_id


def _session(uid: int = 1000) -> Session:
    return Session(id=new_id("s"), uid=uid, pid=1, conn_id=1, model=None, max_tokens=16)


def test_ids_are_unguessable():
    ids = {new_id("s") for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) >= 16 for i in ids)


@given(st.lists(st.sampled_from(sorted(TRANSITIONS)), max_size=30))
def test_only_table_transitions_happen(path):
    s = _session()
    for target in path:
        before = s.state
        if target == before or target in TRANSITIONS[before]:
            s.move(target)
            assert s.state == target
        else:
            with pytest.raises(InvalidTransition):
                s.move(target)
            assert s.state == before


def test_closed_is_terminal():
    s = _session()
    s.move("CLOSED")
    for target in TRANSITIONS:
        if target != "CLOSED":
            with pytest.raises(InvalidTransition):
                s.move(target)


def test_ownership():
    table = SessionTable()
    s = table.add(_session(uid=1000))
    assert table.get(s.id, 1000) is s
    assert table.get(s.id, 0) is s  # root may touch any session
    with pytest.raises(EPERM):
        table.get(s.id, 1001)
    with pytest.raises(ENOENT):
        table.get("s-nope", 1000)


def test_display_state():
    s = _session()
    s.move("RUNNING")
    s.move("PAUSED")
    s.paused_at = 6
    assert s.display_state() == "PAUSED@6"
