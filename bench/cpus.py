"""Where each side of a benchmark runs: one probe ranks the CPUs, and the sides get the fastest ones.

Why: the CPUs of one machine need not be equally fast (a VM's vCPUs share
physical cores with whatever else the host runs), and a model step on a GPU is
Python launching kernels, so it runs as fast as the CPU it lands on. Left to the
scheduler, a comparison of a native forward in this process against djinnd's
device worker would also compare the two CPUs they happened to get. So, with
placement on:

- the work under test runs on the fastest CPU: the native forward in this
  process, and djinnd's device worker (`--worker-cpus`); never both at once,
  since this process waits while djinnd works;
- djinnd's event loop runs on the second (`--loop-cpus`);
- this process runs its client calls on the third.

The probe (`rank_cpus`) times a fixed mix of small torch CPU ops and plain
Python, the two things a launch-bound step does, on each CPU in turn, best of
several passes. Its times go into every run's config record, so the spread
behind a placement is part of the results. `--cpus off` leaves every thread to
the scheduler; the default, auto, places on a CUDA device with at least three
CPUs and leaves CPU runs alone (torch's CPU threads would all be confined to the
worker's one CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

__all__ = ["Placement", "add_cpus_arg", "placement", "rank_cpus", "unpinned"]

# Every CPU this process may use, as it started: what a child process it spawns should get, even when the
# spawning thread is pinned for the moment (a child inherits the mask of the thread that forks it).
_START_CPUS: frozenset[int] | None = (frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                      else None)


def add_cpus_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpus", choices=("auto", "off"), default="auto",
                   help="pin the work under test, djinnd's loop and the client to the fastest CPUs (auto: on a CUDA "
                        "device with 3+ CPUs; off: the scheduler places every thread)")


def _probe() -> float:
    import torch

    a = torch.ones(8)
    b = torch.ones(8)
    t0 = time.perf_counter()
    for _ in range(200):
        torch.add(a, b)
    total = 0
    for i in range(4000):
        total += i
    return time.perf_counter() - t0


def rank_cpus(passes: int = 5) -> list[tuple[int, float]]:
    """(cpu, seconds of the probe) for every CPU this thread may use, fastest first; best of `passes`
    rounds over all of them, so a CPU busy for a moment is not ranked by that moment alone. The
    calling thread's mask is restored."""
    mine = os.sched_getaffinity(0)
    best: dict[int, float] = {}
    try:
        for _ in range(passes):
            for cpu in sorted(mine):
                os.sched_setaffinity(0, {cpu})
                _probe()  # the first run after a move pays for it
                dt = _probe()
                best[cpu] = min(best.get(cpu, dt), dt)
    finally:
        os.sched_setaffinity(0, mine)
    return sorted(best.items(), key=lambda kv: (kv[1], kv[0]))


@dataclass(frozen=True)
class Placement:
    """The CPUs of a run's sides; all None when placement is off."""

    work: int | None = None
    loop: int | None = None
    client: int | None = None
    probe_us: dict[int, float] = field(default_factory=dict)

    @property
    def on(self) -> bool:
        return self.work is not None

    def daemon_flags(self) -> list[str]:
        """djinnd flags that put its worker and loop where this placement says."""
        if not self.on:
            return []
        return ["--worker-cpus", str(self.work), "--loop-cpus", str(self.loop)]

    @contextlib.contextmanager
    def running_on(self, cpu: int | None) -> Iterator[None]:
        """The calling thread on `cpu` for the block (no-op when None); its mask is restored after."""
        if cpu is None:
            yield
            return
        saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})
        try:
            yield
        finally:
            os.sched_setaffinity(0, saved)

    def as_work(self) -> contextlib.AbstractContextManager[None]:
        return self.running_on(self.work)

    def as_client(self) -> contextlib.AbstractContextManager[None]:
        return self.running_on(self.client)

    def record(self) -> dict[str, Any]:
        """The fields a config record carries: the CPUs chosen and the probe's time on each (µs)."""
        return {"cpus_work": self.work, "cpus_loop": self.loop, "cpus_client": self.client,
                "cpu_probe_us": {str(c): round(t, 1) for c, t in sorted(self.probe_us.items())} or None}


@contextlib.contextmanager
def unpinned() -> Iterator[None]:
    """The calling thread on every CPU the process started with, for the block (to spawn a process that must
    not inherit a pinning); its mask is restored after."""
    if _START_CPUS is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, _START_CPUS)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def placement(mode: str, device: str) -> Placement:
    """The run's placement: ranked by the probe when `mode` is auto, the device CUDA and 3+ CPUs usable."""
    if mode == "off" or device != "cuda" or not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 3:
        return Placement()
    ranked = rank_cpus()
    (work, _), (loop, _), (client, _) = ranked[:3]
    return Placement(work, loop, client, {cpu: t * 1e6 for cpu, t in ranked})
