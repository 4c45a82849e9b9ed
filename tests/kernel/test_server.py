"""The daemon over its socket: handshake, bad input, ordering, ownership, reclaim, control latency.

Every bad-input case checks two things: the offender gets an error (or EPROTO and a
closed connection), and the daemon keeps serving another client afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Any

import cbor2
import pytest
import torch

import djinn
import djinn.aio
from djinn.kernel import abi
from djinn.kernel.codec import PREFIX, Decoder, encode_frame
from djinn.kernel.tensors import EncodedReply, encode_message, encode_reply, unpack
from tests.daemon import LiveDaemon, daemon_config
from tests.fakes import ConnectionKernel


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    return s


def _read_reply(s: socket.socket) -> dict | None:
    """The next reply header, or None when the daemon closed the connection."""
    dec = Decoder()
    while (frame := dec.next_frame()) is None:
        data = s.recv(1 << 16)
        if not data:
            return None
        dec.feed(data)
    return dict(frame.header)


def _hello(s: socket.socket) -> None:
    s.sendall(b"".join(encode_message({"id": 1, "call": "hello", "args": {"protocol": abi.PROTOCOL_VERSION}})))
    assert _read_reply(s)["ok"]


def _closed(s: socket.socket) -> bool:
    try:
        while True:
            data = s.recv(1 << 16)
            if not data:
                return True
    except (ConnectionResetError, TimeoutError):
        return True


def _still_serving(d: LiveDaemon) -> None:
    with djinn.connect(d.path) as k:
        assert k.syscall("nop") == {}


def _prefix(magic=abi.MAGIC, version=abi.PROTOCOL_VERSION, flags=0, reserved=0, hlen=0, plen=0) -> bytes:
    return PREFIX.pack(magic, version, flags, reserved, hlen, plen)


BAD_FRAMES = {
    "bad magic": _prefix(magic=b"HTTP") + b"x" * 16,
    "bad version": _prefix(version=99, hlen=1) + b"\xa0",
    "bad flags": _prefix(flags=0x80, hlen=1) + b"\xa0",
    "nonzero reserved": _prefix(reserved=1, hlen=1) + b"\xa0",
    "header over the limit": _prefix(hlen=abi.DEFAULT_LIMITS.max_header_nbytes + 1),
    "payload over the limit": _prefix(hlen=1, plen=abi.DEFAULT_LIMITS.max_payload_nbytes + 1),
    "garbage cbor": _prefix(hlen=4) + b"\xff\xff\xff\xff",
    "header not a map": _prefix(hlen=1) + b"\x01",
    "too deep cbor": (lambda h: _prefix(hlen=len(h)) + h)(b"\x81" * 100 + b"\x00"),
    "duplicate keys": (lambda h: _prefix(hlen=len(h)) + h)(b"\xa2\x62id\x01\x62id\x02"),
    "tensor table past the payload": (lambda h: _prefix(hlen=len(h), plen=8) + h + bytes(8))(cbor2.dumps(
        {"id": 2, "call": "echo", "args": {}, "tensors": [
            {"name": "t", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16}]})),
    "tensor nbytes disagree with shape": (lambda h: _prefix(hlen=len(h), plen=64) + h + bytes(64))(cbor2.dumps(
        {"id": 2, "call": "echo", "args": {}, "tensors": [
            {"name": "t", "dtype": "float32", "shape": [3], "offset": 0, "nbytes": 16}]})),
    "unknown dtype": (lambda h: _prefix(hlen=len(h), plen=16) + h + bytes(16))(cbor2.dumps(
        {"id": 2, "call": "echo", "args": {}, "tensors": [
            {"name": "t", "dtype": "float128", "shape": [1], "offset": 0, "nbytes": 16}]})),
    "misaligned tensor": (lambda h: _prefix(hlen=len(h), plen=80) + h + bytes(80))(cbor2.dumps(
        {"id": 2, "call": "echo", "args": {}, "tensors": [
            {"name": "t", "dtype": "uint8", "shape": [8], "offset": 8, "nbytes": 8}]})),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_malformed_frames_get_eproto_and_close(djinnd, case):
    s = _raw(djinnd.path)
    _hello(s)
    s.sendall(BAD_FRAMES[case])
    reply = _read_reply(s)
    assert reply is not None and reply["ok"] is False, case
    assert reply["id"] == 0 and reply["error"]["errno"] == "EPROTO", reply
    if case.endswith("over the limit"):  # which limit, and by how much, as PROTOCOL.md says
        limit = "max_header_nbytes" if case.startswith("header") else "max_payload_nbytes"
        max_ = getattr(abi.DEFAULT_LIMITS, limit)
        assert reply["error"]["details"] == {"limit": limit, "value": max_ + 1, "max": max_}
    if case == "bad version":
        assert reply["error"]["details"] == {"peer_version": 99, "version": abi.PROTOCOL_VERSION}
    assert _closed(s)
    s.close()
    _still_serving(djinnd)


def test_truncated_frame_and_peer_gone_mid_frame(djinnd):
    frame = b"".join(encode_message({"id": 2, "call": "echo", "args": {"data": torch.ones(1000)}}))
    s = _raw(djinnd.path)
    _hello(s)
    s.sendall(frame[: len(frame) // 2])
    s.close()
    _still_serving(djinnd)


def test_frame_split_one_byte_at_a_time(djinnd):
    s = _raw(djinnd.path)
    _hello(s)
    frame = b"".join(encode_message({"id": 7, "call": "echo", "args": {"data": [1, 2, 3]}}))
    for i in range(len(frame)):
        s.send(frame[i:i + 1])
    reply = _read_reply(s)
    assert reply["id"] == 7 and reply["result"] == {"data": [1, 2, 3]}


def test_request_before_hello_is_eproto(djinnd):
    """An error reply to that request, not a protocol error: the connection stays open for hello."""
    s = _raw(djinnd.path)
    s.sendall(b"".join(encode_message({"id": 3, "call": "nop", "args": {}})))
    reply = _read_reply(s)
    assert reply["id"] == 3 and reply["error"]["errno"] == "EPROTO" and "hello" in reply["error"]["message"]
    _hello(s)


def test_pipelined_request_before_hello_is_refused_even_if_hello_follows(djinnd):
    """hello is answered inline and other calls run in tasks, yet a call sent before hello is
    checked before hello runs: it gets EPROTO, and hello then succeeds."""
    s = _raw(djinnd.path)
    s.sendall(b"".join(encode_message({"id": 1, "call": "open_session", "args": {}}))
              + b"".join(encode_message({"id": 2, "call": "hello", "args": {"protocol": abi.PROTOCOL_VERSION}})))
    dec, replies = Decoder(), {}
    while len(replies) < 2:
        while (frame := dec.next_frame()) is not None:
            replies[frame.header["id"]] = frame.header
        if len(replies) < 2:
            data = s.recv(1 << 16)
            assert data, f"connection closed after {replies}"
            dec.feed(data)
    assert replies[1]["ok"] is False and replies[1]["error"]["errno"] == "EPROTO"
    assert replies[2]["ok"] is True


def test_an_error_too_large_to_encode_is_still_answered(djinnd):
    """ENOSYS echoes the call's name: for a name just under the header limit the error would not fit,
    so it goes with its message cut, and the connection carries on."""
    s = _raw(djinnd.path)
    name = "x" * ((1 << 20) - 60)
    s.sendall(b"".join(encode_message({"id": 4, "call": name, "args": {}})))
    reply = _read_reply(s)
    assert reply["id"] == 4 and reply["error"]["errno"] == "ENOSYS" and reply["error"]["message"].endswith("[cut]")
    _hello(s)


def test_version_mismatch_names_both_versions(djinnd):
    s = _raw(djinnd.path)
    s.sendall(b"".join(encode_message({"id": 1, "call": "hello", "args": {"protocol": 99}})))
    reply = _read_reply(s)
    msg = reply["error"]["message"]
    assert reply["error"]["errno"] == "EPROTO" and "99" in msg and str(abi.PROTOCOL_VERSION) in msg
    assert _closed(s)
    _still_serving(djinnd)


def test_hello_reports_every_limit_in_force(kernel):
    limits = abi.DEFAULT_LIMITS
    assert kernel.server["limits"] == {name: getattr(limits, name) for name in abi.Limits.__slots__}


def test_unknown_syscall_and_bad_arguments(kernel):
    with pytest.raises(djinn.errors.ENOSYS):
        kernel.syscall("fly")
    with pytest.raises(djinn.errors.EINVAL, match="'session'"):
        kernel.syscall("close_session", session=42)
    with pytest.raises(djinn.errors.EINVAL, match="unknown argument"):
        kernel.syscall("nop", x=1)
    with pytest.raises(djinn.errors.ENOENT):
        kernel.syscall("close_session", session="s-does-not-exist")
    assert kernel.syscall("nop") == {}


def test_simple_values_are_answered_einval(djinnd):
    """`undefined` and the other simple values may not be sent (PROTOCOL.md): read, then refused with EINVAL."""
    s = _raw(djinnd.path)
    _hello(s)
    for rid, call, args in [
        (2, "echo", {"data": cbor2.undefined}),
        (3, "echo", {"data": {"x": [cbor2.CBORSimpleValue(99)]}}),
        (4, "open_session", {"model": cbor2.undefined}),
    ]:
        header = cbor2.dumps({"id": rid, "call": call, "args": args})
        s.sendall(_prefix(hlen=len(header)) + header)
        reply = _read_reply(s)
        assert reply["id"] == rid and reply["error"]["errno"] == "EINVAL", reply
    assert "'model'" in reply["error"]["message"]
    s.sendall(b"".join(encode_message({"id": 5, "call": "nop", "args": {}})))
    assert _read_reply(s) == {"id": 5, "ok": True, "result": {}}


def test_args_not_a_map(djinnd):
    s = _raw(djinnd.path)
    _hello(s)
    header = cbor2.dumps({"id": 5, "call": "nop", "args": [1, 2]})
    s.sendall(_prefix(hlen=len(header)) + header)
    assert _read_reply(s)["error"]["errno"] == "EPROTO"
    assert _closed(s)
    _still_serving(djinnd)


def test_pipelined_requests_all_answered_by_id(kernel):
    ids = [kernel.submit("echo", data=i) for i in range(200)]
    for i, rid in reversed(list(enumerate(ids))):
        assert kernel.result(rid) == {"data": i}


def test_a_reply_sent_to_the_daemon_is_a_protocol_error(djinnd):
    """A whole successful-reply frame read alone (the shape the daemon takes in fewer steps) is not a request."""
    s = _raw(djinnd.path)
    _hello(s)
    s.sendall(encode_reply(5, {"x": 1})[0])
    reply = _read_reply(s)
    assert reply["id"] == 0 and reply["error"]["errno"] == "EPROTO" and "'call'" in reply["error"]["message"]
    assert _closed(s)
    _still_serving(djinnd)


def test_a_tensor_reference_without_a_table_fails_that_request_only(djinnd):
    s = _raw(djinnd.path)
    _hello(s)
    s.sendall(b"".join(encode_frame({"id": 2, "call": "echo", "args": {"data": {"$tensor": "t"}}})))
    reply = _read_reply(s)
    assert reply["id"] == 2 and reply["error"]["errno"] == "EPROTO" and "names no row" in reply["error"]["message"]
    s.sendall(b"".join(encode_message({"id": 3, "call": "nop", "args": {}})))
    assert _read_reply(s) == {"id": 3, "ok": True, "result": {}}
    s.close()


def test_replies_come_back_out_of_order(djinnd):
    """A slow device call and a control call on one connection: the control reply overtakes."""
    s = _raw(djinnd.path)
    _hello(s)
    loop_done = threading.Event()
    k = djinnd.kernel
    djinnd.loop.call_soon_threadsafe(
        lambda: djinnd.loop.create_task(k.worker.run(time.sleep, 0.5)).add_done_callback(lambda _: loop_done.set()))
    time.sleep(0.05)
    with djinn.connect(djinnd.path) as c:
        slow = c.submit("open_session", arena_nbytes=4096)  # needs the worker, busy sleeping
        fast = c.submit("nop")  # answered on the loop
        first = c._next_frame_for(fast)
        assert first.header["id"] == fast
        assert not loop_done.is_set()
        c.syscall("close_session", session=c.result(slow)["session"])


def test_tensor_round_trip_all_dtypes(kernel):
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8, torch.uint8,
                  torch.bool, torch.float64):
        t = (torch.randn(3, 5) * 10).to(dtype)
        back = kernel.syscall("echo", data=t)["data"]
        assert back.dtype == dtype and torch.equal(back, t)


class _RecordingSocket:
    """A client socket that records the flags of every recv_into."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.flags = sock, []

    def recv_into(self, buffer, nbytes=0, flags=0):
        self.flags.append(flags)
        return self.sock.recv_into(buffer, nbytes, flags)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_busy_poll_reads_without_blocking_and_falls_back_to_a_blocking_read(djinnd):
    big = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB: its payload arrives over several polls
    with djinn.connect(djinnd.path, busy_poll_us=1_000_000) as k:
        k._sock = rec = _RecordingSocket(k._sock)
        assert torch.equal(k.syscall("echo", data=big)["data"], big)
        rids = [k.submit("echo", data=i) for i in range(20)]
        assert [k.result(rid)["data"] for rid in rids] == list(range(20))
        assert rec.flags and all(f == socket.MSG_DONTWAIT for f in rec.flags)  # it never blocked
    with djinn.connect(djinnd.path, busy_poll_us=1) as k:
        k._sock = rec = _RecordingSocket(k._sock)
        djinnd.loop.call_soon_threadsafe(lambda: djinnd.loop.create_task(djinnd.kernel.worker.run(time.sleep, 0.1)))
        s = k.open_session(arena_nbytes=4096)  # waits ~0.1 s behind the sleeping worker: the poll gives up
        s.close()
        assert socket.MSG_DONTWAIT in rec.flags and any(not f & socket.MSG_DONTWAIT for f in rec.flags)


def _scripted_server(path: str, script: Any) -> threading.Thread:
    """A one-connection server at `path` that answers hello, then hands every later request frame to
    `script(sock, frame)`."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        listener.close()
        dec = Decoder()
        with conn:
            while data := conn.recv(1 << 16):
                dec.feed(data)
                while (frame := dec.next_frame()) is not None:
                    if frame.header["call"] == "hello":
                        conn.sendall(encode_reply(frame.header["id"], {"protocol": abi.PROTOCOL_VERSION})[0])
                    else:
                        script(conn, frame)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_reply_for_another_request_read_alone_goes_to_its_inbox(tmp_path):
    """syscall() takes a reply that is a whole read by itself in fewer steps; one for another request
    (here a submit()ted one, answered first and on its own) still reaches that request's inbox."""
    held: list[Any] = []

    def script(conn: socket.socket, frame: Any) -> None:
        held.append(frame.header["id"])
        if len(held) == 2:  # the submitted nop, then the syscall's stat: the nop's reply alone, then stat's
            conn.sendall(encode_reply(held[0], {"which": "nop"})[0])
            time.sleep(0.05)
            conn.sendall(encode_reply(held[1], {"which": "stat"})[0])

    path = str(tmp_path / "scripted.sock")
    server = _scripted_server(path, script)
    with djinn.connect(path) as k:
        rid = k.submit("nop")
        assert k.syscall("stat") == {"which": "stat"}
        assert k.result(rid) == {"which": "nop"}
    server.join(5)


def test_busy_poll_setting_from_the_environment(djinnd, monkeypatch):
    monkeypatch.setenv("DJINN_BUSY_POLL_US", "250")
    with djinn.connect(djinnd.path) as k:
        assert k._busy_poll_s == pytest.approx(250e-6)
        assert k.syscall("echo", data=7) == {"data": 7}
    with djinn.connect(djinnd.path, busy_poll_us=0) as k:  # the argument wins over the environment
        assert k._busy_poll_s == 0
    for bad in ("fast", "-5", "nan"):
        monkeypatch.setenv("DJINN_BUSY_POLL_US", bad)
        with pytest.raises(ValueError, match="BUSY_POLL_US|busy_poll_us"):
            djinn.connect(djinnd.path)


async def test_aio_client(djinnd):
    k = await djinn.aio.connect(djinnd.path)
    try:
        results = await asyncio.gather(*(k.syscall("echo", data=i) for i in range(50)))
        assert [r["data"] for r in results] == list(range(50))
        assert "sessions" in await k.stat()
    finally:
        await k.close()


def test_default_connection(djinnd, monkeypatch):
    import djinn.client as client

    monkeypatch.setenv("DJINN_SOCKET", djinnd.path)
    monkeypatch.setattr(client, "_default", None)
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(djinn.syscall("echo", data=i)["data"]))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(8))
    client.default_kernel().close()


def test_a_daemon_that_goes_away_is_a_connection_error_and_the_default_connection_reopens(monkeypatch):
    import djinn.client as client

    cfg = daemon_config(model="none")
    monkeypatch.setenv("DJINN_SOCKET", cfg.socket)
    monkeypatch.setattr(client, "_default", None)
    first = LiveDaemon(cfg).start()
    k = djinn.connect(cfg.socket)
    try:
        assert djinn.syscall("nop") == {} and k.syscall("nop") == {}
    finally:
        first.stop()
    with pytest.raises(ConnectionError, match="djinnd closed the connection"):
        djinn.syscall("nop")
    with pytest.raises(ConnectionError, match="djinnd closed the connection"):
        k.syscall("nop")
    with pytest.raises(ConnectionError, match="this connection to djinnd is closed"):
        k.syscall("nop")  # closed on this end too: a clear error, not a bad file descriptor
    second = LiveDaemon(cfg).start()  # the daemon is back on the same socket
    try:
        assert djinn.syscall("nop") == {}  # the default connection opened a new one
    finally:
        client.default_kernel().close()
        second.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the child becomes another uid (setgid/setuid), which needs root")
def test_other_uid_gets_eperm(djinnd):
    os.chmod(os.path.dirname(djinnd.path), 0o711)  # the socket is 0660: uid 12345 gets in through group 0
    with djinn.connect(djinnd.path) as k:
        sid = k.syscall("open_session", bare=True)["session"]
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.setgid(0)
                os.setuid(12345)
                with djinn.connect(djinnd.path) as other:
                    try:
                        other.syscall("close_session", session=sid)
                    except djinn.errors.EPERM:
                        code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        k.syscall("close_session", session=sid)


def test_sessions_reclaimed_after_disconnect(djinnd):
    with djinn.connect(djinnd.path) as k:
        sid = k.syscall("open_session", bare=True)["session"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with djinn.connect(djinnd.path) as k:
            if sid not in {s["id"] for s in k.stat()["sessions"]}:
                return
        time.sleep(0.02)
    pytest.fail("session was not reclaimed after its client went away (grace_s=0)")


def test_sessions_are_reclaimed_when_the_grace_period_ends():
    d = LiveDaemon(daemon_config(model="none", grace_s=1.0)).start()
    try:
        with djinn.connect(d.path) as k:
            sid = k.syscall("open_session", bare=True)["session"]
        gone_at = time.monotonic() + 1.0
        with djinn.connect(d.path) as k:
            assert sid in {s["id"] for s in k.stat()["sessions"]}  # within the grace period
            while sid in {s["id"] for s in k.stat()["sessions"]}:
                assert time.monotonic() < gone_at + 10, "the session outlived its grace period"
                time.sleep(0.05)
        assert time.monotonic() >= gone_at - 0.1, "the session was reclaimed before its grace period ended"
    finally:
        d.stop()


def test_grace_period_keeps_sessions():
    d = LiveDaemon(daemon_config(model="none", grace_s=30.0)).start()
    try:
        with djinn.connect(d.path) as k:
            sid = k.syscall("open_session", bare=True)["session"]
        time.sleep(0.2)
        with djinn.connect(d.path) as k:
            assert sid in {s["id"] for s in k.stat()["sessions"]}
            k.syscall("close_session", session=sid)
    finally:
        d.stop()


CONTROL_PROBE = r"""
import sys, time, djinn
from djinn.kernel import abi
lat = {"stat": [], "hello": []}
with djinn.connect(sys.argv[1]) as k:
    k.syscall("stat")
    print("connected", flush=True)
    sys.stdin.readline()
    t_start = time.time()
    end = time.perf_counter() + float(sys.argv[2])
    while time.perf_counter() < end:
        t0 = time.perf_counter(); k.syscall("stat"); lat["stat"].append(time.perf_counter() - t0)
        t0 = time.perf_counter(); k.syscall("hello", protocol=abi.PROTOCOL_VERSION, client="probe")
        lat["hello"].append(time.perf_counter() - t0)
    t_end = time.time()
print(len(lat["stat"]), len(lat["hello"]), max(lat["stat"] + lat["hello"]), t_start, t_end)
"""


def _probe_control(path: str, busy: Any = None) -> tuple[int, int, float]:
    """stat and hello, in turn, from a client process for 0.8 s, optionally while `busy()` runs on the worker:
    (stat calls, hello calls, the slowest call's seconds)."""
    import subprocess
    import sys

    probe = subprocess.Popen([sys.executable, "-c", CONTROL_PROBE, path, "0.8"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert probe.stdout.readline().strip() == "connected", probe.stderr.read()
    fut = None
    if busy is not None:
        fut = asyncio.run_coroutine_threadsafe(busy[0].kernel.worker.run(busy[1]), busy[0].loop)
        time.sleep(0.05)
    out, err = probe.communicate("go\n", timeout=60)
    n_stat, n_hello, slowest, t_start, t_end = out.split()
    if fut is not None:
        op_start, op_end = fut.result()
        assert op_start < float(t_start) and float(t_end) < op_end, "the probe must run while the worker is busy"
    return int(n_stat), int(n_hello), float(slowest)


def test_a_request_after_a_reply_from_the_worker_sees_all_of_its_effects(kernel):
    """forward's reply leaves from the device worker, before the loop has finished the request. A stat
    sent the moment it arrives must still count that forward and find its session at rest, as it would
    had the loop sent the reply: the held request starts after the finished one's bookkeeping. (Each
    round gives the race a chance; before the fix most rounds saw the count one short.)"""
    s = kernel.open_session(max_tokens=64)
    try:
        for _ in range(20):
            before = kernel.stat()["syscalls"].get("forward", {}).get("count", 0)
            s.forward([1, 2, 3], return_logits="last")
            st = kernel.stat()
            assert st["syscalls"]["forward"]["count"] == before + 1
            assert {x["id"]: x["state"] for x in st["sessions"]}[s.id] == "READY"
    finally:
        s.close()


def test_control_syscalls_answer_while_one_long_tensor_operation_runs_on_the_worker(djinnd):
    """A control syscall never waits for the device worker.

    The client is its own process, as clients are. The worker runs one tensor operation of
    about two and a half seconds (a single multi_dot call: one call into torch, many matrix
    products inside it) while the client calls stat and hello in turn for 0.8 s. If they
    waited for the worker, the client would get one answer in that time; it gets hundreds,
    and no call takes a large part of the operation. The latency itself is a figure for
    `python -m bench rpc` (control_syscall_while_worker_busy: p99 against 1 ms), not for a
    test on a shared machine.
    """
    def one_long_operation() -> tuple[float, float]:
        a = torch.linalg.qr(torch.randn(512, 512)).Q  # orthogonal: its products neither vanish nor overflow
        t0 = time.perf_counter()
        torch.linalg.multi_dot([a] * 9)  # 8 products
        per_product = (time.perf_counter() - t0) / 8
        factors = [a] * max(2, int(2.5 / per_product) + 1)
        start = time.time()
        torch.linalg.multi_dot(factors)
        return start, time.time()

    n_stat, n_hello, slowest = _probe_control(djinnd.path, busy=(djinnd, one_long_operation))
    assert n_stat > 50 and n_hello > 50, f"only {n_stat} stat and {n_hello} hello answers in 0.8 s of a busy worker"
    assert slowest < 0.5, f"a control call took {slowest:.3f} s: it waited for the worker's operation"


def test_stale_socket_is_replaced_and_live_one_is_not(tmp_path):
    path = str(tmp_path / "d.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nothing listens
    d = LiveDaemon(daemon_config(model="none", socket=path)).start()
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o660"
        _still_serving(d)
        second = LiveDaemon(daemon_config(model="none", socket=path))
        with pytest.raises(RuntimeError, match="exit 1"):  # refused: a live daemon holds the socket
            second.start()
        _still_serving(d)
    finally:
        d.stop()
    assert not os.path.exists(path), "the socket is removed on shutdown"


def test_a_socket_directory_that_others_control_is_refused(tmp_path):
    """By the daemon, before it binds (and by a client, before it connects to the default in /tmp:
    test_a_client_refuses_a_shared_tmp_directory_of_another_user)."""
    from djinn.kernel.server import bind_unix_socket

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # anyone may write here, and no sticky bit: anyone may replace the socket
    with pytest.raises(PermissionError, match="writable by anyone"):
        bind_unix_socket(str(open_dir / "d.sock"))
    assert not (open_dir / "d.sock").exists()
    open_dir.chmod(0o1777)  # as /tmp: only the owner of a file may remove it
    bind_unix_socket(str(open_dir / "d.sock")).close()
    if os.geteuid() == 0:  # only root can give a directory to another user
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 12345, 12345)
        with pytest.raises(PermissionError, match="belongs to uid 12345"):
            bind_unix_socket(str(theirs / "d.sock"))
        link = tmp_path / "link"
        link.symlink_to(theirs)
        with pytest.raises(PermissionError, match="belongs to uid 12345"):
            bind_unix_socket(str(link / "d.sock"))


def test_a_client_refuses_a_shared_tmp_directory_of_another_user(tmp_path, monkeypatch):
    from djinn.kernel import config

    theirs = tmp_path / "djinn-me"
    theirs.mkdir()
    monkeypatch.delenv("DJINN_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(config, "shared_tmp_socket_path", lambda: str(theirs / "djinnd.sock"))
    real_uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: 4242)  # this user, for whom the default is in /tmp
    if real_uid == 0:
        os.chown(theirs, 12345, 12345)  # and another user made the directory first
    with pytest.raises(PermissionError, match="belongs to uid"):
        djinn.connect()
    with pytest.raises(PermissionError, match="belongs to uid"):
        asyncio.run(djinn.aio.connect())
    theirs.chmod(0o777)  # a directory of this user (or root) that anyone may write to is refused too
    if real_uid == 0:
        os.chown(theirs, 0, 0)
    else:
        monkeypatch.setattr(os, "geteuid", lambda: real_uid)
    with pytest.raises(PermissionError, match="writable by anyone"):
        djinn.connect()


def test_tcp_requires_the_token():
    port = _free_port()
    d = LiveDaemon(daemon_config(model="none", tcp=f"127.0.0.1:{port}", tcp_token="sesame")).start()
    try:
        with pytest.raises(djinn.errors.EACCES):
            djinn.connect(tcp=f"127.0.0.1:{port}", token="wrong")
        with djinn.connect(tcp=f"127.0.0.1:{port}", token="sesame") as k:
            assert k.server["uid"] == d.config.tcp_token_uid
            assert k.syscall("nop") == {}
    finally:
        d.stop()


@pytest.mark.parametrize("spec,expected", [
    (":7000", ("127.0.0.1", 7000)),
    ("127.0.0.1:7000", ("127.0.0.1", 7000)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("gpu-box.lan:7000", ("gpu-box.lan", 7000)),
    ("[::1]:7000", ("::1", 7000)),
])
def test_parse_tcp(spec, expected):
    from djinn.kernel.server import parse_tcp

    assert parse_tcp(spec) == expected


@pytest.mark.parametrize("spec", ["7000", "localhost", "localhost:", "localhost:http", ":-1"])
def test_parse_tcp_rejects(spec):
    from djinn.kernel.server import parse_tcp

    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_tcp(spec)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



class _Transport:
    """Records each write; enough of an asyncio transport for Connection."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, parts: list[Any]) -> None:
        self.writes.append(b"".join(bytes(p) for p in parts))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> None:
        return None


def _connection() -> tuple[Any, _Transport]:
    from djinn.kernel.server import Connection

    conn = Connection(ConnectionKernel(), "unix")  # type: ignore[arg-type]
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.authed, conn.uid = True, os.getuid()
    return conn, transport


def _feed(conn: Any, data: bytes) -> None:
    buf = conn.get_buffer(len(data))
    buf[: len(data)] = data
    conn.buffer_updated(len(data))


def test_one_request_per_read_is_answered_at_once_and_several_in_one_write():
    conn, transport = _connection()
    _feed(conn, encode_message({"id": 1, "call": "nop", "args": {}})[0])
    assert transport.writes == [encode_frame({"id": 1, "ok": True, "result": {}})[0]]
    transport.writes.clear()
    batch = [encode_message({"id": i, "call": "echo", "args": {"data": i}})[0] for i in (2, 3, 4)]
    _feed(conn, b"".join(batch) + encode_message({"id": 5, "call": "nope", "args": {}})[0])
    assert len(transport.writes) == 1, "replies to the requests of one read leave in one write"
    dec = Decoder()
    dec.feed(transport.writes[0])
    replies = [dec.next_frame().header for _ in range(4)]
    assert [r["result"]["data"] for r in replies[:3]] == [2, 3, 4]
    assert replies[3]["id"] == 5 and replies[3]["error"]["errno"] == "ENOSYS"
    assert conn.kernel.stats.snapshot()["nop"]["count"] == 1


def test_a_reply_encoded_on_the_worker_is_written_as_it_is():

    conn, transport = _connection()
    result = {"position": 3, "logits": torch.arange(6, dtype=torch.float32).reshape(1, 6)}
    parts = encode_reply(9, result)
    conn.reply(9, EncodedReply(9, parts))
    sent = b"".join(bytes(p) for p in transport.writes)
    assert sent == b"".join(bytes(p) for p in parts)
    dec = Decoder()
    dec.feed(sent)
    frame = dec.next_frame()
    got = unpack(frame.header["result"], frame)
    assert frame.header["id"] == 9 and got["position"] == 3 and torch.equal(got["logits"], result["logits"])


def test_a_reply_encoded_for_another_request_is_an_eio_not_a_wrong_answer():

    conn, transport = _connection()
    conn.reply(10, EncodedReply(9, encode_reply(9, {"position": 1})))
    dec = Decoder()
    dec.feed(b"".join(bytes(p) for p in transport.writes))
    header = dec.next_frame().header
    assert header["id"] == 10 and header["ok"] is False and header["error"]["errno"] == "EIO"
