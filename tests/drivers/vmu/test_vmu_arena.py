"""Arenas as memory: views inside the Data segment, the high-water mark, growth, errors, the Text segment."""

from __future__ import annotations

import pytest
import torch

from djinn.drivers.errors import BadArgument, Busy, NotFound, OutOfMemory
from djinn.drivers.vmu import VMU
from tests.drivers.vmu.fakes import MiB, fill


def _ptr_range(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def test_views_lie_inside_the_arena_inside_the_data_segment(small_vmu: VMU) -> None:
    a = small_vmu.alloc_arena("s1", 1 * MiB)
    b = small_vmu.alloc_arena("s2", 1 * MiB)
    seg_lo, seg_hi = _ptr_range(small_vmu.data.tensor)
    for arena in (a, b):
        lo, hi = arena.device_range()
        assert seg_lo <= lo < hi <= seg_hi
        for dtype, shape, offset in [(torch.float32, (16, 8), 0), (torch.bfloat16, (3,), 1024),
                                     (torch.uint8, (MiB - 7,), 7), (torch.int64, (1,), MiB - 8)]:
            v = arena.view(dtype, shape, offset)
            assert v.dtype == dtype and tuple(v.shape) == shape and v.is_contiguous()
            vlo, vhi = _ptr_range(v)
            assert vlo == lo + offset and vhi <= hi
    a_lo, a_hi = a.device_range()
    b_lo, b_hi = b.device_range()
    assert a_hi <= b_lo or b_hi <= a_lo, "two arenas overlap"


def test_view_writes_land_in_the_segment(small_vmu: VMU) -> None:
    a = small_vmu.alloc_arena("s", 64 * 1024)
    a.view(torch.int32, (4,), 256).copy_(torch.tensor([1, 2, 3, 4], dtype=torch.int32))
    raw = small_vmu.data.tensor[a.offset + 256: a.offset + 272]
    assert raw.view(torch.int32).tolist() == [1, 2, 3, 4]


def test_view_argument_errors(small_vmu: VMU) -> None:
    a = small_vmu.alloc_arena("s", 4096)
    with pytest.raises(BadArgument, match="arena has 4096 bytes"):
        a.view(torch.float32, (1025,))
    with pytest.raises(BadArgument):
        a.view(torch.float32, (2,), 2)  # misaligned for float32
    with pytest.raises(BadArgument):
        a.view(torch.uint8, (1,), -1)
    with pytest.raises(BadArgument):
        a.mark_used(4097)


def test_mark_used_is_a_high_water_mark(small_vmu: VMU) -> None:
    a = small_vmu.alloc_arena("s", 4096)
    assert a.used_nbytes == 0
    a.mark_used(100)
    a.mark_used(50)
    assert a.used_nbytes == 100
    a.reset_used(10)
    assert a.used_nbytes == 10


def test_default_arena_size_comes_from_the_constructor() -> None:
    with VMU("cpu", text_nbytes=0, data_nbytes=4 * MiB, stack_nbytes=0, host_nbytes=MiB,
             session_arena_nbytes="256KiB") as vmu:
        assert vmu.alloc_arena("s").nbytes == 256 * 1024


def test_swapped_and_freed_arenas_refuse_views(small_vmu: VMU) -> None:
    a = small_vmu.alloc_arena("s", 4096)
    fill(a, 100, seed=1)
    small_vmu.page_out(a).wait()
    assert a.residency == "host"
    with pytest.raises(Busy, match="swapped out"):
        a.view(torch.uint8, (1,))
    with pytest.raises(Busy):
        a.mark_used(1)
    small_vmu.free_arena(a)
    assert a.residency == "none"
    with pytest.raises(NotFound, match="freed"):
        a.view(torch.uint8, (1,))
    with pytest.raises(NotFound):
        small_vmu.free_arena(a)


def test_grow_in_place_keeps_generation(small_vmu: VMU) -> None:
    a = small_vmu.alloc_arena("s", 64 * 1024)
    pattern = fill(a, 1000, seed=2)
    off = a.offset
    small_vmu.grow_arena(a, 128 * 1024)
    assert (a.offset, a.generation, a.nbytes) == (off, 0, 128 * 1024)
    assert torch.equal(a.bytes(1000), pattern)


def test_grow_by_move_preserves_contents_and_bumps_generation(small_vmu: VMU) -> None:
    a = small_vmu.alloc_arena("a", 64 * 1024)
    small_vmu.alloc_arena("blocker", 4096)  # right after a: forces a move
    pattern = fill(a, 5000, seed=3)
    old = a.offset
    small_vmu.grow_arena(a, 256 * 1024)
    assert a.offset != old and a.generation == 1 and a.nbytes == 256 * 1024
    assert torch.equal(a.bytes(5000), pattern)
    small_vmu.poll()
    assert small_vmu.data.allocator.used_nbytes == 256 * 1024 + 4096  # the old range came back
    with pytest.raises(BadArgument):
        small_vmu.grow_arena(a, 1024)


def test_grow_of_a_swapped_arena_raises_its_reservation(small_vmu: VMU) -> None:
    a = small_vmu.alloc_arena("a", 64 * 1024)
    pattern = fill(a, 3000, seed=4)
    small_vmu.page_out(a).wait()
    small_vmu.grow_arena(a, 512 * 1024)
    small_vmu.page_in(a).wait()
    assert a.nbytes == 512 * 1024 and torch.equal(a.bytes(3000), pattern)


def test_exhaustion_raises_out_of_memory_and_changes_nothing(small_vmu: VMU) -> None:
    small_vmu.alloc_arena("a", 3 * MiB)
    before = small_vmu.stat()
    with pytest.raises(OutOfMemory) as info:
        small_vmu.alloc_arena("b", 2 * MiB)
    e = info.value
    assert e.requested_nbytes == 2 * MiB and e.largest_free_nbytes == MiB and e.total_free_nbytes == MiB
    assert "data segment" in str(e) and e.errno == "ENOMEM"
    assert small_vmu.stat() == before
    assert small_vmu.can_allocate(MiB) and not small_vmu.can_allocate(MiB + 1)


def test_text_segment_alloc_view_free(small_vmu: VMU) -> None:
    text = small_vmu.text
    off = text.alloc(1000)
    w = text.view(torch.float16, (10, 50), off)
    w.fill_(1.5)
    lo, hi = _ptr_range(text.tensor)
    assert lo <= w.data_ptr() and w.data_ptr() + 1000 <= hi
    assert small_vmu.stat()["segments"]["text"]["used_nbytes"] == 1024
    text.free(off)
    assert small_vmu.stat()["segments"]["text"]["used_nbytes"] == 0
    with pytest.raises(OutOfMemory):
        text.alloc(2 * MiB)


def test_segments_are_single_preallocated_uint8_tensors(small_vmu: VMU) -> None:
    for seg in (small_vmu.text, small_vmu.data, small_vmu.host):
        assert seg.tensor.dtype == torch.uint8 and seg.tensor.dim() == 1 and seg.tensor.is_contiguous()
    assert small_vmu.data.tensor.numel() == 4 * MiB
