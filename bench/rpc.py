"""python -m bench rpc: the syscall path against raw-socket floors measured in the same run.

Figures (issue: the foundation):
- null round trip: djinnd `nop` p50/p99 against a bare uvloop length-prefixed echo
  (target: p50 <= 2x the echo); pipelined syscalls/s from one client (target >= 20,000);
- a 16 MiB tensor echoed through djinnd against a raw Unix-socket `recv_into` echo
  (target: >= 0.7x the floor's bandwidth).
Every server runs in its own process, like djinnd does, so the client and server
share the machine's cores the same way in each measurement.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import tempfile
import time
from typing import Any

from bench.common import Recorder, daemon, percentile, progress, spawn_server, stop_server

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


def _echo_round_trips(path: str, n: int) -> list[float]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    msg = struct.pack("<I", 16) + b"x" * 16
    buf = bytearray(64)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(msg)
        got = 0
        while got < len(msg):
            got += s.recv_into(memoryview(buf)[got:])
        out.append(time.perf_counter() - t0)
    s.close()
    return out


def _bulk_round_trips(path: str, nbytes: int, n: int) -> list[float]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    data = bytearray(os.urandom(1 << 16)) * (nbytes >> 16)
    back = bytearray(nbytes)
    view = memoryview(back)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(data)
        got = 0
        while got < nbytes:
            got += s.recv_into(view[got:])
        out.append(time.perf_counter() - t0)
    s.close()
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=20000, help="round trips per latency measurement")
    p.add_argument("--pipeline", type=int, default=256, help="requests in flight in the pipelined measurement")
    p.add_argument("--tensor-mib", type=int, default=16, help="size of the echoed tensor")
    p.add_argument("--tensor-trials", type=int, default=30)


def run(args: argparse.Namespace) -> int:
    import torch

    import djinn

    n = 2000 if args.quick else args.n
    trials = 5 if args.quick else args.tensor_trials
    rec = Recorder("rpc", args.output_dir, quick=args.quick)
    tmp = tempfile.mkdtemp(prefix="djinn-bench-")
    nbytes = args.tensor_mib << 20
    rows: list[tuple[str, float, float, str]] = []

    echo_path = os.path.join(tmp, "echo.sock")
    proc = spawn_server([sys.executable, "-c", ECHO_SERVER, echo_path], echo_path)
    try:
        _echo_round_trips(echo_path, 200)
        echo = _echo_round_trips(echo_path, n)
    finally:
        stop_server(proc)

    bulk_path = os.path.join(tmp, "bulk.sock")
    proc = spawn_server([sys.executable, "-c", BULK_SERVER, bulk_path, str(nbytes)], bulk_path)
    try:
        bulk = _bulk_round_trips(bulk_path, nbytes, trials + 2)[2:]
    finally:
        stop_server(proc)

    with daemon("--model", "none", "--vmu-data", "64MiB", "--vmu-host", "64MiB", "--vmu-text", "64MiB",
                "--vmu-stack", "64MiB") as djinn_path:
        with djinn.connect(djinn_path) as k:
            for _ in range(200):
                k.syscall("nop")
            null = []
            for _ in progress(range(n), "null syscalls"):
                t0 = time.perf_counter()
                k.syscall("nop")
                null.append(time.perf_counter() - t0)
            batches = max(4, n // args.pipeline)
            t0 = time.perf_counter()
            for _ in range(batches):
                k.batch([("nop", {})] * args.pipeline)
            pipelined_per_s = batches * args.pipeline / (time.perf_counter() - t0)
            tensor = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
            for _ in range(2):
                k.syscall("echo", data=tensor)
            tensor_rt = []
            for _ in progress(range(trials), "16 MiB echoes"):
                t0 = time.perf_counter()
                back = k.syscall("echo", data=tensor)["data"]
                tensor_rt.append(time.perf_counter() - t0)
            assert torch.equal(back, tensor), "the echoed tensor differs"

    echo_p50, null_p50 = percentile(echo, 50), percentile(null, 50)
    floor_bw = 2 * nbytes / percentile(bulk, 50)
    djinn_bw = 2 * nbytes / percentile(tensor_rt, 50)
    results: list[dict[str, Any]] = [
        rec.record(metric="null_round_trip", unit="us", djinn_p50=null_p50 * 1e6,
                   djinn_p99=percentile(null, 99) * 1e6, baseline="uvloop length-prefixed echo",
                   baseline_p50=echo_p50 * 1e6, baseline_p99=percentile(echo, 99) * 1e6,
                   ratio_p50=null_p50 / echo_p50, target="ratio_p50 <= 2", n=n),
        rec.record(metric="pipelined_syscalls_per_s", unit="1/s", djinn=pipelined_per_s, in_flight=args.pipeline,
                   target=">= 20000"),
        rec.record(metric="tensor_echo_bandwidth", unit="GB/s", nbytes=nbytes, djinn=djinn_bw / 1e9,
                   baseline="raw unix socket recv_into echo", baseline_value=floor_bw / 1e9,
                   ratio=djinn_bw / floor_bw, target="ratio >= 0.7", trials=trials),
    ]
    rows = [
        ("null syscall p50 (us)", null_p50 * 1e6, echo_p50 * 1e6, f"{null_p50 / echo_p50:.2f}x"),
        ("pipelined syscalls/s", pipelined_per_s, float("nan"), "target >= 20000"),
        (f"{args.tensor_mib} MiB echo (GB/s)", djinn_bw / 1e9, floor_bw / 1e9, f"{djinn_bw / floor_bw:.2f}x"),
    ]
    print(f"\n{'metric':28} {'djinn':>12} {'baseline':>12} {'ratio':>16}")
    for name, a, b, r in rows:
        print(f"{name:28} {a:12.2f} {b:12.2f} {r:>16}")
    print(f"results: {rec.path} ({len(results)} records)")
    return 0
