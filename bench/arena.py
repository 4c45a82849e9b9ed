"""python -m bench arena: arena alloc+free latency across sizes and live-arena counts (ablation 2).

Figures (targets: p50 <= 5 us, flat in size, growing no faster than log n in the count):
- `vmu`: `VMU.alloc_arena` + `VMU.free_arena`, the real path that hands out an Arena;
- `allocator`: the pure RangeAllocator under it, alone, for comparison;
- `tlsf`: the same allocator with quick reuse off (quick_limit=0): every free merges
  and every alloc searches the size classes and splits, the path of a request whose
  size no freed range has.
Each trial frees one random live arena and allocates a new one of the same size, so
holes move around as they would under sessions coming and going; since sessions of
one model share an arena size, `vmu` and `allocator` take the allocator's quick reuse
(the range just freed goes to the next request of its size). The trials of a configuration
are split over --rounds passes through all configurations, so a noisy stretch of a
shared host lands on every configuration a little rather than on one entirely; the
percentiles are over all of a configuration's trials. Every other trial times the
free+alloc pair as one interval, with no clock read between the two (the pair
figures); the rest time the free and the alloc apart (their own figures). The cost of the clock itself, two reads back to back, is measured in the
same run and recorded (arena_clock) for scale; nothing is subtracted. No count of live arenas of
these sizes fits in any real memory (10,000 x 4 GB), so the sweep runs on a Data
segment whose tensor is on the meta device: alloc_arena/free_arena never touch the
bytes, so the path is the same. Where a configuration fits, a `vmu` row on a real
segment (segment="real") is measured as well, to show that it is.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from typing import Any, Callable

import torch

from bench.common import Recorder, percentile, progress
from djinn.drivers.errors import OutOfMemory
from djinn.drivers.vmu import VMU, RangeAllocator, Segment
from djinn.drivers.vmu.sizes import host_available_nbytes

MiB = 1 << 20


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arena-sizes", default="64,128,256,300,4096",
                   help="arena sizes in MiB, comma-separated (default: the seeds' 64,128,256,300 plus 4 GiB)")
    p.add_argument("--n-sessions", default="1,10,100,1000,10000",
                   help="live-arena counts to sweep, comma-separated")
    p.add_argument("--n-trials", type=int, default=5000, help="timed free+alloc pairs per configuration")
    p.add_argument("--rounds", type=int, default=5,
                   help="passes through all configurations, each timing an equal share of the trials")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (the real-segment rows use it)")
    p.add_argument("--real-cap-gib", type=float, default=None,
                   help="largest real Data segment to allocate (default: half the free memory)")
    p.add_argument("--seed", type=int, default=0)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _time_pairs(n_trials: int, live: list[Any], free: Callable[[Any], None], alloc: Callable[[], Any],
                rng: random.Random) -> tuple[list[float], list[float], list[float]]:
    """(alloc seconds, free seconds, pair seconds) of `n_trials` trials, each freeing a random live one and
    allocating a new one: the even trials timed as one free+alloc interval, the odd ones free and alloc apart."""
    allocs, frees, pairs = [], [], []
    clock = time.perf_counter_ns
    for k in range(n_trials):
        i = rng.randrange(len(live))
        if k % 2 == 0:
            t0 = clock()
            free(live[i])
            live[i] = alloc()
            t2 = clock()
            pairs.append((t2 - t0) / 1e9)
            continue
        t0 = clock()
        free(live[i])
        t1 = clock()
        live[i] = alloc()
        t2 = clock()
        frees.append((t1 - t0) / 1e9)
        allocs.append((t2 - t1) / 1e9)
    return allocs, frees, pairs


def _clock_p50_us(n: int = 20000) -> float:
    """p50 of two clock reads back to back: what the clock alone adds to a timed interval."""
    clock = time.perf_counter_ns
    gaps = []
    for _ in range(n):
        t0 = clock()
        gaps.append(clock() - t0)
    return percentile(gaps, 50) / 1e3


def _vmu(device: torch.device, capacity: int, real: bool) -> VMU:
    vmu = VMU(device, text_nbytes=0, data_nbytes=capacity if real else 0, stack_nbytes=0, host_nbytes=0)
    if not real:  # a Data segment too large for any memory: its tensor is on the meta device (see the docstring)
        vmu.data = Segment("data", torch.empty(capacity, dtype=torch.uint8, device="meta"),
                           align=vmu.data.allocator.align, lock=vmu._lock)
    return vmu


def _trials(path: str, segment: str, device: torch.device, size: int, n_live: int, n_trials: int,
            seed: int) -> tuple[list[float], list[float], list[float], float]:
    """(alloc seconds, free seconds, pair seconds, fragmentation after) of `n_trials` trials (see _time_pairs)
    on a fresh set of `n_live` arenas."""
    capacity = (n_live + 1) * size
    rng = random.Random(seed)
    gc.collect()  # the last configuration's VMU (its arenas and it refer to each other) goes here
    if device.type == "cuda":
        torch.cuda.empty_cache()  # and its real segment back to the device, or this one could find no room
    if path in ("allocator", "tlsf"):
        a = RangeAllocator(capacity, 256, name="data segment", **({"quick_limit": 0} if path == "tlsf" else {}))
        live: list[Any] = [a.alloc(size) for _ in range(n_live)]
        allocs, frees, pairs = _time_pairs(n_trials, live, a.free, lambda: a.alloc(size), rng)
        frag = a.fragmentation
    else:
        vmu = _vmu(device, capacity, real=segment == "real")
        try:
            live = [vmu.alloc_arena(i, size) for i in range(n_live)]  # sessions are plain ints: no formatting timed
            counter = iter(range(n_live, 1 << 62))
            allocs, frees, pairs = _time_pairs(n_trials, live, vmu.free_arena,
                                               lambda: vmu.alloc_arena(next(counter), size), rng)
            frag = vmu.data.allocator.fragmentation
        finally:
            vmu.close()
    return allocs, frees, pairs, frag


def _summary(path: str, segment: str, size: int, n_live: int, allocs: list[float], frees: list[float],
             pairs: list[float], frag: float, rounds: int) -> dict[str, Any]:
    us = lambda xs, q: percentile(xs, q) * 1e6  # noqa: E731
    return {
        "path": path, "segment": segment, "arena_nbytes": size, "arena_mib": size // MiB, "n_live": n_live,
        "n_trials": len(pairs) + len(allocs), "n_pair_trials": len(pairs), "rounds": rounds, "alloc_p50_us": us(allocs, 50), "alloc_p99_us": us(allocs, 99),
        "free_p50_us": us(frees, 50), "free_p99_us": us(frees, 99), "pair_p50_us": us(pairs, 50),
        "pair_p99_us": us(pairs, 99), "fragmentation": frag,
    }


def run(args: argparse.Namespace) -> int:
    sizes = [s * MiB for s in _ints("64,300,4096" if args.quick and args.arena_sizes == "64,128,256,300,4096"
                                    else args.arena_sizes)]
    counts = _ints("1,100,10000" if args.quick and args.n_sessions == "1,10,100,1000,10000" else args.n_sessions)
    n_trials = min(args.n_trials, 500) if args.quick else args.n_trials
    want = args.device
    device = torch.device("cuda" if (want == "auto" and torch.cuda.is_available()) else
                          ("cpu" if want == "auto" else want))
    if args.real_cap_gib is not None:
        real_cap = int(args.real_cap_gib * (1 << 30))
    elif device.type == "cuda":
        real_cap = int(torch.cuda.mem_get_info(device)[0] * 0.5)
    else:
        real_cap = min(host_available_nbytes() // 2, 8 << 30)
    rec = Recorder("arena", args.output_dir, quick=args.quick)
    configs = []
    for size in sizes:
        for n in counts:
            configs.append(("allocator", "none", size, n))
            configs.append(("tlsf", "none", size, n))
            configs.append(("vmu", "meta", size, n))
            if (n + 1) * size <= real_cap:
                configs.append(("vmu", "real", size, n))
    rounds = max(1, min(args.rounds, n_trials))
    per_round = [n_trials // rounds + (r < n_trials % rounds) for r in range(rounds)]
    samples: dict[tuple[str, str, int, int], tuple[list[float], list[float], list[float], float]] = {}
    skipped: set[tuple[str, str, int, int]] = set()
    for r, config in progress([(r, c) for r in range(rounds) for c in configs], "arena configs x rounds"):
        if config in skipped:
            continue
        path, segment, size, n = config
        try:
            allocs, frees, pairs, frag = _trials(path, segment, device, size, n, per_round[r], args.seed + r)
        except OutOfMemory as e:  # the device's free memory shrank since real_cap was read (a shared GPU)
            rec.record(metric="arena_skipped", path=path, segment=segment, arena_nbytes=size, n_live=n,
                       reason=str(e))
            skipped.add(config)
            samples.pop(config, None)
            continue
        allocs_before, frees_before, pairs_before, _ = samples.get(config, ([], [], [], 0.0))
        samples[config] = (allocs_before + allocs, frees_before + frees, pairs_before + pairs,
                           frag)  # fragmentation: the last round's
    rows = [rec.record(metric="arena_free_alloc", unit="us", device_kind=device.type,
                       **_summary(*config, *samples[config], rounds=rounds))
            for config in configs if config in samples]
    by = {(r["path"], r["segment"], r["arena_nbytes"], r["n_live"]): r for r in rows}
    for path, segment in (("vmu", "meta"), ("allocator", "none"), ("tlsf", "none")):
        for size in sizes:
            lo, hi = by.get((path, segment, size, counts[0])), by.get((path, segment, size, counts[-1]))
            if lo and hi and counts[-1] > counts[0]:
                import math

                rec.record(metric="arena_scaling", path=path, segment=segment, arena_nbytes=size,
                           n_from=counts[0], n_to=counts[-1], p50_ratio=hi["pair_p50_us"] / lo["pair_p50_us"],
                           log2_ratio=math.log2(max(counts[-1], 2)) / math.log2(max(counts[0], 2)))
    print(f"\n{'path':10} {'segment':8} {'MiB':>6} {'live':>6} {'alloc p50':>10} {'free p50':>9} "
          f"{'pair p50':>9} {'pair p99':>9} {'frag':>6}")
    for r in rows:
        print(f"{r['path']:10} {r['segment']:8} {r['arena_mib']:6d} {r['n_live']:6d} {r['alloc_p50_us']:10.2f} "
              f"{r['free_p50_us']:9.2f} {r['pair_p50_us']:9.2f} {r['pair_p99_us']:9.2f} {r['fragmentation']:6.3f}")
    worst = max(r["pair_p50_us"] for r in rows if r["path"] == "vmu")
    clock = rec.record(metric="arena_clock", unit="us", clock_p50_us=_clock_p50_us(),
                       definition="p50 of two perf_counter_ns reads back to back (included in every figure above)")
    print(f"clock: {clock['clock_p50_us']:.3f} us per two reads back to back (not subtracted)")
    print(f"worst VMU free+alloc p50: {worst:.2f} us (target <= 5 us); results: {rec.path}")
    return 0
