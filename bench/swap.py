"""python -m bench swap: page-out/page-in bandwidth against a plain copy baseline; interference.

Figures:
- bandwidth: for arenas of 1 MiB to 1 GiB, page_out and page_in (call to copy done,
  wall clock) against the same bytes moved by a plain `tensor.copy_` between the host
  pool's kind of memory and the device, measured in the same run (CUDA: pinned host
  memory, synchronised; CPU: a memcpy). Target: >= 0.85 of the baseline's bandwidth.
  The copy's own duration (CUDA events / the CPU copy thread) is recorded as well.
- pipelined bandwidth: for the small sizes (<= --pipelined-max-mib), what paging many sessions at once gets
  (a policy paging out idle sessions): page_out of --pipelined arenas issued back to back, then every job
  waited for (and page_in likewise), against the same number of plain copies issued back to back and one
  synchronize. A single small page-out is bound by its fixed cost per call; this is the bandwidth the
  copy engine sees when calls overlap their copies. Reported beside the single-op figure, not instead of it.
- interference: session B runs a step of matmuls on the compute stream, each step
  synchronised like a decode step; B alone, then B while session A's arena is paged
  out and in back to back on the copy streams. Target: B slows down by <= 10%.
  On CPU the "copy engine" is a thread sharing the cores and memory bus with B, so
  the figure there says little about a GPU; it is reported as measured.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from bench.common import Recorder, progress
from djinn.drivers.vmu import VMU

MiB = 1 << 20


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes-mib", default="1,4,16,64,256,1024", help="arena used sizes in MiB, comma-separated")
    p.add_argument("--repeats", type=int, default=10, help="timed repetitions per size (the median is reported)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--pipelined", type=int, default=16, help="arenas paged back to back in the pipelined rows")
    p.add_argument("--pipelined-max-mib", type=int, default=16, help="largest size with a pipelined row")
    p.add_argument("--interference-mib", type=int, default=1024, help="size of the arena paged during B's steps")
    p.add_argument("--steps", type=int, default=200, help="B's steps per interference measurement")
    p.add_argument("--matmul", type=int, default=4096, help="B's square matmul size (CPU: capped at 1024)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the baseline's own end; the VMU path never does this


def _baseline_s(device: torch.device, host: torch.Tensor, dev: torch.Tensor, to_host: bool, chunks: int = 1) -> float:
    """Seconds for plain copies of the same bytes, pinned host <-> device (CPU: memcpy): `chunks` equal copies
    issued back to back, then one synchronize."""
    size = host.numel() // chunks
    _sync(device)
    t0 = time.perf_counter()
    for i in range(chunks):
        h, d = host[i * size:(i + 1) * size], dev[i * size:(i + 1) * size]
        if to_host:
            h.copy_(d, non_blocking=True)
        else:
            d.copy_(h, non_blocking=True)
    _sync(device)
    return time.perf_counter() - t0


def _bandwidth(device: torch.device, size: int, repeats: int) -> dict[str, Any]:
    vmu = VMU(device, text_nbytes=0, data_nbytes=size + MiB, stack_nbytes=0, host_nbytes=size + MiB)
    try:
        arena = vmu.alloc_arena("a", size)
        arena.bytes(size).fill_(0x5A)
        arena.mark_used(size)
        base_host = torch.empty(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
        base_dev = torch.empty(size, dtype=torch.uint8, device=device)
        base_dev.fill_(0x3C)
        out_s, in_s, out_copy_s, in_copy_s, b_out, b_in = [], [], [], [], [], []
        for i in range(repeats + 1):  # the first round warms up
            b_o = _baseline_s(device, base_host, base_dev, to_host=True)
            _sync(device)
            t0 = time.perf_counter()
            job = vmu.page_out(arena)
            job.wait()
            t_out = time.perf_counter() - t0
            vmu.finish(job)
            b_i = _baseline_s(device, base_host, base_dev, to_host=False)
            t0 = time.perf_counter()
            job_in = vmu.page_in(arena)
            job_in.wait()
            t_in = time.perf_counter() - t0
            vmu.finish(job_in)
            if i:
                out_s.append(t_out), in_s.append(t_in), b_out.append(b_o), b_in.append(b_i)
                out_copy_s.append(job.seconds or 0.0), in_copy_s.append(job_in.seconds or 0.0)
        assert int(arena.bytes(1)[0]) == 0x5A, "page_out/page_in lost the arena's bytes"
    finally:
        vmu.close()
    med = statistics.median
    gbps = lambda s: size / s / 1e9 if s > 0 else float("nan")  # noqa: E731
    r = {"nbytes": size, "mib": size // MiB,
         "out_GBps": gbps(med(out_s)), "in_GBps": gbps(med(in_s)),
         "out_copy_GBps": gbps(med(out_copy_s)), "in_copy_GBps": gbps(med(in_copy_s)),
         "baseline_out_GBps": gbps(med(b_out)), "baseline_in_GBps": gbps(med(b_in))}
    r["out_ratio"] = r["out_GBps"] / r["baseline_out_GBps"]
    r["in_ratio"] = r["in_GBps"] / r["baseline_in_GBps"]
    return r


def _pipelined(device: torch.device, size: int, n: int, repeats: int) -> dict[str, Any]:
    """Bandwidth of `n` page-outs (then page-ins) of different arenas issued back to back, against `n` plain
    copies of the same sizes issued back to back then one synchronize."""
    vmu = VMU(device, text_nbytes=0, data_nbytes=n * size + MiB, stack_nbytes=0, host_nbytes=n * size + MiB)
    try:
        arenas = [vmu.alloc_arena(f"a{i}", size) for i in range(n)]
        for i, arena in enumerate(arenas):
            arena.bytes(size).fill_(i + 1)
            arena.mark_used(size)
        base_host = torch.empty(n * size, dtype=torch.uint8, pin_memory=device.type == "cuda")
        base_dev = torch.empty(n * size, dtype=torch.uint8, device=device)
        b_out, b_in, out_s, in_s = [], [], [], []

        def paged(op: Any) -> float:
            _sync(device)
            t0 = time.perf_counter()
            jobs = [op(arena) for arena in arenas]
            for job in jobs:
                job.wait()
            dt = time.perf_counter() - t0
            for job in jobs:
                vmu.finish(job)
            return dt

        for i in range(repeats + 1):  # the first round warms up
            bo, to = _baseline_s(device, base_host, base_dev, True, n), paged(vmu.page_out)
            bi, ti = _baseline_s(device, base_host, base_dev, False, n), paged(vmu.page_in)
            if i:
                b_out.append(bo), out_s.append(to), b_in.append(bi), in_s.append(ti)
        for i, arena in enumerate(arenas):
            assert int(arena.bytes(1)[0]) == i + 1, "pipelined page_out/page_in lost an arena's bytes"
    finally:
        vmu.close()
    med = statistics.median
    gbps = lambda t: n * size / t / 1e9 if t > 0 else float("nan")  # noqa: E731
    r = {"nbytes": size, "mib": size // MiB, "arenas": n, "out_GBps": gbps(med(out_s)), "in_GBps": gbps(med(in_s)),
         "baseline_out_GBps": gbps(med(b_out)), "baseline_in_GBps": gbps(med(b_in))}
    r["out_ratio"] = r["out_GBps"] / r["baseline_out_GBps"]
    r["in_ratio"] = r["in_GBps"] / r["baseline_in_GBps"]
    return r


def _b_steps(device: torch.device, x: torch.Tensor, y: torch.Tensor, steps: int, per_step: int,
             between: Any = None) -> float:
    """Seconds for `steps` of B, each `per_step` matmuls then a sync of the compute stream only."""
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    t0 = time.perf_counter()
    for _ in range(steps):
        for _ in range(per_step):
            torch.matmul(x, x, out=y)
        if stream is not None:
            stream.synchronize()  # one stream, as a decode step waits for its token; never the device
        if between is not None:
            between()
    return time.perf_counter() - t0


def _interference(device: torch.device, arena_nbytes: int, steps: int, n: int) -> dict[str, Any]:
    vmu = VMU(device, text_nbytes=0, data_nbytes=2 * arena_nbytes + MiB, stack_nbytes=0,
              host_nbytes=arena_nbytes + MiB)
    try:
        a = vmu.alloc_arena("A", arena_nbytes)
        a.bytes().fill_(1)
        a.mark_used(arena_nbytes)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        x = torch.randn(n, n, device=device, dtype=dtype)
        y = torch.empty_like(x)
        per_step = 4
        state: dict[str, Any] = {"job": None, "moved": 0, "copies": 0}

        def pump() -> None:  # keep one page-out or page-in of A in flight at all times
            job = state["job"]
            if job is not None and not job.query():
                return
            if job is not None:
                vmu.finish(job)
                state["moved"] += job.nbytes
                state["copies"] += 1
            state["job"] = vmu.page_out(a) if a.residency == "device" else vmu.page_in(a)

        _b_steps(device, x, y, max(3, steps // 10), per_step)  # warm-up
        alone1 = _b_steps(device, x, y, steps, per_step)
        t0 = time.perf_counter()
        with_copies = _b_steps(device, x, y, steps, per_step, between=pump)
        if state["job"] is not None:
            state["job"].wait()
        copy_wall = time.perf_counter() - t0
        alone2 = _b_steps(device, x, y, steps, per_step)
    finally:
        vmu.close()
    alone = (alone1 + alone2) / 2
    return {"arena_nbytes": arena_nbytes, "steps": steps, "matmul": n, "matmuls_per_step": per_step,
            "b_alone_s": alone, "b_with_paging_s": with_copies, "slowdown": with_copies / alone - 1.0,
            "copies": state["copies"], "paging_GBps": state["moved"] / copy_wall / 1e9,
            "torch_threads": torch.get_num_threads()}


def run(args: argparse.Namespace) -> int:
    want = args.device
    device = torch.device("cuda" if (want == "auto" and torch.cuda.is_available()) else
                          ("cpu" if want == "auto" else want))
    sizes = [int(s) * MiB for s in args.sizes_mib.split(",") if s.strip()]
    repeats = args.repeats
    steps, n, inter = args.steps, args.matmul, args.interference_mib * MiB
    if device.type == "cpu":
        n = min(n, 1024)
    if args.quick:
        sizes = [s for s in sizes if s <= 64 * MiB] or [MiB]
        repeats, steps, n, inter = min(repeats, 5), min(steps, 60), min(n, 512), min(inter, 64 * MiB)
    rec = Recorder("swap", args.output_dir, quick=args.quick)
    baseline = "pinned tensor.copy_ + synchronize" if device.type == "cuda" else "memcpy (tensor.copy_ on CPU)"
    rows = []
    for size in progress(sizes, "swap bandwidth"):
        r = _bandwidth(device, size, repeats)
        rows.append(rec.record(metric="swap_bandwidth", unit="GB/s", device_kind=device.type, baseline=baseline, **r))
    pipe_rows = []
    for size in progress([s for s in sizes if s <= args.pipelined_max_mib * MiB], "swap pipelined"):
        r = _pipelined(device, size, args.pipelined, repeats)
        pipe_rows.append(rec.record(metric="swap_bandwidth_pipelined", unit="GB/s", device_kind=device.type,
                                    baseline=f"{args.pipelined} plain copies back to back + synchronize", **r))
    inter_r = rec.record(metric="swap_interference", device_kind=device.type, **_interference(device, inter, steps, n))
    print(f"\n{'MiB':>6} {'out GB/s':>9} {'base':>7} {'ratio':>6} {'in GB/s':>9} {'base':>7} {'ratio':>6}"
          f" {'out copy':>9} {'in copy':>9}")
    for r in rows:
        print(f"{r['mib']:6d} {r['out_GBps']:9.2f} {r['baseline_out_GBps']:7.2f} {r['out_ratio']:6.2f} "
              f"{r['in_GBps']:9.2f} {r['baseline_in_GBps']:7.2f} {r['in_ratio']:6.2f} "
              f"{r['out_copy_GBps']:9.2f} {r['in_copy_GBps']:9.2f}")
    print(f"baseline: {baseline} (target: ratio >= 0.85)")
    for r in pipe_rows:
        print(f"pipelined {r['arenas']} x {r['mib']} MiB: out {r['out_GBps']:.2f} GB/s ({r['out_ratio']:.2f} of "
              f"{r['baseline_out_GBps']:.2f}), in {r['in_GBps']:.2f} GB/s ({r['in_ratio']:.2f} of "
              f"{r['baseline_in_GBps']:.2f})")
    print(f"interference: B {inter_r['b_alone_s']:.3f} s alone, {inter_r['b_with_paging_s']:.3f} s while "
          f"{inter_r['copies']} page-outs/ins of {inter // MiB} MiB ran ({inter_r['paging_GBps']:.2f} GB/s): "
          f"slowdown {inter_r['slowdown'] * 100:.1f}% (target <= 10%)")
    print(f"results: {rec.path}")
    return 0
