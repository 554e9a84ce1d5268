"""Free-list construction: the kernel's greedy __free_pages_memory, segments, FreeArea."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kho.memory.geometry import ctz
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea
from kho.nextkernel.freelist import NORMAL, SCRATCH, FreeArea, Segments, build_free_areas, free_blocks, mask_blocks
from kho.nextkernel.memmap import MemMap


def greedy(ranges, max_order):
    """__free_pages_memory, one block at a time, as the kernel loops."""
    out = [[] for _ in range(max_order + 1)]
    for start, end in ranges:
        while start < end:
            order = max_order if start == 0 else min(max_order, ctz(start))
            while start + (1 << order) > end:
                order -= 1
            out[order].append(start)
            start += 1 << order
    return [sorted(x) for x in out]


@st.composite
def disjoint_ranges(draw, limit=1 << 16):
    points = sorted(draw(st.sets(st.integers(0, limit), max_size=16)))
    if len(points) % 2:
        points = points[:-1]
    return list(zip(points[0::2], points[1::2]))


@settings(max_examples=150, deadline=None)
@given(disjoint_ranges(), st.sampled_from([0, 1, 3, 10, 11, 13]))
def test_free_blocks_is_the_kernel_greedy_loop(ranges, max_order):
    got = free_blocks([s for s, _ in ranges], [e for _, e in ranges], max_order)
    assert [g.tolist() for g in got] == greedy(ranges, max_order)


def test_free_blocks_large_aligned_and_high_ranges():
    top = 1 << 40  # pfns of a 4 PiB machine
    ranges = [(0, 5000), (top - 4096 - 3, top - 1)]
    got = free_blocks([s for s, _ in ranges], [e for _, e in ranges], 10)
    assert [g.tolist() for g in got] == greedy(ranges, 10)
    assert all(g.dtype == np.uint64 for g in got)


def test_segments_cut_banks_at_scratch_areas():
    mem = PhysicalMemory([Bank(0, 64 << 20), Bank(128 << 20, 64 << 20, 1)])
    mem.set_scratch([ScratchArea(8 << 20, 4 << 20, "lowmem"), ScratchArea(160 << 20, 32 << 20, "node1")])
    segs = Segments.from_memory(mem)
    pfn = lambda mib: (mib << 20) >> 12
    assert list(zip(segs.start.tolist(), segs.end.tolist(), segs.scratch.tolist())) == [
        (0, pfn(8), False), (pfn(8), pfn(12), True), (pfn(12), pfn(64), False),
        (pfn(128), pfn(160), False), (pfn(160), pfn(192), True)]
    assert segs.locate([0, pfn(64), pfn(100), pfn(191)]).tolist() == [0, -1, -1, 4]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.booleans(), max_size=3000), st.integers(0, 5000), st.sampled_from([0, 1, 3, 10]))
def test_mask_blocks_is_the_greedy_split_of_the_joined_runs(free, first, max_order):
    mask = np.array(free, dtype=bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    runs = [(first + int(s), first + int(e)) for s, e in zip(edges[0::2], edges[1::2])]
    got = mask_blocks(mask, first, max_order)
    assert [g.tolist() for g in got] == greedy(runs, max_order)
    assert [g.tolist() for g in got] == [f.tolist() for f in free_blocks([s for s, _ in runs], [e for _, e in runs], max_order)]


def test_build_free_areas_never_joins_across_segments():
    mem = PhysicalMemory([Bank(0, 1 << 20), Bank(1 << 20, 1 << 20)])  # two touching banks
    mem.set_scratch([ScratchArea(0x80000, 0x40000)])
    memmap = MemMap(mem)
    free = np.ones(memmap.nr_pages, dtype=bool)
    areas = build_free_areas(free, memmap, Segments.from_memory(mem), 10)
    # bank 0: [0, 0x80) normal, [0x80, 0xC0) scratch, [0xC0, 0x100) normal; bank 1: [0x100, 0x200)
    assert areas[SCRATCH].array(6).tolist() == [0x80] and areas[SCRATCH].nr_pages == 0x40
    assert areas[NORMAL].array(7).tolist() == [0] and areas[NORMAL].array(6).tolist() == [0xC0]
    assert areas[NORMAL].array(8).tolist() == [0x100]  # not merged with bank 0 into an order-9 block
    assert areas[NORMAL].nr_pages == 0x1C0


def test_build_free_areas_splits_classes():
    mem = PhysicalMemory.single_bank(16 << 20)
    mem.set_scratch([ScratchArea(8 << 20, 4 << 20)])
    memmap = MemMap(mem)
    areas = build_free_areas(memmap.ranges_mask([0], [4096]), memmap, Segments.from_memory(mem), 10)
    assert areas[NORMAL].nr_pages + areas[SCRATCH].nr_pages == 4096
    assert areas[SCRATCH].nr_pages == 1024 and areas[SCRATCH].counts()[10] == 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "remove", "pop", "bulk_add", "bulk_remove", "array"]),
                          st.integers(0, 2), st.integers(0, 63)), max_size=40))
def test_free_area_representations_agree(ops):
    area = FreeArea([np.array([2, 8], np.uint64), np.array([4], np.uint64), np.empty(0, np.uint64)])
    model = [{2, 8}, {4}, set()]
    for op, order, pfn in ops:
        if op == "add" and pfn not in model[order]:
            area.add(order, pfn)
            model[order].add(pfn)
        elif op == "remove" and pfn in model[order]:
            area.remove(order, pfn)
            model[order].discard(pfn)
        elif op == "pop" and model[order]:
            assert area.pop_lowest(order) == min(model[order])
            model[order].discard(min(model[order]))
        elif op == "bulk_add":
            new = np.array(sorted({pfn, pfn + 64} - model[order]), np.uint64)
            area.add_many(order, new)
            model[order] |= set(new.tolist())
        elif op == "bulk_remove":
            gone = np.array(sorted(model[order] & {pfn, 2, 4, 8}), np.uint64)
            area.remove_many(order, gone)
            model[order] -= set(gone.tolist())
        elif op == "array":
            assert area.array(order).tolist() == sorted(model[order])
        assert area.contains(order, pfn) == (pfn in model[order])
        assert area.counts() == [len(m) for m in model]
    assert [area.array(o).tolist() for o in range(3)] == [sorted(m) for m in model]
    assert area.nr_pages == sum(len(m) << o for o, m in enumerate(model))
