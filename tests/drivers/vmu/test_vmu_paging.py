"""Paging and checkpoints on CPU, where copies really run asynchronously on the copy threads.

Gates hold a copy stream so that copies stay in flight: the tests check that a range
under a copy is never handed out again, that a page-in waits for its page-out, and
that contents survive byte for byte under random interleavings (hypothesis).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from djinn.drivers.errors import BadArgument, Busy, NotFound, OutOfMemory
from djinn.drivers.vmu import VMU, Arena, HostCopy
from tests.drivers.vmu.fakes import MiB, Gate, TimedGate, fill, make_vmu


def test_page_out_in_round_trip_copies_only_used_bytes(small_vmu: VMU) -> None:
    a = small_vmu.alloc_arena("s", 1 * MiB)
    pattern = fill(a, 12345, seed=1)
    out = small_vmu.page_out(a)
    assert a.residency == "host" and out.nbytes == 12345
    assert small_vmu.stat()["segments"]["data"]["used_nbytes"] == 1 * MiB  # retired, or back if copied already
    small_vmu.finish(out)
    assert out.query() and out.seconds is not None and out.seconds >= 0
    assert small_vmu.stat()["segments"]["data"]["used_nbytes"] == 0  # the device range came back
    inn = small_vmu.page_in(a)
    assert a.residency == "device" and inn.nbytes == 12345  # back in its old range: generation 0 (test_vmu_page_home)
    assert torch.equal(a.bytes(12345), pattern)  # view() orders us after the copy
    small_vmu.finish(inn)
    st_ = small_vmu.stat()
    assert st_["swap"]["out"]["bytes"] == 12345 and st_["swap"]["out"]["ops"] == 1
    assert st_["swap"]["in"]["bytes"] == 12345 and st_["swap"]["in"]["ops"] == 1
    assert st_["segments"]["host"]["used_nbytes"] == 0


def test_empty_arena_pages_without_host_memory(small_vmu: VMU) -> None:
    a = small_vmu.alloc_arena("s", 4096)
    small_vmu.page_out(a).wait()
    assert a.host_offset is None and small_vmu.stat()["segments"]["host"]["used_nbytes"] == 0
    small_vmu.page_in(a).wait()
    assert a.residency == "device" and a.used_nbytes == 0


def test_double_page_out_or_in_is_busy(small_vmu: VMU) -> None:
    a = small_vmu.alloc_arena("s", 4096)
    with pytest.raises(Busy):
        small_vmu.page_in(a)
    small_vmu.page_out(a)
    with pytest.raises(Busy):
        small_vmu.page_out(a)


def test_device_range_is_not_reused_before_the_page_out_copy_ends() -> None:
    with make_vmu(data=2 * MiB, host=2 * MiB) as vmu:
        gate = Gate()
        a = vmu.alloc_arena("a", 1 * MiB)
        vmu.alloc_arena("b", 1 * MiB)  # the Data segment is now full
        pattern = fill(a, 1 * MiB, seed=2)
        old_offset = a.offset
        vmu._d2h.wait(gate)  # the page-out copy waits behind the gate
        job = vmu.page_out(a)
        assert not job.query()
        seg = vmu.stat()["segments"]["data"]
        assert seg["pending_free_nbytes"] == 1 * MiB and seg["free_nbytes"] == 0
        threading.Timer(0.2, gate.open).start()
        t0 = time.perf_counter()
        c = vmu.alloc_arena("c", 1 * MiB)  # can only get a's old range: must wait for the copy
        assert time.perf_counter() - t0 >= 0.15
        assert c.offset == old_offset and job.query()
        c.bytes().fill_(0xEE)  # scribble over the old range: the host copy must not change
        vmu.free_arena(c)
        vmu.page_in(a)
        assert torch.equal(a.bytes(1 * MiB), pattern)


def test_page_in_waits_for_its_page_out_in_flight() -> None:
    with make_vmu(data=4 * MiB, host=4 * MiB) as vmu:
        gate = Gate()
        a = vmu.alloc_arena("a", 1 * MiB)
        pattern = fill(a, 700_000, seed=3)
        vmu._d2h.wait(gate)
        out = vmu.page_out(a)
        inn = vmu.page_in(a)  # a new device range: the copy must wait for the page-out
        time.sleep(0.05)
        assert not out.query() and not inn.query()
        gate.open()
        assert torch.equal(a.bytes(700_000), pattern)
        assert inn.query() and out.query()


def test_page_outs_of_different_sessions_are_in_flight_together() -> None:
    with make_vmu(data=4 * MiB, host=4 * MiB) as vmu:
        gate = Gate()
        arenas = [vmu.alloc_arena(f"s{i}", 1 * MiB) for i in range(3)]
        patterns = [fill(a, 100_000 * (i + 1), seed=10 + i) for i, a in enumerate(arenas)]
        vmu._d2h.wait(gate)
        jobs = [vmu.page_out(a) for a in arenas]
        assert not any(j.query() for j in jobs) and vmu.stat()["copies_in_flight"] == 3
        gate.open()
        for j in jobs:
            j.wait()
        for a, p in zip(arenas, patterns):
            vmu.page_in(a)
            assert torch.equal(a.bytes(p.numel()), p)


def test_host_pool_exhaustion_raises_and_keeps_the_arena() -> None:
    with make_vmu(data=4 * MiB, host=1 * MiB) as vmu:
        a = vmu.alloc_arena("a", 2 * MiB)
        pattern = fill(a, 2 * MiB, seed=4)
        with pytest.raises(OutOfMemory) as info:
            vmu.page_out(a)
        assert "host" in str(info.value) and info.value.requested_nbytes == 2 * MiB
        assert a.residency == "device" and torch.equal(a.bytes(2 * MiB), pattern)
        with pytest.raises(OutOfMemory):
            vmu.snapshot(a)


def test_page_in_without_device_room_raises_and_stays_swapped() -> None:
    with make_vmu(data=2 * MiB, host=4 * MiB) as vmu:
        a = vmu.alloc_arena("a", 2 * MiB)
        pattern = fill(a, 1000, seed=5)
        vmu.page_out(a).wait()
        b = vmu.alloc_arena("b", 1 * MiB)
        with pytest.raises(OutOfMemory):
            vmu.page_in(a)
        assert a.residency == "host"
        vmu.free_arena(b)
        vmu.page_in(a)
        assert torch.equal(a.bytes(1000), pattern)


def test_snapshot_restore_and_fork(small_vmu: VMU) -> None:
    a = small_vmu.alloc_arena("a", 256 * 1024)
    pattern = fill(a, 10_000, seed=6)
    ck = small_vmu.snapshot(a)
    assert isinstance(ck, HostCopy) and ck.nbytes == 10_000
    fill(a, 20_000, seed=7)  # overwrite after the snapshot
    ck.wait()
    small_vmu.restore(a, ck)
    assert a.used_nbytes == 10_000 and torch.equal(a.bytes(10_000), pattern)
    b = small_vmu.alloc_arena("fork", 64 * 1024)  # a fork: the checkpoint restored into another arena
    small_vmu.restore(b, ck).wait()
    assert torch.equal(b.bytes(10_000), pattern)
    tiny = small_vmu.alloc_arena("tiny", 4096)
    with pytest.raises(BadArgument, match="grow the arena"):
        small_vmu.restore(tiny, ck)
    st_ = small_vmu.stat()["checkpoint"]
    assert st_["out"]["ops"] == 1 and st_["in"]["ops"] == 2
    small_vmu.free_host(ck)
    with pytest.raises(NotFound):
        small_vmu.free_host(ck)
    with pytest.raises(NotFound):
        small_vmu.restore(a, ck)
    small_vmu.poll()
    assert small_vmu.stat()["segments"]["host"]["used_nbytes"] == 0


def test_restore_waits_for_its_snapshot_in_flight(small_vmu: VMU) -> None:
    a = small_vmu.alloc_arena("a", 256 * 1024)
    pattern = fill(a, 50_000, seed=8)
    gate = Gate()
    small_vmu._d2h.wait(gate)
    ck = small_vmu.snapshot(a, ordered=False)  # returns at once although the copy is held
    assert not ck.query()
    b = small_vmu.alloc_arena("b", 256 * 1024)
    threading.Timer(0.05, gate.open).start()
    small_vmu.restore(b, ck)  # on CPU this returns once compute may touch b: after the copies
    assert torch.equal(b.bytes(50_000), pattern)


@pytest.mark.parametrize("viewed", [True, False])
def test_ordered_snapshot_is_not_overtaken_by_later_writes(small_vmu: VMU, viewed: bool) -> None:
    a = small_vmu.alloc_arena("a", 256 * 1024)
    pattern = fill(a, 100_000, seed=11)
    if not viewed:  # a fresh page-in: nothing has viewed the arena since
        small_vmu.page_out(a)
        small_vmu.page_in(a)
        a._fence.wait()
        assert not a._touched
    gate = Gate()
    small_vmu._d2h.wait(gate)
    threading.Timer(0.1, gate.open).start()
    ck = small_vmu.snapshot(a)  # viewed: blocks here on CPU; not viewed: the next view() waits instead
    fill(a, 100_000, seed=12)  # a write below used_nbytes right after the snapshot
    ck.wait()
    assert torch.equal(small_vmu.host.bytes_at(ck.host_offset, 100_000), pattern)


def test_freeing_a_swapped_arena_waits_for_its_copy_before_reusing_host_memory() -> None:
    with make_vmu(data=4 * MiB, host=1 * MiB) as vmu:
        gate = Gate()
        a = vmu.alloc_arena("a", 1 * MiB)
        fill(a, 1 * MiB, seed=9)
        vmu._d2h.wait(gate)
        vmu.page_out(a)
        vmu.free_arena(a)
        assert vmu.stat()["segments"]["host"]["pending_free_nbytes"] == 1 * MiB
        gate.open()
        b = vmu.alloc_arena("b", 1 * MiB)
        fill(b, 1 * MiB, seed=10)
        vmu.page_out(b).wait()  # needs the host range a's copy was writing


class PagingMachine(RuleBasedStateMachine):
    """Random interleavings of every VMU operation on a small CPU VMU whose copies are held in flight by
    self-opening gates. The model keeps each arena's and checkpoint's expected bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.vmu = make_vmu(data=256 * 1024, host=192 * 1024)
        self.arenas: dict[int, tuple[Arena, torch.Tensor]] = {}  # id -> (arena, expected used bytes)
        self.checkpoints: list[tuple[HostCopy, torch.Tensor]] = []
        self.unordered: dict[int, list[HostCopy]] = {}  # arena id -> snapshot(ordered=False) copies to honour
        self.seed = 0

    # Draws never depend on the state: copies finish at different times from run to run, so allocations
    # land elsewhere and OOMs differ, and hypothesis needs the same draws to replay an example.
    def _pick(self, data: st.DataObject, residency: str) -> tuple[Arena, torch.Tensor] | None:
        ids = sorted(i for i, (a, _) in self.arenas.items() if a.residency == residency)
        i = data.draw(st.integers(0, 1 << 16))
        return self.arenas[ids[i % len(ids)]] if ids else None

    @initialize(sizes=st.lists(st.integers(1, 96 * 1024), min_size=1, max_size=3))
    def some_sessions(self, sizes: list[int]) -> None:
        for n in sizes:
            self._alloc(n, 1.0)

    @rule(nbytes=st.integers(1, 96 * 1024), frac=st.floats(0, 1))
    def alloc(self, nbytes: int, frac: float) -> None:
        self._alloc(nbytes, frac)

    def _alloc(self, nbytes: int, frac: float) -> None:
        try:
            a = self.vmu.alloc_arena(f"s{len(self.arenas)}", nbytes)
        except OutOfMemory:
            alloc = self.vmu.data.allocator
            assert alloc.largest_free_nbytes < alloc.round_up(nbytes) and not self.vmu.data.pending_free_nbytes
            return
        self.seed += 1
        self.arenas[a.id] = (a, fill(a, int(a.nbytes * frac), seed=self.seed))  # scribbles at once, as sessions do

    @rule(data=st.data(), frac=st.floats(0, 1))
    def write(self, data: st.DataObject, frac: float) -> None:
        picked = self._pick(data, "device")
        if picked is None:
            return
        a, _ = picked
        for ck in self.unordered.pop(a.id, []):
            ck.wait()  # the contract of snapshot(ordered=False): no write below used_nbytes until it is done
        n = int(a.nbytes * frac)
        self.seed += 1
        self.arenas[a.id] = (a, fill(a, n, seed=self.seed))
        a.reset_used(n)

    @rule(which=st.sampled_from(["d2h", "h2d"]), delay_ms=st.integers(0, 20))
    def hold_stream(self, which: str, delay_ms: int) -> None:
        getattr(self.vmu, f"_{which}").wait(TimedGate(delay_ms / 1e3))

    @rule(data=st.data())
    def page_out(self, data: st.DataObject) -> None:
        picked = self._pick(data, "device")
        if picked is None:
            return
        try:
            self.vmu.page_out(picked[0])
        except OutOfMemory:
            assert picked[0].residency == "device"

    @rule(data=st.data())
    def page_in(self, data: st.DataObject) -> None:
        picked = self._pick(data, "host")
        if picked is None:
            return
        try:
            self.vmu.page_in(picked[0])
        except OutOfMemory:
            assert picked[0].residency == "host"

    @rule(data=st.data(), extra=st.integers(1, 64 * 1024))
    def grow(self, data: st.DataObject, extra: int) -> None:
        picked = self._pick(data, data.draw(st.sampled_from(["device", "host"])))
        if picked is None:
            return
        nbytes = picked[0].nbytes
        try:
            self.vmu.grow_arena(picked[0], nbytes + extra)
        except OutOfMemory:
            assert picked[0].nbytes == nbytes  # a failed grow changes nothing

    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        picked = self._pick(data, data.draw(st.sampled_from(["device", "host"])))
        if picked is not None:
            self.vmu.free_arena(picked[0])
            del self.arenas[picked[0].id]

    @rule(data=st.data(), ordered=st.booleans())
    def snapshot(self, data: st.DataObject, ordered: bool) -> None:
        picked = self._pick(data, "device")
        if picked is None:
            return
        try:
            ck = self.vmu.snapshot(picked[0], ordered=ordered)
        except OutOfMemory:
            return
        self.checkpoints.append((ck, picked[1].clone()))
        if not ordered:
            self.unordered.setdefault(picked[0].id, []).append(ck)

    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, 1 << 16))
        picked = self._pick(data, "device")
        if picked is None or not self.checkpoints:
            return
        ck, expected = self.checkpoints[i % len(self.checkpoints)]
        if ck.nbytes > picked[0].nbytes:
            return
        self.vmu.restore(picked[0], ck)
        self.arenas[picked[0].id] = (picked[0], expected.clone())

    @rule(data=st.data())
    def free_host(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, 1 << 16))
        if self.checkpoints:
            self.vmu.free_host(self.checkpoints.pop(i % len(self.checkpoints))[0])

    @rule()
    def poll(self) -> None:
        self.vmu.poll()

    @invariant()
    def contents_and_accounting(self) -> None:
        """Reads raw segment bytes, never through view(), so that copies stay in flight across steps."""
        vmu = self.vmu

        def settled(fence: object) -> bool:
            return fence is None or fence.query()  # type: ignore[attr-defined]

        for a, expected in self.arenas.values():
            n = expected.numel()
            assert a.used_nbytes == n
            if not n or not settled(a._fence):
                continue
            seg, offset = (vmu.data, a.offset) if a.residency == "device" else (vmu.host, a.host_offset)
            assert torch.equal(seg.bytes_at(offset, n), expected), f"{a} lost its contents"
        for ck, expected in self.checkpoints:
            if expected.numel() and ck.query():
                got = vmu.host.bytes_at(ck.host_offset, expected.numel())
                assert torch.equal(got, expected), f"{ck}: the checkpoint is corrupt"
        with vmu._lock:
            vmu.data.allocator.check()
            vmu.host.allocator.check()
            resident = sum(a.nbytes for a, _ in self.arenas.values() if a.residency == "device")
            assert vmu.data.allocator.used_nbytes == resident + vmu.data.pending_free_nbytes
            held = sum(vmu.host.allocator.round_up(a.used_nbytes) for a, _ in self.arenas.values()
                       if a.residency == "host")
            held += sum(vmu.host.allocator.round_up(ck.nbytes) for ck, _ in self.checkpoints)
            assert vmu.host.allocator.used_nbytes == held + vmu.host.pending_free_nbytes

    def teardown(self) -> None:
        """Every arena, paged in or not, still holds its bytes once all copies are done."""
        try:
            for a, expected in self.arenas.values():
                if a.residency == "host":
                    try:
                        self.vmu.page_in(a)
                    except OutOfMemory:  # no device room for it: its bytes must still be in the host pool
                        if expected.numel():  # (an arena that never held a byte has no host range)
                            a._fence.wait()
                            assert torch.equal(self.vmu.host.bytes_at(a.host_offset, expected.numel()), expected)
                        continue
                assert torch.equal(a.bytes(expected.numel()), expected), f"{a} lost its contents"
        finally:
            self.vmu.close()


PagingMachine.TestCase.settings = settings(max_examples=75, stateful_step_count=40, deadline=None)
TestPagingMachine = PagingMachine.TestCase


def test_touch_orders_compute_after_a_page_in_in_flight() -> None:
    """touch() is view() without the view: a caller that keeps its views still waits for the copy into them."""
    with make_vmu(data=4 * MiB, host=4 * MiB) as vmu:
        gate = Gate()
        a = vmu.alloc_arena("a", 1 * MiB)
        pattern = fill(a, 500_000, seed=4)
        vmu.finish(vmu.page_out(a))
        vmu._h2d.wait(gate)
        inn = vmu.page_in(a)
        assert a._in_fence is not None and not inn.query()
        threading.Timer(0.05, gate.open).start()
        a.touch()  # on CPU, compute is this thread: it blocks until the page-in is done
        assert inn.query() and a._in_fence is None and a._touched
        assert torch.equal(a.bytes(500_000), pattern)
        vmu.finish(vmu.page_out(a))
        with pytest.raises(Busy, match="swapped out"):
            a.touch()
        vmu.free_arena(a)
        with pytest.raises(NotFound, match="freed"):
            a.touch()


def test_compute_after_a_move_waits_for_it(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A grow that moves the arena copies on the stream the arena was last used on; compute that comes next,
    on whatever stream (a session's work and a kernel's bookkeeping may differ), waits for that copy."""
    with make_vmu(data=4 * MiB, host=4 * MiB) as vmu:
        a = vmu.alloc_arena("a", 64 * 1024)
        vmu.alloc_arena("b", 64 * 1024)  # right after a: a cannot grow in place
        pattern = fill(a, 10_000, seed=5)
        gate = Gate()
        monkeypatch.setattr(vmu.backend, "compute_fence", lambda stream=None: gate)  # the move's copy, in flight
        vmu.grow_arena(a, 256 * 1024)
        assert a.generation == 1 and a._in_fence is gate
        threading.Timer(0.05, gate.open).start()
        a.touch()  # on CPU, compute is this thread: it blocks until the move is done
        assert gate.query() and a._in_fence is None
        assert torch.equal(a.bytes(10_000), pattern)
