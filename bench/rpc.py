"""python -m bench rpc: the syscall path against raw-socket floors measured in the same run.

Figures (issue: the foundation):
- null round trip: djinnd `nop` p50/p99 against a bare uvloop length-prefixed echo
  (target: p50 <= 2x the echo); pipelined syscalls/s from one client (target >= 20,000);
- a 16 MiB tensor echoed through djinnd against a raw Unix-socket `recv_into` echo
  (target: >= 0.7x the floor's bandwidth);
- control syscalls while the device worker is busy: `stat`, `hello` and `nop` round trips from one
  client while another client process keeps the worker running forwards back to back (a model
  daemon: dummy:gpt2 on CUDA, demo on the CPU; each forward follows one token, so that no prefill plan
  replays it and it runs eagerly), against the same calls with the worker idle, in alternating phases
  (target: p99 <= 1 ms while busy). The worker's busy fraction over the busy
  phases, from `stat`, says how busy it was.
The null round trip is measured three ways: as the scheduler places the processes
(the target's figure), all on one core (software cost alone), and with the client on
one core and both servers on another (every wake-up crosses cores). On a small VM
the scheduler may keep one server on the client's core and the other on the second
core, and a cross-core wake-up there costs tens of microseconds, so the two pinned
figures say what the unpinned ratio is made of. The pinned ones use the fastest CPUs
by one probe (bench/cpus.py; the CPUs of a VM need not be equally fast): one core is
the fastest, and across cores puts both servers on the fastest and the client on the
second, so the echo server and djinnd always run on the same CPU.
Every server runs in its own process, like djinnd does, so the client and server
share the machine's cores the same way in each measurement. All servers run at
once and the measurements alternate between a baseline and djinn (blocks of round
trips, single tensor trials): on a shared 2-core machine the cost of a wake-up
changes from minute to minute, and a ratio means something only if both of its
sides saw the same minutes. The null round trip runs against `--instances` echo
servers and as many djinnds, a pair per block in turn, its samples pooled: a
process keeps the CPU the scheduler gave it and the memory layout it happened to
get for its whole life, and either moves one process's round trip by tens of
percent (a baseline server's as much as djinnd's), so one process of each would
make the ratio a draw.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from typing import Any, Callable, Iterator

from bench.common import Recorder, daemon, percentile, progress, spawn_server, stop_server
from bench.cpus import rank_cpus

ECHO_SERVER = r"""
import asyncio, struct, sys, uvloop
class Echo(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = bytearray()
    def data_received(self, data):
        self.buf += data
        while len(self.buf) >= 4:
            n = struct.unpack_from("<I", self.buf)[0]
            if len(self.buf) < 4 + n: return
            self.t.write(bytes(self.buf[:4 + n])); del self.buf[:4 + n]
async def main(path):
    srv = await asyncio.get_running_loop().create_unix_server(Echo, path)
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main(sys.argv[1]))
"""

BULK_SERVER = r"""
import socket, sys
path, nbytes = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_UNIX); srv.bind(path); srv.listen(1)
buf = bytearray(nbytes); view = memoryview(buf)
while True:
    conn, _ = srv.accept()
    while True:
        got = 0
        while got < nbytes:
            n = conn.recv_into(view[got:])
            if not n: break
            got += n
        if got < nbytes: break
        conn.sendall(view)
    conn.close()
"""


LOAD_CLIENT = r"""
import sys, time, torch, djinn
path, seconds, tokens = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
ids = torch.randint(0, 250, (tokens,))
def load(k):
    # One token first, so that the forward of `tokens` starts past position 0: no prefill plan replays
    # it, and it runs eagerly on the worker, launch by launch, as a session's later turns do.
    with k.open_session(max_tokens=tokens + 1) as s:
        s.forward(ids[:1], return_logits="none")
        s.forward(ids, return_logits="last")
with djinn.connect(path) as k:
    load(k)  # warm: the plans are made before the timed phase
    print("ready", flush=True)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        load(k)
"""


class _EchoClient:
    """A blocking client of ECHO_SERVER: one 16-byte length-prefixed message per round trip."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.msg = struct.pack("<I", 16) + b"x" * 16
        self.view = memoryview(bytearray(64))

    def round_trip(self) -> float:
        t0 = time.perf_counter()
        self.sock.sendall(self.msg)
        got = 0
        while got < len(self.msg):
            got += self.sock.recv_into(self.view[got:])
        return time.perf_counter() - t0


class _BulkClient:
    """A blocking client of BULK_SERVER: `nbytes` out, the same `nbytes` back into a preallocated buffer."""

    def __init__(self, path: str, nbytes: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.nbytes = nbytes
        self.data = bytearray(os.urandom(1 << 16)) * (nbytes >> 16)
        self.view = memoryview(bytearray(nbytes))

    def round_trip(self) -> float:
        t0 = time.perf_counter()
        self.sock.sendall(self.data)
        got = 0
        while got < self.nbytes:
            got += self.sock.recv_into(self.view[got:])
        return time.perf_counter() - t0


def _server_pid(path: str) -> int:
    """The pid of the process listening on the Unix socket `path` (its peer credentials)."""
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(path)
        pid, _uid, _gid = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid


@contextlib.contextmanager
def _pinned(pids: list[int], cpus: set[int]) -> Iterator[None]:
    """Run every thread of `pids` (a pid may be a thread id) on `cpus` only; restore their masks after."""
    saved: dict[int, set[int]] = {}
    try:
        for pid in pids:
            tids = os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else [pid]
            for tid in map(int, tids):
                saved[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, cpus)
        yield
    finally:
        for tid, mask in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)


def _timed(call: Callable[[], Any]) -> Callable[[], float]:
    def round_trip() -> float:
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0

    return round_trip


def _interleave(pairs: list[tuple[Callable[[], float], Callable[[], float]]], n: int, block: int, label: str
                ) -> tuple[list[float], list[float]]:
    """n round trips of each side, in alternating blocks of `block`; which side goes first alternates
    too. Block i uses pairs[i % len(pairs)]: a baseline server and a djinnd of their own, so that
    every pair of servers is measured in the same minutes, and the samples of all pairs are pooled."""
    out_a: list[float] = []
    out_b: list[float] = []
    blocks = -(-n // block)
    for i in progress(range(blocks), label):
        size = min(block, n - i * block)
        a, b = pairs[i % len(pairs)]
        order = ((a, out_a), (b, out_b)) if i // len(pairs) % 2 == 0 else ((b, out_b), (a, out_a))
        for fn, out in order:
            out.extend(fn() for _ in range(size))
    return out_a, out_b


def _control_phase(k: Any, seconds: float, out: dict[str, list[float]]) -> None:
    """Round trips of each control syscall, in turn, for `seconds`."""
    from djinn.kernel import abi

    calls = {"stat": lambda: k.syscall("stat"), "nop": lambda: k.syscall("nop"),
             "hello": lambda: k.syscall("hello", protocol=abi.PROTOCOL_VERSION, client="bench-rpc")}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            out[name].append(time.perf_counter() - t0)


def _control_under_load(rounds: int, seconds: float) -> dict[str, Any]:
    """Control syscalls with the device worker idle and busy, alternating phases (see the module notes)."""
    import torch

    import djinn

    cuda = torch.cuda.is_available()
    model, tokens = ("dummy:gpt2", 512) if cuda else ("demo", 256)
    idle: dict[str, list[float]] = {"stat": [], "nop": [], "hello": []}
    busy: dict[str, list[float]] = {"stat": [], "nop": [], "hello": []}
    busy_s = wall_s = 0.0
    with daemon("--model", model, "--max-tokens", str(tokens), "--vmu-data", "1GiB", "--vmu-host", "256MiB",
                "--vmu-text", "1GiB", "--vmu-stack", "1GiB") as path, djinn.connect(path) as k:
        _control_phase(k, 0.2, {n: [] for n in idle})  # warm-up, not kept
        for _ in progress(range(rounds), "control syscalls, worker idle and busy"):
            _control_phase(k, seconds, idle)
            load = subprocess.Popen([sys.executable, "-c", LOAD_CLIENT, path, str(seconds + 1.0), str(tokens)],
                                    stdout=subprocess.PIPE, text=True)
            try:
                assert load.stdout is not None and load.stdout.readline().strip() == "ready", "the load client failed"
                w0, t0 = k.syscall("stat")["worker"]["busy_s"], time.perf_counter()
                _control_phase(k, seconds, busy)
                busy_s += k.syscall("stat")["worker"]["busy_s"] - w0
                wall_s += time.perf_counter() - t0
            finally:
                load.wait(60)
    return {"model": model, "tokens": tokens, "idle": idle, "busy": busy,
            "worker_busy_frac": busy_s / wall_s if wall_s else None}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=20000, help="round trips per latency measurement")
    p.add_argument("--pipeline", type=int, default=256, help="requests in flight in the pipelined measurement")
    p.add_argument("--tensor-mib", type=int, default=16, help="size of the echoed tensor")
    p.add_argument("--tensor-trials", type=int, default=30)
    p.add_argument("--block", type=int, default=500, help="round trips per block when alternating echo and nop")
    p.add_argument("--instances", type=int, default=3, choices=range(1, 17), metavar="1..16",
                   help="echo servers and djinnds for the null round trip, one pair per block in turn")
    p.add_argument("--control-rounds", type=int, default=4,
                   help="idle/busy phase pairs of the control-syscall measurement (0: skip it)")
    p.add_argument("--control-s", type=float, default=2.0, help="seconds per control-syscall phase")


def run(args: argparse.Namespace) -> int:
    import torch

    import djinn
    from djinn.kernel.codec import SEND_BUFFER_NBYTES

    n = 2000 if args.quick else args.n
    trials = 5 if args.quick else args.tensor_trials
    rec = Recorder("rpc", args.output_dir, quick=args.quick)
    tmp = tempfile.mkdtemp(prefix="djinn-bench-")
    nbytes = args.tensor_mib << 20
    bulk_path = os.path.join(tmp, "bulk.sock")

    with contextlib.ExitStack() as stack:
        # Several echo servers and djinnds, one pair per block in turn (see _interleave): where the
        # scheduler places a process, and how its memory happens to be laid out, stay with it for its
        # life and move its round trip by tens of percent, for a baseline server as for djinnd.
        servers: list[int] = []
        null_pairs: list[tuple[Callable[[], float], Callable[[], float]]] = []
        for i in range(args.instances):
            echo_path = os.path.join(tmp, f"echo{i}.sock")
            echo_server = spawn_server([sys.executable, "-c", ECHO_SERVER, echo_path], echo_path)
            stack.callback(stop_server, echo_server)
            djinn_path = stack.enter_context(daemon("--model", "none", "--vmu-data", "64MiB", "--vmu-host", "64MiB",
                                                    "--vmu-text", "64MiB", "--vmu-stack", "64MiB"))
            k = stack.enter_context(djinn.connect(djinn_path))
            echo_client = _EchoClient(echo_path)
            for _ in range(200):
                echo_client.round_trip()
                k.syscall("nop")
            null_pairs.append((echo_client.round_trip, _timed(partial(k.syscall, "nop"))))
            servers += [echo_server.pid, _server_pid(djinn_path)]
        stack.callback(stop_server, spawn_server([sys.executable, "-c", BULK_SERVER, bulk_path, str(nbytes)], bulk_path))
        echo, null = _interleave(null_pairs, n, args.block, "null syscalls and echoes")
        # The same on one core: the scheduler puts each server on the client's core or
        # on the other one, sticks to its choice, and a wake-up across cores of this VM
        # costs tens of microseconds. On one core both pay the same, only for their work.
        ranked = rank_cpus()
        cpus = [cpu for cpu, _ in ranked]
        rec.record(metric="config", n=n, block=args.block, instances=args.instances, pipeline=args.pipeline,
                   tensor_mib=args.tensor_mib,
                   cpus_fastest=cpus[0], cpus_second=cpus[1] if len(cpus) > 1 else None,
                   cpu_probe_us={str(c): round(t * 1e6, 1) for c, t in sorted(ranked)})
        with _pinned([threading.get_native_id(), *servers], {cpus[0]}):
            echo_1, null_1 = _interleave(null_pairs, max(n // 4, 1000), args.block, "the same on one core")
        # And with every wake-up crossing cores: the client on one core, both servers on
        # another, so that each side pays the same wake-ups instead of the scheduler's choice.
        echo_x: list[float] = []
        null_x: list[float] = []
        if len(cpus) > 1:
            with _pinned([threading.get_native_id()], {cpus[0]}), _pinned(servers, {cpus[1]}):
                echo_x, null_x = _interleave(null_pairs, max(n // 4, 1000), args.block, "the same across two cores")

        batches = max(4, n // args.pipeline)
        t0 = time.perf_counter()
        for _ in range(batches):
            k.batch([("nop", {})] * args.pipeline)
        pipelined_per_s = batches * args.pipeline / (time.perf_counter() - t0)

        bulk_client = _BulkClient(bulk_path, nbytes)
        tensor = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        replies: list[Any] = []

        def tensor_echo() -> None:
            replies[:] = [k.syscall("echo", data=tensor)["data"]]  # the last reply lives until the next arrives

        for _ in range(2):
            bulk_client.round_trip()
            tensor_echo()
        bulk, tensor_rt = _interleave([(bulk_client.round_trip, _timed(tensor_echo))], trials, 1,
                                      f"{args.tensor_mib} MiB echoes")
        assert torch.equal(replies[0], tensor), "the echoed tensor differs"

    control = (_control_under_load(2 if args.quick else args.control_rounds, 0.5 if args.quick else args.control_s)
               if args.control_rounds > 0 else None)

    echo_p50, null_p50 = percentile(echo, 50), percentile(null, 50)
    echo1_p50, null1_p50 = percentile(echo_1, 50), percentile(null_1, 50)
    floor_bw = 2 * nbytes / percentile(bulk, 50)
    djinn_bw = 2 * nbytes / percentile(tensor_rt, 50)
    results: list[dict[str, Any]] = [
        rec.record(metric="null_round_trip", unit="us", djinn_p50=null_p50 * 1e6,
                   djinn_p99=percentile(null, 99) * 1e6, baseline="uvloop length-prefixed echo",
                   baseline_p50=echo_p50 * 1e6, baseline_p99=percentile(echo, 99) * 1e6,
                   ratio_p50=null_p50 / echo_p50, target="ratio_p50 <= 2", n=n, interleaved_block=args.block),
        rec.record(metric="null_round_trip_one_core", unit="us", djinn_p50=null1_p50 * 1e6,
                   djinn_p99=percentile(null_1, 99) * 1e6, baseline="uvloop length-prefixed echo",
                   baseline_p50=echo1_p50 * 1e6, baseline_p99=percentile(echo_1, 99) * 1e6,
                   ratio_p50=null1_p50 / echo1_p50, n=len(null_1), interleaved_block=args.block,
                   note="client, echo server and djinnd pinned to one core: software cost without cross-core wake-ups"),
        *([rec.record(metric="null_round_trip_across_cores", unit="us", djinn_p50=percentile(null_x, 50) * 1e6,
                      djinn_p99=percentile(null_x, 99) * 1e6, baseline="uvloop length-prefixed echo",
                      baseline_p50=percentile(echo_x, 50) * 1e6, baseline_p99=percentile(echo_x, 99) * 1e6,
                      ratio_p50=percentile(null_x, 50) / percentile(echo_x, 50), n=len(null_x),
                      interleaved_block=args.block,
                      note="client on one core, echo server and djinnd on another: every wake-up crosses cores")]
          if null_x else []),
        rec.record(metric="pipelined_syscalls_per_s", unit="1/s", djinn=pipelined_per_s, in_flight=args.pipeline,
                   target=">= 20000"),
        rec.record(metric="tensor_echo_bandwidth", unit="GB/s", nbytes=nbytes, djinn=djinn_bw / 1e9,
                   baseline="raw unix socket recv_into echo", baseline_value=floor_bw / 1e9,
                   ratio=djinn_bw / floor_bw, target="ratio >= 0.7", trials=trials, interleaved_block=1,
                   djinn_so_sndbuf_nbytes=SEND_BUFFER_NBYTES),
    ]
    control_rows = []
    if control is not None:
        for name in ("stat", "hello", "nop"):
            b, i = control["busy"][name], control["idle"][name]
            results.append(rec.record(
                metric="control_syscall_while_worker_busy", syscall=name, unit="us", model=control["model"],
                tokens=control["tokens"], djinn_p50=percentile(b, 50) * 1e6, djinn_p99=percentile(b, 99) * 1e6,
                baseline="the same call with the worker idle", baseline_p50=percentile(i, 50) * 1e6,
                baseline_p99=percentile(i, 99) * 1e6, ratio_p99=percentile(b, 99) / percentile(i, 99),
                n=len(b), worker_busy_frac=control["worker_busy_frac"], target="djinn_p99 <= 1000 us"))
            control_rows.append((f"{name} p99 (us), worker busy", percentile(b, 99) * 1e6, percentile(i, 99) * 1e6,
                                 "target <= 1000"))
    rows = [
        ("null syscall p50 (us)", null_p50 * 1e6, echo_p50 * 1e6, f"{null_p50 / echo_p50:.2f}x"),
        ("  the same on one core", null1_p50 * 1e6, echo1_p50 * 1e6, f"{null1_p50 / echo1_p50:.2f}x"),
        *([("  the same across two cores", percentile(null_x, 50) * 1e6, percentile(echo_x, 50) * 1e6,
            f"{percentile(null_x, 50) / percentile(echo_x, 50):.2f}x")] if null_x else []),
        ("pipelined syscalls/s", pipelined_per_s, float("nan"), "target >= 20000"),
        (f"{args.tensor_mib} MiB echo (GB/s)", djinn_bw / 1e9, floor_bw / 1e9, f"{djinn_bw / floor_bw:.2f}x"),
        *control_rows,
    ]
    print(f"\n{'metric':28} {'djinn':>12} {'baseline':>12} {'ratio':>16}")
    for name, a, b, r in rows:
        print(f"{name:28} {a:12.2f} {b:12.2f} {r:>16}")
    if control is not None and control["worker_busy_frac"] is not None:
        print(f"control syscalls: the worker was busy {100 * control['worker_busy_frac']:.0f}% of the busy phases "
              f"({control['model']}, eager {control['tokens']}-token forwards back to back); baseline: worker idle")
    print(f"results: {rec.path} ({len(results)} records)")
    return 0
