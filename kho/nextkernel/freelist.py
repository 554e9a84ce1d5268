"""The buddy free lists (``free_area[order]``) and how the next kernel fills them.

``memblock_free_all`` hands every free range ``[start, end)`` (pfns) to
``__free_pages_memory``, which frees blocks greedily: ``order = min(MAX_PAGE_ORDER,
ctz(start))`` (MAX_PAGE_ORDER when start is 0), lowered while ``start + 2**order > end``.
Freeing then merges a block with its free buddy, except across a zone/bank boundary
or between a CMA pageblock (KHO scratch areas become CMA) and an ordinary one.  The
result is the set of maximal naturally aligned blocks (at most ``2**MAX_PAGE_ORDER``
pages) inside each *segment* — a RAM bank cut at scratch-area boundaries — once
adjacent free ranges of a segment are joined.  :func:`mask_blocks` computes it from a
page mask (boot: every page of RAM at once), :func:`free_blocks` from ranges (the
remainders of split blocks); :class:`FreeArea` holds it per order.

Units: pfns (page frame numbers) and orders (log2 of a block's pages).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sortedcontainers import SortedList

from kho.memory import intervals
from kho.memory.physical import PhysicalMemory

#: The two free-list classes: ordinary memory, and the scratch areas (MIGRATE_CMA in
#: the kernel: only movable allocations, never preserved, so never handed out here).
NORMAL, SCRATCH = "normal", "scratch"


@dataclass(frozen=True)
class Segments:
    """RAM banks cut at scratch-area boundaries: buddies never merge across segments.

    ``start``/``end`` are pfns (uint64, sorted, disjoint), ``scratch`` tells whether the
    segment lies in a scratch area.
    """

    start: np.ndarray
    end: np.ndarray
    scratch: np.ndarray

    @classmethod
    def from_memory(cls, memory: PhysicalMemory) -> "Segments":
        """The segments of ``memory`` (:func:`kho.memory.intervals.ram_segments`)."""
        return cls(*intervals.ram_segments(memory))

    def boundaries(self) -> np.ndarray:
        """Every segment start and end (sorted, unique)."""
        return np.unique(np.concatenate([self.start, self.end]))

    def locate(self, pfn) -> np.ndarray:
        """Index of the segment holding each pfn; -1 outside RAM.  O(n log segments)."""
        return intervals.locate(self.start, self.end, pfn)


#: Sort keys of blocks: ``pfn | (2**order << _KEY_SHIFT)`` sorts by order, then pfn.
_KEY_SHIFT = np.uint64(48)
_PFN_MASK = np.uint64((1 << 48) - 1)


def _bit_blocks(base: np.ndarray, value: np.ndarray, ascending: bool) -> list[np.ndarray]:
    """Sort keys of the blocks for the set bits of ``value`` (each below 2**max_order).

    Ascending (low bits first), bit ``b`` is a block of order ``b`` at ``base`` plus the
    lower bits; descending, at ``base`` plus the higher bits.  One round per set bit,
    each on the ranges that still have one: O(blocks) numpy work.
    """
    live = np.flatnonzero(value)
    pos, rest = base[live], value[live]
    keys = []
    one = np.uint64(1)
    while pos.size:
        low = rest & (~rest + one)
        rest ^= low
        if ascending:
            keys.append(pos | (low << _KEY_SHIFT))
            pos += low
        else:
            keys.append((pos + rest) | (low << _KEY_SHIFT))
        more = rest != 0
        if not more.all():
            pos, rest = pos[more], rest[more]
    return keys


def _max_order_blocks(start: np.ndarray, count: np.ndarray, max_order: int) -> np.ndarray:
    """Sort keys of ``count[i]`` consecutive max_order blocks from each ``start[i]``."""
    has = np.flatnonzero(count)
    start, count = start[has], count[has].astype(np.int64)
    step = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    pfn = np.repeat(start, count) + (step.astype(np.uint64) << np.uint64(max_order))
    return pfn | (np.uint64(1 << max_order) << _KEY_SHIFT)


def free_blocks(start_pfn, end_pfn, max_order: int) -> list[np.ndarray]:
    """``__free_pages_memory`` of every range: the free blocks' pfns per order (sorted).

    Closed form of the greedy loop: with ``m`` the most aligned pfn in ``(start, end]``,
    the blocks from ``start`` up to ``m`` are the set bits of ``m - start`` from low to high,
    those from ``m`` to ``end`` the set bits of ``end - m`` from high to low, and every
    block above ``max_order`` is cut into ``max_order`` blocks.  Ranges must be disjoint,
    pfns below 2**48.  O(blocks) numpy work plus one sort of the blocks.
    """
    s, e = intervals.as_u64(start_pfn), intervals.as_u64(end_pfn)
    if not s.size:
        return [np.empty(0, np.uint64) for _ in range(max_order + 1)]
    top = np.frexp((s ^ e).astype(np.float64))[1].astype(np.uint64) - np.uint64(1)  # highest differing bit
    m = (e >> top) << top
    up, down = m - s, e - m
    big = np.uint64(max_order)
    low_mask = np.uint64((1 << max_order) - 1)
    up_low, down_high = up & low_mask, down & ~low_mask
    keys = _bit_blocks(s, up_low, True) + _bit_blocks(m + down_high, down & low_mask, False)
    # Whole max_order blocks: after the low blocks of ``up`` up to m, and from m upwards.
    keys.append(_max_order_blocks(s + up_low, up >> big, max_order))
    keys.append(_max_order_blocks(m, down >> big, max_order))
    keys = np.sort(np.concatenate(keys))
    bounds = np.searchsorted(keys, np.uint64(1) << (np.arange(max_order + 2, dtype=np.uint64) + _KEY_SHIFT))
    pfn = keys & _PFN_MASK
    return [pfn[bounds[o]:bounds[o + 1]] for o in range(max_order + 1)]


class FreeArea:
    """``free_area[0..max_order]`` of one class: the free blocks' head pfns per order.

    Each order is a sorted numpy array until a single-block operation needs it, then a
    :class:`~sortedcontainers.SortedList` (O(log n) add/remove/lowest), and an array again
    when a bulk operation asks for one.
    """

    def __init__(self, blocks: list[np.ndarray]):
        self.max_order = len(blocks) - 1
        self._arrays: list[np.ndarray | None] = [np.asarray(b, dtype=np.uint64) for b in blocks]
        self._lists: list[SortedList | None] = [None] * len(blocks)
        self._counts = [int(b.size) for b in self._arrays]

    # -- representation ---------------------------------------------------------------
    def array(self, order: int) -> np.ndarray:
        """The free blocks of ``order`` (sorted uint64 pfns; do not modify)."""
        if self._arrays[order] is None:
            self._arrays[order] = np.fromiter(self._lists[order], dtype=np.uint64, count=self._counts[order])
            self._lists[order] = None
        return self._arrays[order]

    def _list(self, order: int) -> SortedList:
        if self._lists[order] is None:
            self._lists[order] = SortedList(self._arrays[order].tolist())
            self._arrays[order] = None
        return self._lists[order]

    # -- queries ----------------------------------------------------------------------
    def count(self, order: int) -> int:
        """Number of free blocks of ``order``."""
        return self._counts[order]

    def counts(self) -> list[int]:
        return list(self._counts)

    @property
    def nr_pages(self) -> int:
        """Free pages in all orders."""
        return sum(c << o for o, c in enumerate(self._counts))

    def contains(self, order: int, pfn: int) -> bool:
        """Whether a free block of ``order`` starts at ``pfn``.  O(log n)."""
        if self._lists[order] is not None:
            return pfn in self._lists[order]
        arr = self._arrays[order]
        i = int(np.searchsorted(arr, np.uint64(pfn)))
        return i < arr.size and int(arr[i]) == pfn

    # -- single blocks ----------------------------------------------------------------
    def add(self, order: int, pfn: int) -> None:
        self._list(order).add(pfn)
        self._counts[order] += 1

    def remove(self, order: int, pfn: int) -> None:
        self._list(order).remove(pfn)
        self._counts[order] -= 1

    def pop_lowest(self, order: int) -> int:
        """Remove and return the lowest free block of ``order`` (which must exist)."""
        self._counts[order] -= 1
        return self._list(order).pop(0)

    # -- bulk -------------------------------------------------------------------------
    def remove_many(self, order: int, pfns: np.ndarray) -> None:
        """Remove free blocks (sorted, unique, all present).  O(n)."""
        if not pfns.size:
            return
        arr = self.array(order)
        self._arrays[order] = np.delete(arr, np.searchsorted(arr, pfns))
        self._counts[order] -= int(pfns.size)

    def add_many(self, order: int, pfns: np.ndarray) -> None:
        """Add free blocks (sorted, unique, none present).  O(n)."""
        if not pfns.size:
            return
        arr = self.array(order)
        self._arrays[order] = np.insert(arr, np.searchsorted(arr, pfns), pfns)
        self._counts[order] += int(pfns.size)


def mask_blocks(free: np.ndarray, first_pfn: int, max_order: int) -> list[np.ndarray]:
    """The free blocks of one segment from its page mask (``free[i]``: pfn ``first_pfn + i``
    is free): per order, the sorted pfns of the maximal aligned blocks of free pages.

    Same blocks as :func:`free_blocks` of the mask's runs (the greedy split of joined
    ranges is the set of maximal aligned free blocks).  One pass per order over a level
    half the size of the previous: O(pages) numpy work, no sorting.
    """
    align = 1 << max_order
    lead = first_pfn & (align - 1)
    base = np.uint64(first_pfn - lead)
    padded = -(-(lead + free.size) // align) * align
    if lead or padded != free.size or not free.flags.c_contiguous:
        level = np.zeros(padded, dtype=bool)
        level[lead:lead + free.size] = free
    else:
        level = free
    out = []
    for order in range(max_order):
        # Each pair of buddies as one uint16 (bools are bytes 0/1): a page heads a block of
        # this order when it is free and its buddy is not; both free make the parent free.
        pairs = level.view(np.uint16)
        heads = np.flatnonzero((pairs & ~pairs.byteswap()).view(bool))
        out.append((heads.astype(np.uint64) << np.uint64(order)) + base)
        level = pairs == 0x0101
    out.append((np.flatnonzero(level).astype(np.uint64) << np.uint64(max_order)) + base)
    return out


def build_free_areas(free: np.ndarray, memmap, segments: Segments, max_order: int) -> dict[str, FreeArea]:
    """``memblock_free_all`` given the free-page mask over ``memmap``'s pages: the free
    areas of both classes, segment by segment.  O(pages) numpy work."""
    parts = {NORMAL: [[] for _ in range(max_order + 1)], SCRATCH: [[] for _ in range(max_order + 1)]}
    for start, end, scratch in zip(segments.start.tolist(), segments.end.tolist(), segments.scratch.tolist()):
        pages = memmap.index_range(start, end - start)
        for order, blocks in enumerate(mask_blocks(free[pages], start, max_order)):
            parts[SCRATCH if scratch else NORMAL][order].append(blocks)
    return {kind: FreeArea([np.concatenate(p) if p else np.empty(0, np.uint64) for p in per_order])
            for kind, per_order in parts.items()}
