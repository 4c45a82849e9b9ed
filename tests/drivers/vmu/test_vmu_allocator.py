"""RangeAllocator: unit cases, the size classes, and a hypothesis state machine over alloc/free/extend."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from djinn.drivers.errors import BadArgument, OutOfMemory
from djinn.drivers.vmu.allocator import AT_SCAN_LIMIT, QUICK_LIMIT, SCAN_LIMIT, RangeAllocator, _class_at_least, _class_of


def test_alloc_is_aligned_and_rounded() -> None:
    a = RangeAllocator(1 << 20, 256)
    o1 = a.alloc(1)
    o2 = a.alloc(300)
    assert o1 % 256 == 0 and o2 % 256 == 0
    assert a.size_of(o1) == 256 and a.size_of(o2) == 512
    assert a.used_nbytes == 768 and a.free_nbytes == (1 << 20) - 768
    a.check()


def test_capacity_is_floored_to_alignment() -> None:
    a = RangeAllocator(1000, 256)
    assert a.capacity == 768
    assert a.free_ranges() == [(0, 768)]


def test_free_coalesces_both_neighbours() -> None:
    a = RangeAllocator(4096, 256, quick_limit=0)
    x, y, z = a.alloc(256), a.alloc(256), a.alloc(256)
    a.free(x)
    a.free(z)
    assert a.n_free_ranges == 2  # [x] and [z .. end]
    a.free(y)
    assert a.free_ranges() == [(0, 4096)]
    a.check()


def test_exhaustion_raises_out_of_memory_with_figures() -> None:
    a = RangeAllocator(1024, 256, name="data segment")
    keep = [a.alloc(256) for _ in range(4)]
    a.free(keep[1])
    a.free(keep[3])
    with pytest.raises(OutOfMemory) as info:
        a.alloc(512)
    e = info.value
    assert (e.requested_nbytes, e.largest_free_nbytes, e.total_free_nbytes) == (512, 256, 512)
    assert e.errno == "ENOMEM" and "data segment" in str(e) and e.hint
    a.check()  # a failed alloc changes nothing


def test_fragmentation_figures() -> None:
    a = RangeAllocator(1024, 256)
    assert a.fragmentation == 0.0 and a.largest_free_fraction == 1.0
    keep = [a.alloc(256) for _ in range(4)]
    assert a.largest_free_nbytes == 0 and a.fragmentation == 0.0  # nothing free: not fragmented
    a.free(keep[0])
    a.free(keep[2])
    assert a.largest_free_fraction == 0.5 and a.fragmentation == 0.5


def test_bad_arguments() -> None:
    a = RangeAllocator(1024, 256)
    with pytest.raises(BadArgument):
        a.alloc(0)
    with pytest.raises(BadArgument):
        a.free(256)  # never handed out
    o = a.alloc(10)
    a.free(o)
    with pytest.raises(BadArgument, match="double free"):
        a.free(o)
    with pytest.raises(BadArgument):
        RangeAllocator(1024, 100)


def test_zero_capacity_allocator() -> None:
    a = RangeAllocator(0, 256)
    with pytest.raises(OutOfMemory):
        a.alloc(1)
    assert a.largest_free_nbytes == 0 and a.free_nbytes == 0
    a.check()


def test_try_extend_in_place() -> None:
    a = RangeAllocator(4096, 256)
    x = a.alloc(256)
    y = a.alloc(256)
    assert not a.try_extend(x, 512)  # y is in the way
    assert a.try_extend(y, 1024)
    assert a.size_of(y) == 1024
    a.free(x)
    a.check()


def test_same_size_hole_is_reused() -> None:
    """A request inside a size class finds the same-size hole (the scan of its own class)."""
    a = RangeAllocator(1 << 30, 256)
    size = 300 << 20  # not a class boundary
    x = a.alloc(size)
    a.alloc(256)  # keeps x's hole from merging with the tail
    a.free(x)
    assert a.alloc(size) == x


def test_alloc_succeeds_whenever_some_range_fits() -> None:
    """Near-full: more same-class holes than SCAN_LIMIT, only the last one fits."""
    a = RangeAllocator(1 << 24, 256)
    unit = 256 * 20  # class of 20 units spans 20..21
    holes = []
    for _ in range(SCAN_LIMIT + 3):
        holes.append(a.alloc(unit))
        a.alloc(256)
    big = a.alloc(unit + 256)
    a.alloc(256)
    a.alloc(a.free_nbytes)  # no tail left
    for h in holes:
        a.free(h)
    a.free(big)
    assert a.alloc(unit + 256) == big
    a.check()


def test_largest_free_counts_ties_and_searches_only_when_the_last_goes() -> None:
    """Equal largest ranges are counted; taking one leaves the figure exact; taking the last makes it search."""
    a = RangeAllocator(1 << 20, 256, quick_limit=0)
    x, _, y, _ = a.alloc(4096), a.alloc(256), a.alloc(4096), a.alloc(256)
    a.alloc(a.free_nbytes)  # no tail: the free ranges are the holes made below
    a.free(x), a.free(y)
    assert a._n_largest == 0  # the whole range went: "all smaller than 1 MiB" until a query searches
    assert a.largest_free_nbytes == 4096 and (a._largest, a._n_largest) == (4096, 2)
    assert a.alloc(4096) == x
    assert (a._largest, a._n_largest) == (4096, 1) and a.largest_free_nbytes == 4096
    a.alloc(1024)  # splits y: the last 4096 goes, the 3072 tail is not counted until a query searches
    assert a._n_largest == 0
    a.check()
    assert a.largest_free_nbytes == 3072 and (a._largest, a._n_largest) == (3072, 1)
    a.check()


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 1 << 14), st.booleans()), max_size=200),
       st.integers(0, 1 << 16))
@settings(max_examples=200, deadline=None)
def test_largest_free_is_exact_under_random_churn(ops: list[tuple[bool, int, bool]], seed: int) -> None:
    """Random alloc/free sequences with sparse queries: the figure always equals the largest free range."""
    a = RangeAllocator(1 << 18, 256)
    live: list[int] = []
    for do_alloc, n, query in ops:
        if do_alloc or not live:
            try:
                live.append(a.alloc(n))
            except OutOfMemory:
                assert max((s for _, s in a.free_ranges()), default=0) < a.round_up(n)  # nothing would fit
        else:
            a.free(live.pop((seed + n) % len(live)))
        a.check()
        if query:
            assert a.largest_free_nbytes == max((s for _, s in a.free_ranges()), default=0)
    assert a.largest_free_nbytes == max((s for _, s in a.free_ranges()), default=0)


def test_a_freed_range_is_held_back_for_the_next_request_of_its_size() -> None:
    """Quick reuse: the latest freed range of a size goes to the next request of that size, unmerged; it
    counts as free meanwhile."""
    a = RangeAllocator(1 << 20, 256)
    x, y, z = a.alloc(4096), a.alloc(4096), a.alloc(1000)
    a.free(x), a.free(y)
    assert a._n_quick == 2 and a._free_start == {z + 1024: (1 << 20) - z - 1024}  # neither merged
    assert a.used_nbytes == a.size_of(z) and a.free_nbytes == a.capacity - a.size_of(z)
    a.check()
    assert a.alloc(4000) == y  # same rounded size: the latest held back first
    assert a.alloc(4096) == x
    assert a._n_quick == 0
    a.free(z)
    assert a.alloc(1024) == z
    a.check()


def test_ranges_held_back_merge_before_anything_could_tell() -> None:
    """A request that fits only once they merge, the figures, try_extend and alloc_at all see them merged;
    alloc_at of exactly a range held back takes it as it is."""
    a = RangeAllocator(4 * 256, 256)
    r = [a.alloc(256) for _ in range(4)]
    a.free(r[1]), a.free(r[2])
    assert a.alloc(512) == r[1]  # no other room: the two merged, as free would have merged them
    a.check()
    a.free(r[3])
    assert a.try_extend(r[1], 768)  # into the range held back right after it
    a.free(r[0])
    assert a.alloc_at(0, 256) and a._n_quick == 0  # exactly the range held back: taken as it is
    a.free(r[0])
    assert a.alloc_at(0, 512) is False and a._n_quick == 0  # more than it: merged first, and [256, 512) is used
    assert a.alloc_at(0, 256)
    assert a.free_nbytes == 0
    a.free(r[1]), a.free(r[0])
    assert a._n_quick == 2 and a.largest_free_nbytes == 1024 and a._n_quick == 0
    a.check()


def test_quick_limit_bounds_the_ranges_held_back() -> None:
    a = RangeAllocator(1 << 20, 256)
    live = [a.alloc(256 * (i + 1)) for i in range(QUICK_LIMIT + 3)]
    for o in live:
        a.free(o)
    assert a._n_quick == QUICK_LIMIT  # the rest merged at once
    a.check()
    assert a.free_ranges() == [(0, 1 << 20)]  # and everything merges before it is listed
    none = RangeAllocator(1 << 20, 256, quick_limit=0)
    none.free(none.alloc(256))
    assert none._n_quick == 0 and none._free_start == {0: 1 << 20}
    with pytest.raises(BadArgument, match="quick_limit"):
        RangeAllocator(1024, 256, quick_limit=-1)


@given(st.integers(1, 1 << 40), st.integers(1, 1 << 40))
def test_size_classes_are_monotonic_and_fitting(u: int, v: int) -> None:
    if u <= v:
        assert _class_of(u) <= _class_of(v)
    if _class_of(v) >= _class_at_least(u):
        assert v >= u  # every member of a class at or above "at least u" fits u
    assert _class_at_least(u) >= _class_of(u)


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free/extend sequences against a model of the used ranges."""

    def __init__(self) -> None:
        super().__init__()
        self.a = RangeAllocator(0)
        self.model: dict[int, int] = {}  # offset -> nbytes handed out
        self.freed: list[tuple[int, int]] = []  # (offset, nbytes) of recent frees: alloc_at asks for them back

    @initialize(units=st.integers(0, 512), align_log=st.integers(0, 10), quick=st.integers(0, 3))
    def setup(self, units: int, align_log: int, quick: int) -> None:
        align = 1 << align_log
        self.a = RangeAllocator(units * align + align // 2, align, quick_limit=quick)

    @rule(nbytes=st.integers(1, 1 << 16))
    def alloc(self, nbytes: int) -> None:
        try:
            off = self.a.alloc(nbytes)
        except OutOfMemory as e:
            assert self.a.largest_free_nbytes < self.a.round_up(nbytes), "refused although a range fits"
            assert e.largest_free_nbytes == self.a.largest_free_nbytes
            return
        size = self.a.size_of(off)
        assert size == self.a.round_up(nbytes) and off % self.a.align == 0
        for o, s in self.model.items():
            assert off + size <= o or o + s <= off, "overlaps a live range"
        self.model[off] = size

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        off = data.draw(st.sampled_from(sorted(self.model)))
        size = self.model.pop(off)
        assert self.a.free(off) == size
        self.freed = [*self.freed[-7:], (off, size)]

    @precondition(lambda self: self.model)
    @rule(data=st.data(), extra=st.integers(1, 1 << 14))
    def extend(self, data: st.DataObject, extra: int) -> None:
        off = data.draw(st.sampled_from(sorted(self.model)))
        if self.a.try_extend(off, self.model[off] + extra):
            self.model[off] = self.a.size_of(off)
            assert self.model[off] >= extra

    @precondition(lambda self: self.a.capacity)
    @rule(data=st.data(), nbytes=st.integers(1, 1 << 12))
    def alloc_at(self, data: st.DataObject, nbytes: int) -> None:
        """A range wanted at one place (a page-in's return home): granted only when all of it is free, and
        always then while the free ranges are fewer than alloc_at looks at."""
        a = self.a
        source = data.draw(st.sampled_from(["anywhere", "used", "freed"]))
        if source == "freed" and self.freed:  # a page-in to its old range: often one still held back
            offset, nbytes = data.draw(st.sampled_from(self.freed))
        elif source == "used" and self.model:
            offset = data.draw(st.sampled_from(sorted(self.model)))
        else:
            offset = data.draw(st.integers(0, a.capacity // a.align)) * a.align
        size = a.round_up(nbytes)
        free = offset + size <= a.capacity and all(offset + size <= o or o + s <= offset for o, s in self.model.items())
        few = len(a._free_start) + a._n_quick < AT_SCAN_LIMIT
        if a.alloc_at(offset, nbytes):
            assert free, "granted a span that is not free"
            self.model[offset] = size
        else:
            assert not (free and few), "refused a free span"

    @rule()
    def largest(self) -> None:
        """Queried now and then, not after every step, so the cache also lives through long runs unread."""
        assert self.a.largest_free_nbytes == max((s for _, s in self.a.free_ranges()), default=0)

    @invariant()
    def invariants(self) -> None:
        self.a.check()  # no overlaps or gaps, no adjacent free ranges, used + free == capacity, indexes agree
        assert self.a.used_ranges() == sorted(self.model.items())
        assert self.a.used_nbytes + self.a.free_nbytes == self.a.capacity


AllocatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestAllocatorMachine = AllocatorMachine.TestCase
