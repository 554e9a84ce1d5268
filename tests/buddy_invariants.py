"""Invariants of the next kernel's free lists, shared by the buddy, boot and restore tests."""

import numpy as np

from kho.nextkernel.freelist import SCRATCH
from kho.nextkernel.memmap import FREE


def free_block_pages(alloc):
    """Memmap index of every page in a free block, and the blocks as (pfn, order, kind)."""
    pages, blocks = [], []
    for kind, area in alloc.areas.items():
        for order in range(alloc.max_order + 1):
            for pfn in area.array(order).tolist():
                blocks.append((pfn, order, kind))
                start = int(alloc.memmap.index([pfn])[0])
                pages.append(np.arange(start, start + (1 << order)))
    return (np.concatenate(pages) if pages else np.empty(0, np.int64)), blocks


def check_free_lists(alloc):
    """Every free block is aligned, inside one segment of its class, maximal, disjoint from
    the others, and the free pages are exactly those the memmap says are free."""
    segs, max_order = alloc.segments, alloc.max_order
    for kind, area in alloc.areas.items():
        for order in range(max_order + 1):
            pfn = area.array(order)
            assert area.count(order) == pfn.size
            assert (np.diff(pfn.astype(np.int64)) > 0).all(), "sorted, unique"
            assert (pfn % (1 << order) == 0).all(), "aligned to its order"
            seg = segs.locate(pfn)
            assert (seg >= 0).all()
            assert (pfn + (1 << order) <= segs.end[seg]).all(), "inside one segment"
            assert (segs.scratch[seg] == (kind == SCRATCH)).all(), "in the right class"
            if order < max_order:
                buddy = pfn ^ np.uint64(1 << order)
                merged = np.minimum(pfn, buddy)
                same_seg = (merged >= segs.start[seg]) & (merged + (2 << order) <= segs.end[seg])
                assert not (np.isin(buddy, pfn) & same_seg).any(), "maximal: buddy free at the same order"
    pages, _ = free_block_pages(alloc)
    assert np.unique(pages).size == pages.size, "free blocks overlap"
    assert np.array_equal(np.sort(pages), np.flatnonzero(alloc.memmap.state == FREE)), "free lists match memmap"
