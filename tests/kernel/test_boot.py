"""djinnd as a process: --help, READY=1 to systemd, clean shutdown on SIGTERM and SIGINT.

The shutdown-timeout tests run the real `serve()` in a thread (tests/daemon.py), so
that they can hold the device worker for as long as they need.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest

import djinn
from tests.daemon import LiveDaemon, daemon_config
from tests.fakes import requires_affinity


def _start(tmp_path, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    path = str(tmp_path / "djinnd.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "djinn.kernel.boot", "--socket", path, "--model", "none", "--vmu-data", "32MiB",
         "--vmu-host", "32MiB", "--vmu-text", "32MiB", "--vmu-stack", "32MiB", *extra],
        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "djinnd did not start"
        time.sleep(0.05)
    return proc, path


def test_help_lists_settings():
    out = subprocess.run([sys.executable, "-m", "djinn.kernel.boot", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for flag in ("--socket", "--model", "--policy", "--grace-s", "--vmu-session-arena-mb", "--tcp-token"):
        assert flag in out.stdout


def test_bad_setting_exits_with_a_message():
    out = subprocess.run([sys.executable, "-m", "djinn.kernel.boot", "--policy", "maybe"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "policy" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_cleanly(tmp_path, sig):
    proc, path = _start(tmp_path)
    with djinn.connect(path) as k:
        k.syscall("open_session", bare=True)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert not os.path.exists(path), "the socket is removed"


def test_ready_is_sent_to_notify_socket(tmp_path):
    notify = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify)
    listener.settimeout(120)
    proc, path = _start(tmp_path, env={"NOTIFY_SOCKET": notify})
    try:
        assert b"READY=1" in listener.recv(4096)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        listener.close()


def _hold_the_worker(d: LiveDaemon, release: threading.Event) -> None:
    """Keep the daemon's device worker busy until `release` is set; returns once the job runs."""
    started = threading.Event()

    def hold() -> None:
        started.set()
        release.wait(60)

    asyncio.run_coroutine_threadsafe(d.kernel.worker.run(hold), d.loop)
    assert started.wait(10), "the worker did not start the holding job"


def _submit_device_request(k: djinn.Kernel) -> int:
    """Send open_session (its arena is allocated on the worker); returns once the daemon has started it."""
    rid = k.submit("open_session", arena_nbytes=4096)
    assert k.syscall("nop") == {}  # requests are checked in arrival order: open_session is in flight now
    return rid


@contextlib.contextmanager
def _shutdown_with_work_in_flight(tmp_path, timeout_s: float) -> Iterator[tuple[djinn.Kernel, int, threading.Event]]:
    """A live daemon with a device request (its id) in flight behind a held worker, and shutdown begun;
    yields (client, request id, the event that releases the worker). Afterwards the daemon must have
    exited cleanly and removed its socket."""
    d = LiveDaemon(daemon_config(model="none", socket=str(tmp_path / "d.sock"), shutdown_timeout_s=timeout_s)).start()
    release = threading.Event()
    try:
        with djinn.connect(d.path) as k:
            _hold_the_worker(d, release)
            rid = _submit_device_request(k)
            d.loop.call_soon_threadsafe(d.kernel.stop)
            deadline = time.monotonic() + 10
            while not d.kernel.shutting_down:
                assert time.monotonic() < deadline, "shutdown did not begin"
                time.sleep(0.01)
            yield k, rid, release
    finally:
        release.set()
        d.stop()
    assert d.exit_code == 0 and d.error is None
    assert not os.path.exists(d.path), "the socket is removed"


def test_inflight_device_work_that_ends_within_the_shutdown_timeout_gets_its_reply(tmp_path):
    with _shutdown_with_work_in_flight(tmp_path, 30.0) as (k, rid, release):
        with pytest.raises(djinn.errors.ESHUTDOWN):
            k.syscall("nop")  # new work is refused meanwhile
        release.set()
        assert k.result(rid)["session"].startswith("s")


def test_inflight_device_work_held_past_the_shutdown_timeout_fails_with_eshutdown(tmp_path):
    with _shutdown_with_work_in_flight(tmp_path, 0.3) as (k, rid, _release):
        t0 = time.monotonic()
        with pytest.raises(djinn.errors.ESHUTDOWN, match="shutdown timeout"):
            k.result(rid)
        assert time.monotonic() - t0 < 10


def test_boot_objects_are_frozen_out_of_the_cyclic_gc(tmp_path):
    """djinnd's own process freezes what it made while booting (torch, transformers, the kernel), so a full
    collection on the loop scans only what came after; and it still serves afterwards."""
    proc, path = _start(tmp_path, "--log-level", "debug")
    with djinn.connect(path) as k:
        k.syscall("nop")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    log = proc.stderr.read()
    frozen = [line for line in log.splitlines() if "boot objects out of the cyclic GC" in line]
    assert len(frozen) == 1, log[-2000:]
    assert int(frozen[0].split("froze ")[1].split()[0]) > 10_000  # torch alone is far more than this


@requires_affinity
def test_worker_and_loop_run_on_the_cpus_they_are_given_and_stat_says_which():
    cpu = max(os.sched_getaffinity(0))
    d = LiveDaemon(daemon_config(worker_cpus=(cpu,), loop_cpus=(cpu,))).start()
    try:
        with djinn.connect(d.path) as k:
            assert k.stat()["cpus"] == {"loop": [cpu], "worker": [cpu], "torch_threads": 1}
            s = k.open_session(max_tokens=16)
            assert s.forward([1, 2, 3]).logits is not None  # the model runs on the pinned worker
    finally:
        d.stop()


@requires_affinity
def test_a_cpu_djinnd_may_not_use_exits_with_a_message(tmp_path):
    out = subprocess.run([sys.executable, "-m", "djinn.kernel.boot", "--socket", str(tmp_path / "s.sock"),
                          "--model", "none", "--worker-cpus", "4096"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "djinnd: setting worker_cpus: CPU(s) 4096 are not available" in out.stderr


@requires_affinity
def test_torch_threads_default_to_the_cpus_the_worker_may_use():
    import threading

    from djinn.kernel.memory import default_cpu_threads

    mine = sorted(os.sched_getaffinity(0))
    assert default_cpu_threads(worker_pinned=False) == max(1, len(mine) - 1)  # the loop keeps one
    seen: list[int] = []

    def pinned_worker() -> None:  # as the worker calls it: on its own thread, pinned to one CPU
        os.sched_setaffinity(0, {mine[-1]})
        seen.append(default_cpu_threads(worker_pinned=True))

    t = threading.Thread(target=pinned_worker)
    t.start()
    t.join()
    assert seen == [1]
