"""page_in goes back to the device range the arena left, when that range is free again
(RangeAllocator.alloc_at, tested at the end).

Then the arena's addresses are what they were and `generation` stays, so views and CUDA
graphs built on them stay valid; bytes past used_nbytes read as zero. Otherwise the arena
moves and `generation` is bumped. CPU VMUs, copies really asynchronous.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from djinn.drivers.errors import BadArgument, OutOfMemory
from djinn.drivers.vmu.allocator import RangeAllocator
from tests.drivers.vmu.fakes import MiB, Gate, fill, make_vmu


def _swapped(vmu, used: int, seed: int):  # type: ignore[no-untyped-def]
    """A 1 MiB arena with `used` bytes of a seeded pattern, paged out (the copy finished):
    (arena, pattern, the Data offset it left)."""
    a = vmu.alloc_arena("a", 1 * MiB)
    pattern = fill(a, used, seed=seed)
    home = a.offset
    vmu.finish(vmu.page_out(a))
    return a, pattern, home


def test_page_in_returns_home_keeps_generation_and_zeroes_the_tail() -> None:
    with make_vmu() as vmu:
        a = vmu.alloc_arena("a", 1 * MiB)
        a.bytes().fill_(0xAB)  # garbage past what will be marked used
        pattern = fill(a, 300_000, seed=1)
        home, gen = a.offset, a.generation
        vmu.finish(vmu.page_out(a))
        assert a.offset is None and a.home_offset == home
        job = vmu.page_in(a)
        assert a.offset == home and a.generation == gen and a.home_offset is None
        assert torch.equal(a.bytes(300_000), pattern)
        assert not a.bytes(1 * MiB - 300_000, 300_000).any()
        vmu.finish(job)
        assert vmu.stat()["swap"]["in"]["bytes"] == 300_000  # the zeroing is not counted as paged bytes


def test_home_used_by_another_arena_meanwhile_is_zeroed_past_used() -> None:
    with make_vmu(data=2 * MiB) as vmu:
        a, pattern, home = _swapped(vmu, 100_000, seed=2)
        b = vmu.alloc_arena("b", 2 * MiB)  # the whole segment: b covers a's old range
        b.bytes().fill_(0xEE)
        vmu.free_arena(b)
        vmu.page_in(a)
        assert a.offset == home and a.generation == 0
        assert torch.equal(a.bytes(100_000), pattern)
        assert not a.bytes(1 * MiB - 100_000, 100_000).any()


def test_page_in_moves_and_bumps_generation_when_home_is_taken() -> None:
    with make_vmu(data=2 * MiB) as vmu:
        a, pattern, home = _swapped(vmu, 500_000, seed=3)
        b = vmu.alloc_arena("b", 1 * MiB)
        assert b.offset == home  # b took a's old range
        vmu.page_in(a)
        assert a.offset != home and a.generation == 1
        assert torch.equal(a.bytes(500_000), pattern)


def test_home_range_still_under_its_page_out_copy_is_not_reused() -> None:
    with make_vmu() as vmu:
        gate = Gate()
        a = vmu.alloc_arena("a", 1 * MiB)
        pattern = fill(a, 1 * MiB, seed=4)
        home = a.offset
        vmu._d2h.wait(gate)  # the page-out copy stays in flight: its source range is still retired
        vmu.page_out(a)
        vmu.page_in(a)
        assert a.offset != home and a.generation == 1
        gate.open()
        assert torch.equal(a.bytes(1 * MiB), pattern)


def test_home_of_a_grown_swapped_arena_is_used_only_if_the_larger_range_is_free() -> None:
    with make_vmu(data=4 * MiB) as vmu:
        a = vmu.alloc_arena("a", 1 * MiB)
        fence = vmu.alloc_arena("fence", 1 * MiB)  # right after a: a's home cannot grow in place
        pattern = fill(a, 4096, seed=5)
        home = a.offset
        vmu.finish(vmu.page_out(a))
        vmu.grow_arena(a, 2 * MiB)
        vmu.page_in(a)
        assert a.offset != home and a.generation == 1 and a.nbytes == 2 * MiB
        assert torch.equal(a.bytes(4096), pattern)
        vmu.free_arena(fence)


# -- RangeAllocator.alloc_at: exact placement ---------------------------------------------------------


def test_alloc_at_carves_the_span_out_of_a_larger_free_range() -> None:
    a = RangeAllocator(64 * 256, align=256)
    assert a.alloc_at(4 * 256, 3 * 256)
    assert a.used_ranges() == [(1024, 768)] and a.free_ranges() == [(0, 1024), (1792, 64 * 256 - 1792)]
    assert not a.alloc_at(5 * 256, 256)  # inside the used span
    assert not a.alloc_at(3 * 256, 2 * 256)  # overlaps it
    assert not a.alloc_at(100, 256)  # unaligned
    assert not a.alloc_at(63 * 256, 2 * 256)  # past the end
    assert a.alloc_at(0, 1024) and a.alloc_at(1792, 256)
    a.check()
    with pytest.raises(BadArgument):
        a.alloc_at(0, 0)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "at"]), st.integers(1, 40), st.integers(0, 63)),
                max_size=60))
def test_alloc_at_agrees_with_a_byte_map(ops: list[tuple[str, int, int]]) -> None:
    """Against a model of which units are used: alloc_at succeeds exactly when its span is free (the
    search limit is never reached with this few ranges), and every invariant holds."""
    unit, n_units = 256, 64
    a = RangeAllocator(n_units * unit, align=unit)
    used = [False] * n_units
    live: list[int] = []
    for op, n, pos in ops:
        if op == "alloc":
            try:
                off = a.alloc(n * unit)
            except OutOfMemory:
                continue
            live.append(off)
            for u in range(off // unit, off // unit + n):
                assert not used[u]
                used[u] = True
        elif op == "free" and live:
            off = live.pop(pos % len(live))
            size = a.free(off)
            for u in range(off // unit, (off + size) // unit):
                used[u] = False
        elif op == "at":
            fits = pos + n <= n_units and not any(used[pos:pos + n])
            assert a.alloc_at(pos * unit, n * unit) == fits
            if fits:
                live.append(pos * unit)
                for u in range(pos, pos + n):
                    used[u] = True
        a.check()
    assert a.used_nbytes == sum(used) * unit
