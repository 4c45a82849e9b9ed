"""RangeAllocator: variable-size, aligned ranges of one address space, with a coalescing free list.

Pure Python, no torch: the Data segment, the Text segment and the host pool each
own one. Rules:
  - every range (free or used) starts and ends on a multiple of `align`;
  - no two free ranges touch: a freed range merges with its free neighbours at once,
    except the few held back for reuse (below), which merge before anything could
    tell the difference;
  - used + free == capacity, always; a failed alloc changes nothing;
  - alloc fails (OutOfMemory) only when no free range is large enough.

How it is O(1)/O(log n) (TLSF, "two-level segregated fit"): free ranges are filed
in size classes, 16 per power of two, and a bitmap (one Python int) says which
classes are non-empty, so the first class whose every member fits is one
`m & -m` away. Neighbours are found through two dicts (start -> size, end -> start),
so freeing and coalescing are O(1). A request that falls inside a class scans at
most SCAN_LIMIT members of that class first, so repeated same-size requests reuse
same-size holes. The largest free range is cached with the number of free ranges of
that size; alloc and free keep it exact in O(1), and when the last range of that size
goes it is found again, at the next query only, in the top non-empty class (classes
are ordered by size, so the largest free range is one of that class's members).

Quick reuse: up to `quick_limit` freed ranges (default QUICK_LIMIT) are held back,
unmerged, and the next request of exactly their size takes the latest of them
(LIFO), with no merge on free and no split on alloc. Session churn is that case:
every session of a model gets the same arena size. They count as free in every
figure. Anything that could see that they are not merged (largest_free_nbytes and
what derives from it, free_ranges, n_free_ranges, try_extend, alloc_at, an alloc
that finds no other fit) first merges them, as free would have; alloc_at of exactly
such a range (a page-in back to its old addresses) takes it as it is.

Not thread-safe: the owner (the VMU) serialises calls under its lock.
"""

from __future__ import annotations

from ..errors import BadArgument, OutOfMemory

__all__ = ["AT_SCAN_LIMIT", "QUICK_LIMIT", "RangeAllocator", "SL_BITS", "SCAN_LIMIT"]

SL_BITS = 4  # 2**SL_BITS size classes per power of two: a class spans at most 1/16 of its lower bound
SCAN_LIMIT = 8  # members of the request's own class inspected for a fit before taking a larger class
AT_SCAN_LIMIT = 64  # free ranges alloc_at inspects, at most, for the one holding the span it wants
QUICK_LIMIT = 8  # freed ranges held back, unmerged, for the next request of their exact size


def _class_of(units: int) -> int:
    """Size class of a range of `units` alignment units (units >= 1). Classes 0..15 are exact."""
    if units < (1 << SL_BITS):
        return units
    fl = units.bit_length() - 1
    return ((fl - SL_BITS + 1) << SL_BITS) | ((units >> (fl - SL_BITS)) & ((1 << SL_BITS) - 1))


def _class_at_least(units: int) -> int:
    """First class whose every member has at least `units` units."""
    if units < (1 << SL_BITS):
        return units
    fl = units.bit_length() - 1
    return _class_of(units + (1 << (fl - SL_BITS)) - 1)


class RangeAllocator:
    """Ranges of [0, capacity) handed out in multiples of `align` bytes (a power of two).

    `alloc(nbytes) -> offset` raises OutOfMemory (nothing changed) or BadArgument (nbytes <= 0);
    `free(offset) -> nbytes` raises BadArgument for an offset it did not hand out (double free).
    `quick_limit`: how many freed ranges may wait unmerged for a request of their size (0: none).
    """

    __slots__ = (
        "name", "capacity", "align", "_shift", "_used", "_free_start", "_free_end",
        "_classes", "_bitmap", "_bits", "_largest", "_n_largest", "_memo", "used_nbytes",
        "quick_limit", "_quick", "_n_quick",
    )

    def __init__(self, capacity: int, align: int = 256, *, name: str = "range",
                 quick_limit: int = QUICK_LIMIT) -> None:
        if align <= 0 or align & (align - 1):
            raise BadArgument(f"{name}: align must be a power of two, got {align}")
        if capacity < 0:
            raise BadArgument(f"{name}: capacity must be >= 0, got {capacity}")
        if quick_limit < 0:
            raise BadArgument(f"{name}: quick_limit must be >= 0, got {quick_limit}")
        self.name = name
        self.align = align
        self._shift = align.bit_length() - 1
        self.capacity = capacity & ~(align - 1)  # a partial last unit is never handed out
        self._used: dict[int, int] = {}  # start -> nbytes of ranges handed out
        self._free_start: dict[int, int] = {}  # start -> nbytes of free ranges
        self._free_end: dict[int, int] = {}  # end -> start of free ranges (for the left neighbour)
        # class -> {start: nbytes}, insertion ordered; one dict per class that any range of [0, capacity) can
        # fall in, kept when empty, so filing a range never creates or drops a dict
        self._classes: list[dict[int, int]] = [{} for _ in range(_class_of(self.capacity >> self._shift) + 1)]
        self._bitmap = 0  # bit c set <=> class c non-empty
        self._bits = [1 << c for c in range(len(self._classes))]  # bit of class c: `^` flips it without new masks
        # Every free range is <= _largest, and exactly _n_largest of them are == _largest. Filing a range of
        # size s: s > _largest -> (s, 1); s == _largest -> count + 1. Unfiling one of size _largest: count - 1.
        # A count of 0 (the last one went) says "all are smaller": largest_free_nbytes then searches again.
        self._largest = 0
        self._n_largest = 0
        self._memo: dict[int, tuple[int, int]] = {}  # aligned size -> (own class, fitting class)
        self.used_nbytes = 0  # quick ranges are not used: they count as free
        self.quick_limit = quick_limit
        self._quick: dict[int, list[int]] = {}  # aligned size -> starts of freed ranges held back (no empty lists)
        self._n_quick = 0
        if self.capacity:
            self._insert(0, self.capacity)

    # ----------------------------------------------------------------- figures
    @property
    def free_nbytes(self) -> int:
        return self.capacity - self.used_nbytes

    @property
    def largest_free_nbytes(self) -> int:
        """The largest free range, exact. O(1) while cached; else O(members of the top non-empty class)."""
        if self._n_quick:
            self.merge_quick()
        if not self._n_largest:
            bitmap = self._bitmap
            if not bitmap:
                return 0
            sizes = list(self._classes[bitmap.bit_length() - 1].values())
            self._largest = largest = max(sizes)
            self._n_largest = sizes.count(largest)
        return self._largest

    @property
    def largest_free_fraction(self) -> float:
        """largest free range / total free: 1.0 when the free space is one range (or there is none)."""
        free = self.free_nbytes
        return self.largest_free_nbytes / free if free else 1.0

    @property
    def fragmentation(self) -> float:
        """1 - largest_free_fraction: 0.0 unfragmented, towards 1.0 as free space splinters."""
        return 1.0 - self.largest_free_fraction

    @property
    def n_free_ranges(self) -> int:
        if self._n_quick:
            self.merge_quick()
        return len(self._free_start)

    @property
    def n_used_ranges(self) -> int:
        return len(self._used)

    def size_of(self, offset: int) -> int:
        """Bytes of the used range starting at `offset`; BadArgument if there is none."""
        try:
            return self._used[offset]
        except KeyError:
            raise BadArgument(f"{self.name}: no allocated range starts at offset {offset}") from None

    def round_up(self, nbytes: int) -> int:
        return (nbytes + self.align - 1) & ~(self.align - 1)

    # ------------------------------------------------------------- alloc/free
    def _classes_for(self, size: int) -> tuple[int, int]:
        """(own class, first class that surely fits) for an aligned size; memoised (sizes repeat)."""
        pair = self._memo.get(size)
        if pair is None:
            units = size >> self._shift
            pair = (_class_of(units), _class_at_least(units))
            if len(self._memo) >= 4096:
                self._memo.clear()
            self._memo[size] = pair
        return pair

    def alloc(self, nbytes: int) -> int:
        """Offset of a new range of `nbytes` rounded up to `align`. OutOfMemory if none fits."""
        if nbytes <= 0:
            raise BadArgument(f"{self.name}: allocation size must be > 0 bytes, got {nbytes}")
        align = self.align
        size = (nbytes + align - 1) & -align
        held = self._quick.get(size)
        if held is not None:  # a freed range of exactly this size, held back: no search, no split
            return self._take_held(size, held, held.pop())
        memo, classes, bitmap = self._memo, self._classes, self._bitmap
        own, fit = memo.get(size) or self._classes_for(size)
        start = -1
        if fit != own and (bitmap >> own) & 1:
            start = self._scan(classes[own], size, SCAN_LIMIT)
        if start < 0:
            above = bitmap >> fit
            if above & 1:
                start = next(iter(classes[fit]))
            elif above:
                start = next(iter(classes[fit + (above & -above).bit_length() - 1]))
            elif fit != own and (bitmap >> own) & 1:
                start = self._scan(classes[own], size, None)  # near-full: look at every member
            if start < 0:
                if self._n_quick:  # merged, the ranges held back may make room
                    self.merge_quick()
                    return self.alloc(nbytes)
                raise OutOfMemory(
                    f"{self.name}", requested_nbytes=size,
                    largest_free_nbytes=self.largest_free_nbytes, total_free_nbytes=self.free_nbytes,
                )
        # Unfile the free range [start, +have) and refile its tail, if any, inline (the hot path). The tail
        # is smaller than the range, so the largest-range count can only lose the range itself.
        free_start = self._free_start
        have = free_start.pop(start)
        cls = (memo.get(have) or self._classes_for(have))[0]
        members = classes[cls]
        del members[start]
        if have == self._largest:
            self._n_largest -= 1
        if have > size:
            tail, rest = start + size, have - size
            free_start[tail] = rest
            self._free_end[tail + rest] = tail
            rest_cls = (memo.get(rest) or self._classes_for(rest))[0]
            if rest_cls != cls:
                if not members:
                    bitmap ^= self._bits[cls]
                members = classes[rest_cls]
                if not members:
                    bitmap ^= self._bits[rest_cls]
                self._bitmap = bitmap
            members[tail] = rest
        else:
            del self._free_end[start + have]
            if not members:
                self._bitmap = bitmap ^ self._bits[cls]
        self._used[start] = size
        self.used_nbytes += size
        return start

    def free(self, offset: int) -> int:
        """Return the range at `offset`: held back for a request of its size while fewer than quick_limit
        are, else merged with its free neighbours. Returns its size in bytes."""
        size = self._used.pop(offset, 0)
        if not size:
            raise BadArgument(f"{self.name}: free of offset {offset}, which is not an allocated range "
                              "(double free?)")
        self.used_nbytes -= size
        if self._n_quick < self.quick_limit:
            held = self._quick.get(size)
            if held is None:
                self._quick[size] = [offset]
            else:
                held.append(offset)
            self._n_quick += 1
            return size
        return self._merge_free(offset, size)

    def _take_held(self, size: int, held: list[int], start: int) -> int:
        """Hand out `start`, just taken off `held`, the list of the ranges of `size` held back."""
        if not held:
            del self._quick[size]
        self._n_quick -= 1
        self._used[start] = size
        self.used_nbytes += size
        return start

    def merge_quick(self) -> None:
        """Merge every range held back for quick reuse into the free lists, as free would have."""
        quick, self._quick, self._n_quick = self._quick, {}, 0
        for size, starts in quick.items():
            for offset in starts:
                self._merge_free(offset, size)

    def _merge_free(self, offset: int, size: int) -> int:
        """File the free range [offset, +size) (already counted as free), merged with its free neighbours."""
        free_start, free_end = self._free_start, self._free_end
        end = offset + size
        right = free_start.get(end)
        left = free_end.get(offset)
        # A merge replaces one free range [old, +old_size) by a larger one [start, +new_size) that shares its
        # start (left merge) or its end (right merge only): fewer dict operations than unfile + file.
        if left is None:
            if right is None:  # no free neighbour: file it as it is (_insert, inline: the hot path)
                free_start[offset] = size
                free_end[end] = offset
                cls = (self._memo.get(size) or self._classes_for(size))[0]
                members = self._classes[cls]
                if not members:
                    self._bitmap ^= self._bits[cls]
                members[offset] = size
                largest = self._largest
                if size > largest:
                    self._largest, self._n_largest = size, 1
                elif size == largest:
                    self._n_largest += 1
                return size
            old, old_size, start, new_size = end, right, offset, size + right
            del free_start[end]
            free_start[offset] = new_size
            free_end[end + right] = offset
        else:
            if right is not None:
                self._remove(end)
                end += right
            old, old_size, start, new_size = left, offset - left, left, end - left
            free_start[left] = new_size
            del free_end[offset]
            free_end[end] = left
        memo, classes = self._memo, self._classes
        old_cls = (memo.get(old_size) or self._classes_for(old_size))[0]
        cls = (memo.get(new_size) or self._classes_for(new_size))[0]
        members = classes[old_cls]
        if cls == old_cls:
            if start != old:
                del members[old]
        else:
            del members[old]
            bits = self._bits
            if not members:
                self._bitmap ^= bits[old_cls]
            members = classes[cls]
            if not members:
                self._bitmap ^= bits[cls]
        members[start] = new_size
        largest = self._largest  # old_size < new_size <= largest means the old range was not counted
        if new_size > largest:
            self._largest, self._n_largest = new_size, 1
        elif new_size == largest:
            self._n_largest += 1
        return size

    def try_extend(self, offset: int, nbytes: int) -> bool:
        """Grow the used range at `offset` in place to `nbytes` (rounded up) if the free range right
        after it has room. True on success; False (nothing changed) otherwise. Never shrinks."""
        old = self.size_of(offset)
        if self._n_quick:
            self.merge_quick()
        size = self.round_up(nbytes)
        if size <= old:
            return True
        end = offset + old
        have = self._free_start.get(end)
        if have is None or have < size - old:
            return False
        self._remove(end)
        if have > size - old:
            self._insert(offset + size, have - (size - old))
        self._used[offset] = size
        self.used_nbytes += size - old
        return True

    def alloc_at(self, offset: int, nbytes: int) -> bool:
        """Hand out exactly [offset, offset + nbytes rounded up) if all of it is free: True, else False
        (nothing changed). For putting a range back where it was (a page-in to the arena's old
        addresses). The free range holding it is looked for among at most AT_SCAN_LIMIT members of the
        classes large enough to hold it, so this is O(1); a span it does not find is reported as not free."""
        if nbytes <= 0:
            raise BadArgument(f"{self.name}: allocation size must be > 0 bytes, got {nbytes}")
        size = self.round_up(nbytes)
        if self._n_quick:
            held = self._quick.get(size)
            if held is not None and offset in held:  # exactly a range held back (a page-in to its old range)
                held.remove(offset)
                self._take_held(size, held, offset)
                return True
            self.merge_quick()
        end = offset + size
        if offset < 0 or offset % self.align or end > self.capacity:
            return False
        start = offset if offset in self._free_start else -1
        if start < 0:  # the span lies inside a free range, in a class at least as large as the span's
            cls = self._classes_for(size)[0]
            bitmap = self._bitmap >> cls
            looked = 0
            while bitmap and start < 0 and looked < AT_SCAN_LIMIT:
                skip = (bitmap & -bitmap).bit_length() - 1
                cls += skip
                for s, have in self._classes[cls].items():
                    if s <= offset and end <= s + have:
                        start = s
                        break
                    looked += 1
                    if looked >= AT_SCAN_LIMIT:
                        break
                cls += 1
                bitmap >>= skip + 1
            if start < 0:
                return False
        have = self._free_start[start]
        if end > start + have:
            return False
        self._remove(start)
        if start < offset:
            self._insert(start, offset - start)
        if end < start + have:
            self._insert(end, start + have - end)
        self._used[offset] = size
        self.used_nbytes += size
        return True

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _scan(members: dict[int, int], size: int, limit: int | None) -> int:
        """Best fit among the first `limit` members (all if None); -1 if none fits."""
        best, best_size = -1, 0
        for i, (start, have) in enumerate(members.items()):
            if limit is not None and i >= limit:
                break
            if have >= size and (best < 0 or have < best_size):
                best, best_size = start, have
                if have == size:
                    break
        return best

    def _insert(self, start: int, size: int) -> None:
        self._free_start[start] = size
        self._free_end[start + size] = start
        cls = (self._memo.get(size) or self._classes_for(size))[0]
        members = self._classes[cls]
        if not members:
            self._bitmap ^= self._bits[cls]
        members[start] = size
        largest = self._largest
        if size > largest:
            self._largest, self._n_largest = size, 1
        elif size == largest:
            self._n_largest += 1

    def _remove(self, start: int) -> int:
        size = self._free_start.pop(start)
        del self._free_end[start + size]
        cls = (self._memo.get(size) or self._classes_for(size))[0]
        members = self._classes[cls]
        del members[start]
        if not members:
            self._bitmap ^= self._bits[cls]
        if size == self._largest:
            self._n_largest -= 1
        return size

    # ------------------------------------------------------- for tests/debug
    def free_ranges(self) -> list[tuple[int, int]]:
        """Sorted (start, nbytes) of free ranges, the ones held back merged first. O(n log n); for tests and
        debugging."""
        if self._n_quick:
            self.merge_quick()
        return sorted(self._free_start.items())

    def used_ranges(self) -> list[tuple[int, int]]:
        """Sorted (start, nbytes) of used ranges. O(n log n); for tests and debugging."""
        return sorted(self._used.items())

    def check(self) -> None:
        """Assert every invariant (O(n log n)); changes nothing. Raises AssertionError naming the first broken one."""
        a = self.align
        quick = [(o, s, "quick") for s, starts in self._quick.items() for o in starts]
        assert all(self._quick.values()), "an empty list of ranges held back"
        assert len(quick) == self._n_quick <= self.quick_limit, "count of ranges held back drifted"
        spans = sorted([(o, s, "used") for o, s in self._used.items()]
                       + [(o, s, "free") for o, s in self._free_start.items()] + quick)
        pos = 0
        prev_kind = None
        for o, s, kind in spans:
            assert o % a == 0 and s % a == 0 and s > 0, f"unaligned or empty {kind} range {o}+{s}"
            assert o == pos, f"{'gap' if o > pos else 'overlap'} at {pos}: next range starts at {o}"
            assert not (kind == prev_kind == "free"), f"adjacent free ranges at {o} were not coalesced"
            pos, prev_kind = o + s, kind
        assert pos == self.capacity, f"ranges end at {pos}, capacity is {self.capacity}"
        assert self.used_nbytes == sum(self._used.values()), "used_nbytes drifted"
        assert self.used_nbytes + sum(self._free_start.values()) + sum(s for _, s, _ in quick) == self.capacity, \
            "used + free != capacity"
        assert {e: o for o, s in self._free_start.items() for e in [o + s]} == self._free_end, "end index drifted"
        filed = {o: s for members in self._classes for o, s in members.items()}
        assert filed == self._free_start, "size classes drifted from the free list"
        for cls, members in enumerate(self._classes):
            assert bool(members) == bool((self._bitmap >> cls) & 1), f"bitmap bit {cls} disagrees with its class"
            assert all(_class_of(s >> self._shift) == cls for s in members.values()), f"misfiled in class {cls}"
        assert self._bitmap >> len(self._classes) == 0, "bitmap has bits past the last class"
        sizes = list(self._free_start.values())  # the largest-range cache, read without refreshing it
        assert all(s <= self._largest for s in sizes), "a free range is larger than the cached largest"
        assert sizes.count(self._largest) == self._n_largest, "cached count of the largest free range drifted"
