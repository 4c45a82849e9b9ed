"""stat against docs/PROTOCOL.md ("The stat snapshot"), and the settings stat shows at work: the grace
period that keeps a gone client's sessions, and the default arena of a session with no model.

The field lists below are that section's table, written out; a field added there belongs here too.
"""

from __future__ import annotations

import os
import time

import pytest

import djinn
from djinn.kernel.config import load_config

TOP_FIELDS = {"version", "protocol", "pid", "uptime_s", "device", "policy", "models", "sessions", "syscalls", "memory",
              "checkpoints", "connections", "cpus", "worker"}
SESSION_FIELDS = {"id", "uid", "pid", "model", "state", "paused_at", "phase", "phase_s", "expected_ms", "residency",
                  "arena_nbytes", "arena_used_nbytes", "tokens", "max_tokens", "age_s", "idle_s", "checkpoints",
                  "connected"}
SYSCALL_FIELDS = {"count", "errors", "total_s", "p50_us", "p99_us"}
SEGMENT_FIELDS = {"capacity_nbytes", "used_nbytes", "free_nbytes", "largest_free_nbytes", "pending_free_nbytes"}
COPY_FIELDS = {"bytes", "ops", "seconds"}
CAUSES = {"signal", "idle", "pressure", "syscall", "prefetch"}
PREFETCH_FIELDS = {"pending", "late", "on_time", "scheduled", "cancelled"}
CHECKPOINT_FIELDS = {"id", "session", "uid", "nbytes", "ready"}


def _missing(fields: set[str], got: dict) -> set[str]:
    return fields - set(got)


def _session(st: dict, sid: str) -> dict | None:
    return next((s for s in st["sessions"] if s["id"] == sid), None)


def test_stat_has_every_documented_field(kernel):
    s = kernel.open_session()
    try:
        s.forward([1, 2, 3])
        ckpt = s.checkpoint()
        ckpt.wait()
        st = kernel.stat()
    finally:
        s.close()

    assert not _missing(TOP_FIELDS, st)
    assert not _missing({"loop", "worker", "torch_threads"}, st["cpus"]) and st["cpus"]["torch_threads"] >= 1
    assert st["version"] and st["protocol"] == 1 and st["pid"] == os.getpid()  # the test daemon runs in-process
    assert st["uptime_s"] > 0 and st["device"] == "cpu" and st["policy"] in ("proactive", "reactive", "none")
    assert st["connections"] >= 1

    mine = _session(st, s.id)
    assert mine is not None and not _missing(SESSION_FIELDS, mine)
    assert mine["uid"] == os.geteuid() and mine["model"] == "demo" and mine["connected"] is True
    assert mine["residency"] in ("device", "host", "none") and mine["state"] in (
        "READY", "RUNNING", "PAUSED", "IO_WAIT", "SWAPPED")
    assert mine["age_s"] >= mine["idle_s"] >= 0 and mine["tokens"] == 3 and mine["checkpoints"] == 1
    assert 0 < mine["arena_used_nbytes"] <= mine["arena_nbytes"]

    for name in ("hello", "open_session", "forward"):
        calls = st["syscalls"][name]
        assert not _missing(SYSCALL_FIELDS, calls), name
        assert calls["count"] >= 1 and 0 < calls["p50_us"] <= calls["p99_us"], (name, calls)

    segments = st["memory"]["segments"]
    for name in ("text", "data", "stack", "host"):
        assert not _missing(SEGMENT_FIELDS, segments[name]), name
    for name in ("data", "host"):
        seg = segments[name]
        assert seg["used_nbytes"] + seg["free_nbytes"] == seg["capacity_nbytes"], name
        assert 0 < seg["largest_free_nbytes"] <= seg["free_nbytes"], name
        assert seg["fragmentation"] == pytest.approx(1 - seg["largest_free_nbytes"] / seg["free_nbytes"]), name

    swap = st["memory"]["swap"]
    assert not _missing(COPY_FIELDS, swap["out"]) and not _missing(COPY_FIELDS, swap["in"])
    assert set(swap["by_cause"]) == CAUSES
    assert not _missing(PREFETCH_FIELDS, st["memory"]["prefetch"])
    assert set(st["memory"]["transfer_estimate_bytes_per_s"]) >= {"out", "in"}

    ours = [c for c in st["checkpoints"] if c["id"] == ckpt.id]
    assert len(ours) == 1 and not _missing(CHECKPOINT_FIELDS, ours[0])
    assert ours[0]["session"] == s.id and ours[0]["uid"] == os.geteuid() and ours[0]["nbytes"] > 0

    assert {"calls", "busy_s", "wait_s", "streams", "sessions_per_stream", "decode_batching"} <= set(st["worker"])
    assert set(st["worker"]["decode_batching"]) == {"max_batch", "passes", "steps", "batched_steps", "batches",
                                                    "largest", "fallbacks"}
    demo = next(m for m in st["models"] if m["name"] == "demo")
    assert set(demo["batched_decode"]) == {"steps", "sequences", "graphs", "captures", "replays"}
    assert demo["prefill_graphs"] == {"plans": 0, "captures": 0, "replays": 0}  # CPU: no prefill plans


def test_stat_is_plain_as_its_reply_trusts(djinnd, kernel):
    """stat's handler returns its snapshot as `Plain`, encoded without the walk that finds tensors and
    rejects what CBOR headers may not hold; so the snapshot itself must pass that walk, with sessions
    paused, swapped out with a checkpoint, and ready."""
    from djinn.kernel.tensors import _plain

    paused, swapped, ready = kernel.open_session(), kernel.open_session(), kernel.open_session()
    try:
        paused.forward([1, 2, 3], pause_at=0)
        swapped.forward([4, 5])
        swapped.checkpoint().wait()
        swapped.page_out()
        ready.forward([6])
        # The forward's reply may leave from the worker before the loop has moved the session back to
        # READY; a request on the same connection waits for that (the server holds it), a call straight
        # into the loop does not. So one syscall first, then the snapshot.
        kernel.syscall("nop")
        snapshot = djinnd.call_in_loop(djinnd.kernel.stat)
    finally:
        for s in (paused, swapped, ready):
            s.close()
    assert _plain({"id": 1, "ok": True, "result": snapshot}, 1, djinnd.kernel.limits.max_cbor_depth)
    assert {s["state"] for s in snapshot["sessions"]} >= {"PAUSED", "SWAPPED", "READY"} and snapshot["checkpoints"]


def test_stat_swap_has_the_documented_checkpoint_copies(kernel):
    swap = kernel.stat()["memory"]["swap"]
    assert not _missing(COPY_FIELDS, swap["snapshot"]) and not _missing(COPY_FIELDS, swap["restore"])


@pytest.mark.daemon(model="none", grace_s=0.5)
def test_a_grace_period_keeps_then_reclaims_a_gone_clients_session(fresh_djinnd):
    grace_s = fresh_djinnd.config.grace_s
    with djinn.connect(fresh_djinnd.path) as k:
        sid = k.syscall("open_session", bare=True)["session"]
        gone_s = time.monotonic()  # the daemon learns of the disconnect after this
    seen_disconnected = False
    with djinn.connect(fresh_djinnd.path) as watcher:
        deadline = gone_s + grace_s + 10
        while (mine := _session(watcher.stat(), sid)) is not None:
            assert time.monotonic() < deadline, f"session {sid} outlived its {grace_s} s grace period"
            seen_disconnected |= mine["connected"] is False
            time.sleep(0.02)
        reclaimed_s = time.monotonic()
    assert seen_disconnected, "the session should be listed, disconnected, during the grace period"
    assert reclaimed_s - gone_s >= grace_s, "reclaimed before the grace period ended"


@pytest.mark.daemon(model="none", vmu_session_arena_mb=3)
def test_vmu_session_arena_mb_sets_a_new_sessions_arena(fresh_djinnd):
    with djinn.connect(fresh_djinnd.path) as k:
        reply = k.syscall("open_session")
        assert reply["arena_nbytes"] == 3 << 20
        assert _session(k.stat(), reply["session"])["arena_nbytes"] == 3 << 20
        explicit = k.syscall("open_session", arena_nbytes=1 << 20)  # the argument wins over the setting
        assert explicit["arena_nbytes"] == 1 << 20
        for sid in (reply["session"], explicit["session"]):
            k.syscall("close_session", session=sid)


def test_vmu_session_arena_mb_from_the_environment_and_the_flag(tmp_path):
    env = {"DJINN_VMU_SESSION_ARENA_MB": "3", "XDG_CONFIG_HOME": str(tmp_path)}
    assert load_config([], env=env).vmu_session_arena_mb == 3
    assert load_config(["--vmu-session-arena-mb", "5"], env=env).vmu_session_arena_mb == 5
    with pytest.raises(ValueError, match=r"vmu_session_arena_mb from \$DJINN_VMU_SESSION_ARENA_MB"):
        load_config([], env={**env, "DJINN_VMU_SESSION_ARENA_MB": "0"})
