"""Fakes and helpers for the VMU tests, in one place.

`make_vmu` builds a CPU VMU with small segments. `Gate` is a fence the test opens by
hand: put it on a copy stream to hold later copies in flight. `fill` writes a seeded
pattern into an arena and marks it used.
"""

from __future__ import annotations

import threading

import pytest
import torch

from djinn.drivers.vmu import VMU, Arena

MiB = 1 << 20

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Gate:
    """A fence that passes only once `open()` is called: holds a copy stream's later work in flight.
    It gives up after `safety_s`, so a failing test cannot hang the VMU's close() forever."""

    def __init__(self, safety_s: float = 20.0) -> None:
        self._event = threading.Event()
        self._safety_s = safety_s

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def query(self) -> bool:
        return self._event.is_set()

    def wait(self) -> None:
        self._event.wait(self._safety_s)

    sleep = wait

    def open(self) -> None:
        self._event.set()


def make_vmu(data: int = 4 * MiB, host: int = 4 * MiB, **kw: object) -> VMU:
    return VMU("cpu", text_nbytes=kw.pop("text", 1 * MiB), data_nbytes=data, stack_nbytes=kw.pop("stack", 1 * MiB),
               host_nbytes=host, **kw)  # type: ignore[arg-type]


def fill(arena: Arena, nbytes: int, seed: int) -> torch.Tensor:
    """Write `nbytes` of a seeded pattern at the start of `arena`, mark them used, return the pattern."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    if nbytes:
        arena.bytes(nbytes).copy_(pattern)
    arena.mark_used(nbytes)
    return pattern


class TimedGate(Gate):
    """A Gate that opens itself after `delay_s`: copies behind it stay in flight for a while, and nothing
    waiting on them can deadlock."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self._timer = threading.Timer(delay_s, self.open)
        self._timer.daemon = True
        self._timer.start()
