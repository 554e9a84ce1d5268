"""The next kernel's buddy page allocator, working on the free lists built at boot.

It offers the methods of :class:`kho.currentkernel.pagealloc.PageAllocator` that workloads and KHO
use (``alloc_pages``, ``alloc_many``, ``alloc_random``, ``claim_pages``, ``free_pages``,
``is_free``, ``nr_free_pages``, ``memory``), so the next kernel can run a workload,
preserve memory again with :class:`kho.handover.outgoing.KHO` and kexec again.

Allocation follows ``__rmqueue_smallest``: the smallest order with a free block, split
down with the upper halves going back to the free lists (``expand``).  Where the kernel
takes the head of a list, the model takes the lowest address, so runs are reproducible.
Freeing merges with the buddy while it is free at the same order, below MAX_PAGE_ORDER
and inside the block's segment (bank, scratch or not).  Only ordinary memory is handed
out: the scratch areas' free pages (MIGRATE_CMA in the kernel) are kept for movable
allocations and the next kexec, preserved and reserved pages never reach the lists.

Units: ``phys`` in bytes, pfns, orders.
"""

from __future__ import annotations

import numpy as np

from kho.errors import KHOError
from kho.memory import intervals
from kho.memory.physical import PhysicalMemory
from kho.nextkernel.freelist import NORMAL, SCRATCH, FreeArea, Segments, free_blocks
from kho.nextkernel.memmap import ALLOCATED, FREE, MemMap


class BuddyAllocator:
    """Buddy allocator over ``free_area`` lists.  See the module docstring.

    ``areas`` maps :data:`~kho.nextkernel.freelist.NORMAL` / ``SCRATCH`` to a
    :class:`FreeArea`; ``memmap.state`` must say FREE exactly for their pages.
    ``seed`` drives :meth:`alloc_many` / :meth:`alloc_random`.
    """

    def __init__(self, memory: PhysicalMemory, memmap: MemMap, segments: Segments, areas: dict[str, FreeArea], seed: int = 0):
        self.memory = memory
        self.memmap = memmap
        self.segments = segments
        self.areas = areas
        self.max_order = memory.geometry.max_order
        self.rng = np.random.default_rng(seed)
        self._shift = memory.page_shift

    # -- accounting -----------------------------------------------------------------------
    @property
    def nr_free_pages(self) -> int:
        """Free pages the allocator can hand out (ordinary memory, scratch excluded)."""
        return self.areas[NORMAL].nr_pages

    @property
    def nr_free_scratch_pages(self) -> int:
        """Free pages in the scratch areas (CMA: kept for movable allocations and kexec)."""
        return self.areas[SCRATCH].nr_pages

    def free_lists(self, kind: str = NORMAL) -> list[np.ndarray]:
        """Head pfns of the free blocks of each order (sorted uint64 arrays; do not modify)."""
        area = self.areas[kind]
        return [area.array(o) for o in range(self.max_order + 1)]

    def is_free(self, phys: int, size: int) -> bool:
        """True when every page of ``[phys, phys+size)`` is free."""
        first = phys >> self._shift
        last = (phys + size + self.memory.page_size - 1) >> self._shift
        return bool((self.memmap.state[self.memmap.index_range(first, last - first)] == FREE).all())

    # -- one block ----------------------------------------------------------------------------
    def _check_order(self, order: int) -> None:
        if not 0 <= order <= self.max_order:
            raise KHOError("EINVAL", f"order {order} is outside 0..{self.max_order}")

    def alloc_pages(self, order: int = 0) -> int:
        """Allocate a block of ``2**order`` pages; its phys.  ENOMEM when none is free.

        O(max_order log n).
        """
        self._check_order(order)
        area = self.areas[NORMAL]
        for current in range(order, self.max_order + 1):
            if area.count(current):
                break
        else:
            raise KHOError("ENOMEM", f"no free block of order {order} or above")
        pfn = area.pop_lowest(current)
        while current > order:  # expand: give the upper halves back
            current -= 1
            area.add(current, pfn + (1 << current))
        self.memmap.state[self.memmap.index_range(pfn, 1 << order)] = ALLOCATED
        return pfn << self._shift

    def free_pages(self, phys: int, order: int = 0) -> None:
        """Free an allocated block and merge it with its free buddies.

        EINVAL when misaligned, outside RAM, across a segment, or not entirely allocated
        (free, reserved or still preserved).  O(max_order log n).
        """
        self._check_order(order)
        pfn, nr = phys >> self._shift, 1 << order
        if phys & ((self.memory.page_size << order) - 1):
            raise KHOError("EINVAL", f"{phys:#x} is not aligned to order {order}")
        pages = self.memmap.index_range(pfn, nr)
        seg = int(self.segments.locate([pfn])[0])
        if pfn + nr > int(self.segments.end[seg]):
            raise KHOError("EINVAL", f"block {phys:#x} order {order} crosses a scratch-area boundary")
        if not (self.memmap.state[pages] == ALLOCATED).all():
            raise KHOError("EINVAL", f"freeing {phys:#x} order {order}: not allocated")
        self.memmap.state[pages] = FREE
        area = self.areas[SCRATCH if self.segments.scratch[seg] else NORMAL]
        lo, hi = int(self.segments.start[seg]), int(self.segments.end[seg])
        while order < self.max_order:
            buddy = pfn ^ (1 << order)
            merged = min(pfn, buddy)
            if merged < lo or merged + (2 << order) > hi or not area.contains(order, buddy):
                break
            area.remove(order, buddy)
            pfn, order = merged, order + 1
        area.add(order, pfn)

    # -- many blocks --------------------------------------------------------------------------
    def _carve(self, sub_pfn: np.ndarray, order: int, block_pfn: np.ndarray, block_order: np.ndarray) -> None:
        """Allocate the sub-blocks ``sub_pfn`` (order ``order``) of free ``NORMAL`` blocks.

        ``block_pfn``/``block_order`` give, for each sub-block, the free block holding it;
        entries are sorted by (block, sub-block) and sub-blocks are unique.  The blocks
        leave the free lists and what is left of them goes back as maximal blocks.
        O(n log n) numpy work.
        """
        area = self.areas[NORMAL]
        nr = np.uint64(1 << order)
        block_end = block_pfn + (np.uint64(1) << block_order.astype(np.uint64))
        first = np.ones(sub_pfn.size, dtype=bool)
        first[1:] = block_pfn[1:] != block_pfn[:-1]
        last = np.ones(sub_pfn.size, dtype=bool)
        last[:-1] = first[1:]
        gap_start = np.where(first, block_pfn, np.concatenate([[np.uint64(0)], sub_pfn[:-1] + nr]))
        starts = np.concatenate([gap_start, sub_pfn[last] + nr])
        ends = np.concatenate([sub_pfn, block_end[last]])
        keep = ends > starts
        rest = free_blocks(starts[keep], ends[keep], self.max_order)
        for o in range(self.max_order + 1):
            area.remove_many(o, np.unique(block_pfn[first][block_order[first] == o]))
            area.add_many(o, rest[o])
        heads = self.memmap.index(sub_pfn)
        self.memmap.state[heads if order == 0 else (heads[:, None] + np.arange(1 << order)).reshape(-1)] = ALLOCATED

    def alloc_many(self, count: int, order: int = 0) -> np.ndarray:
        """Allocate ``count`` blocks of ``order`` chosen uniformly at random among all free
        aligned blocks of that order (deterministic for a seed).  Returns their phys
        (uint64, ascending).  All or nothing: ENOMEM changes nothing.  O(free blocks + count
        log count) numpy work.
        """
        self._check_order(order)
        if count < 0:
            raise KHOError("EINVAL", f"negative count {count}")
        area = self.areas[NORMAL]
        orders = list(range(order, self.max_order + 1))
        blocks = np.concatenate([area.array(o) for o in orders])
        block_order = np.concatenate([np.full(area.count(o), o, dtype=np.uint8) for o in orders])
        weight = np.left_shift(np.int64(1), block_order.astype(np.int64) - order)
        available = int(weight.sum())
        if available < count:
            raise KHOError("ENOMEM", f"only {available} free blocks of order {order}, {count} wanted")
        if count == 0:
            return np.empty(0, np.uint64)
        pick = np.sort(self.rng.choice(available, size=count, replace=False))
        cum = np.cumsum(weight)
        owner = np.searchsorted(cum, pick, side="right")
        offset = (pick - (cum[owner] - weight[owner])).astype(np.uint64)
        block_pfn, block_ord = blocks[owner], block_order[owner]
        sub_pfn = block_pfn + (offset << np.uint64(order))
        self._carve(sub_pfn, order, block_pfn, block_ord)
        return np.sort(sub_pfn) << np.uint64(self._shift)

    def alloc_random(self, order: int = 0) -> int:
        """Allocate one block of ``order`` chosen uniformly among free blocks; its phys."""
        return int(self.alloc_many(1, order)[0])

    def claim_pages(self, phys) -> np.ndarray:
        """Allocate those of the given order-0 pages that are free ordinary memory; return
        their phys (uint64, in the given order).  Others are skipped.  O(n log n)."""
        phys = intervals.as_u64(phys)
        pfn = phys >> np.uint64(self._shift)
        area = self.areas[NORMAL]
        block_pfn = np.zeros(pfn.size, dtype=np.uint64)
        block_ord = np.zeros(pfn.size, dtype=np.uint8)
        found = np.zeros(pfn.size, dtype=bool)
        for o in range(self.max_order + 1):
            arr = area.array(o)
            if not arr.size:
                continue
            head = pfn & ~np.uint64((1 << o) - 1)
            i = np.minimum(np.searchsorted(arr, head), arr.size - 1)
            hit = ~found & (arr[i] == head)
            block_pfn[hit], block_ord[hit] = head[hit], o
            found |= hit
        claimed = np.zeros(pfn.size, dtype=bool)
        chosen = np.flatnonzero(found)
        if chosen.size:
            order = np.lexsort((pfn[chosen], block_pfn[chosen]))
            chosen = chosen[order]
            unique = np.ones(chosen.size, dtype=bool)
            unique[1:] = pfn[chosen][1:] != pfn[chosen][:-1]
            chosen = chosen[unique]
            self._carve(pfn[chosen], 0, block_pfn[chosen], block_ord[chosen])
            claimed[chosen] = True
        return phys[claimed]
