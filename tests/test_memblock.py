"""memblock: the kernel's merge rules, flags, reservations, free-range iteration, top-down allocation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho.errors import KHOError
from kho.memory import intervals
from kho.nextkernel.memblock import NUMA_NO_NODE, REGION_DTYPE, Memblock, MemblockFlag, MemblockType

NOINIT = int(MemblockFlag.RSRV_NOINIT)
SCRATCH = int(MemblockFlag.KHO_SCRATCH)


def regions(mtype):
    return [(int(r["base"]), int(r["size"]), int(r["flags"]), int(r["nid"])) for r in mtype.regions]


class PointModel:
    """Reference: what each address unit is covered with, as a dict (small address spaces)."""

    def __init__(self):
        self.attrs = {}

    def add(self, base, size, nid, flags):
        for x in range(base, base + size):
            self.attrs.setdefault(x, (flags, nid))

    def setflag(self, base, size, flag):
        for x in range(base, base + size):
            if x in self.attrs:
                f, n = self.attrs[x]
                self.attrs[x] = (f | flag, n)

    def regions(self):
        out = []
        for x in sorted(self.attrs):
            f, n = self.attrs[x]
            if out and out[-1][0] + out[-1][1] == x and out[-1][2:] == (f, n):
                out[-1] = (out[-1][0], out[-1][1] + 1, f, n)
            else:
                out.append((x, 1, f, n))
        return out


ranges = st.lists(st.tuples(st.integers(0, 200), st.integers(1, 40)), max_size=12)


def test_region_layout_is_struct_memblock_region():
    assert REGION_DTYPE.itemsize == 24
    assert REGION_DTYPE.names == ("base", "size", "flags", "nid")


def test_adjacent_regions_merge_only_with_same_node_and_flags():
    t = MemblockType("memory")
    t.add_range([0], [10], 0, 0)
    t.add_range([10], [10], 0, 0)
    assert regions(t) == [(0, 20, 0, 0)]
    t.add_range([20], [5], 1, 0)  # other node: separate
    t.add_range([25], [5], 1, SCRATCH)  # other flags: separate
    assert regions(t) == [(0, 20, 0, 0), (20, 5, 0, 1), (25, 5, SCRATCH, 1)]


def test_overlapping_add_fills_gaps_and_keeps_existing_regions():
    t = MemblockType("memory")
    t.add_range([10, 30], [5, 5], 0, SCRATCH)
    t.add_range([0], [50], 0, 0)
    assert regions(t) == [(0, 10, 0, 0), (10, 5, SCRATCH, 0), (15, 15, 0, 0), (30, 5, SCRATCH, 0), (35, 15, 0, 0)]


def test_setclr_flag_splits_then_merges():
    t = MemblockType("reserved")
    t.add_range([0], [100], NUMA_NO_NODE, 0)
    t.setclr_flag([10], [10], NOINIT, True)
    assert regions(t) == [(0, 10, 0, -1), (10, 10, NOINIT, -1), (20, 80, 0, -1)]
    t.setclr_flag([10], [10], NOINIT, False)
    assert regions(t) == [(0, 100, 0, -1)]


@settings(max_examples=60, deadline=None)
@given(ranges, ranges)
def test_batched_reserve_equals_one_call_per_range(first, second):
    batched, single, model = Memblock(), Memblock(), PointModel()
    for base, size in first:
        single.reserve(base, size)
        model.add(base, size, NUMA_NO_NODE, 0)
    batched.reserve_many([b for b, _ in first], [s for _, s in first])
    assert regions(batched.reserved) == regions(single.reserved) == model.regions()
    assert batched.reserve_calls == single.reserve_calls == len(first)


@settings(max_examples=60, deadline=None)
@given(ranges, st.lists(st.tuples(st.integers(0, 200), st.integers(1, 8)), max_size=20, unique_by=lambda r: r[0]))
def test_reserve_noinit_many_equals_reserve_then_mark_per_range(existing, units):
    """KHO's per-unit memblock_reserve + memblock_reserved_mark_noinit, batched."""
    units = sorted(units)
    units = [u for i, u in enumerate(units) if i == 0 or units[i - 1][0] + units[i - 1][1] <= u[0]]  # disjoint
    mb, model = Memblock(), PointModel()
    for base, size in existing:
        mb.reserve(base, size)
        model.add(base, size, NUMA_NO_NODE, 0)
    seq = Memblock()
    seq.reserved.regions = mb.reserved.regions.copy()
    for base, size in units:
        seq.reserve(base, size)
        seq.reserved.setclr_flag([base], [size], NOINIT, True)
        model.add(base, size, NUMA_NO_NODE, 0)
        model.setflag(base, size, NOINIT)
    mb.reserve_noinit_many([b for b, _ in units], [s for _, s in units])
    assert regions(mb.reserved) == regions(seq.reserved) == model.regions()
    assert mb.reserve_calls == len(existing) + len(units)


@settings(max_examples=60, deadline=None)
@given(ranges, ranges, st.sampled_from([MemblockFlag.NONE, MemblockFlag.KHO_SCRATCH]))
def test_free_ranges_are_memory_minus_reserved(mem, res, flags):
    mb = Memblock()
    covered = set()
    for i, (base, size) in enumerate(mem):
        mb.add_node(base, size, i % 2)
    for i, (base, size) in enumerate(mem[::3]):
        mb.mark_kho_scratch(base, size)
    for base, size in res:
        mb.reserve(base, size)
        covered |= set(range(base, base + size))
    start, end, nid = mb.free_ranges(flags=flags)
    expected = set()
    for r in mb.memory.regions:
        if flags & SCRATCH and not r["flags"] & SCRATCH:
            continue
        expected |= set(range(int(r["base"]), int(r["base"] + r["size"])))
    expected -= covered
    got = set()
    for s, e in zip(start.tolist(), end.tolist()):
        assert e > s
        got |= set(range(s, e))
    assert got == expected
    # pieces never span two memory regions, and carry their region's node
    for s, e, n in zip(start.tolist(), end.tolist(), nid.tolist()):
        i = int(np.searchsorted(mb.memory.base, s, side="right")) - 1
        r = mb.memory.regions[i]
        assert int(r["base"]) <= s and e <= int(r["base"] + r["size"]) and int(r["nid"]) == n


def test_phys_alloc_is_top_down_aligned_and_reserves():
    mb = Memblock(4096)
    mb.add_node(0, 1 << 20, 0)
    mb.reserve(0xF0000, 0x10000)  # the top 64 KiB
    calls = mb.reserve_calls
    phys = mb.phys_alloc(0x3000, 0x2000)
    assert phys == 0xEC000  # highest 8 KiB-aligned fit below the reservation
    assert mb.reserve_calls == calls + 1
    assert regions(mb.reserved) == [(0xEC000, 0x3000, 0, -1), (0xF0000, 0x10000, 0, -1)]
    low = mb.phys_alloc(0x1000, 0x1000, end=0x3000)
    assert low == 0x2000


def test_phys_alloc_never_returns_the_first_page():
    mb = Memblock(4096)
    mb.add_node(0, 0x2000, 0)
    assert mb.phys_alloc(0x1000, 0x1000) == 0x1000
    with pytest.raises(KHOError) as err:
        mb.phys_alloc(0x1000, 0x1000)
    assert err.value.errno_name == "ENOMEM"


def test_scratch_only_mode_allocates_only_from_scratch_areas():
    mb = Memblock(4096)
    mb.add_node(0, 64 << 20, 0)
    mb.mark_kho_scratch(8 << 20, 4 << 20)
    mb.set_kho_scratch_only()
    phys = mb.phys_alloc(1 << 20, 1 << 20)
    assert phys == 11 << 20
    mb.phys_alloc(3 << 20, 1 << 20)
    with pytest.raises(KHOError) as err:
        mb.phys_alloc(1 << 20, 4096)
    assert err.value.errno_name == "ENOMEM" and "scratch" in err.value.message
    mb.clear_kho_scratch_only()
    assert mb.phys_alloc(1 << 20, 1 << 20) == 63 << 20


def test_phys_alloc_prefers_the_node_then_falls_back():
    mb = Memblock(4096)
    mb.add_node(0, 16 << 20, 0)
    mb.add_node(16 << 20, 16 << 20, 1)
    assert mb.phys_alloc(1 << 20, 1 << 20, nid=0) == 15 << 20
    assert mb.phys_alloc(16 << 20, 1 << 20, nid=0) == 16 << 20  # node 0 is too small: any node
    with pytest.raises(KHOError):
        mb.phys_alloc(15 << 20, 1 << 20, nid=0, exact_nid=True)


def test_phys_alloc_rejects_bad_arguments():
    mb = Memblock(4096)
    mb.add_node(0, 1 << 20, 0)
    for size, align in ((0, 4096), (4096, 3000), (4096, 0)):
        with pytest.raises(KHOError) as err:
            mb.phys_alloc(size, align)
        assert err.value.errno_name == "EINVAL"


def test_array_bytes_counts_regions():
    mb = Memblock()
    mb.reserve_many(np.arange(0, 100, 2), np.ones(50, np.uint64))
    assert len(mb.reserved) == 50 and mb.reserved.array_bytes == 50 * 24
    assert mb.reserved.total_size == 50


def covered(start, end):
    return {x for s, e in zip(start.tolist(), end.tolist()) for x in range(s, e)}


@settings(max_examples=100, deadline=None)
@given(ranges, ranges, st.sets(st.integers(0, 250), max_size=8))
def test_interval_operations_match_sets(a, b, points):
    a_s, a_e = intervals.normalize([s for s, _ in a], [s + n for s, n in a])
    b_s, b_e = intervals.normalize([s for s, _ in b], [s + n for s, n in b])
    assert covered(a_s, a_e) == {x for s, n in a for x in range(s, s + n)}
    assert (a_s[1:] > a_e[:-1]).all()  # neither overlapping nor touching
    for op, expect in ((intervals.subtract, covered(a_s, a_e) - covered(b_s, b_e)),
                       (intervals.intersect, covered(a_s, a_e) & covered(b_s, b_e))):
        for x, y in (((a_s, a_e), (b_s, b_e)), ((a_s[:1], a_e[:1]), (b_s, b_e)), ((a_s, a_e), (b_s[:1], b_e[:1]))):
            s, e = op(*x, *y)
            want = covered(*x) - covered(*y) if op is intervals.subtract else covered(*x) & covered(*y)
            assert covered(s, e) == want and (e > s).all() and (s[1:] >= e[:-1]).all()
        assert covered(*op(a_s, a_e, b_s, b_e)) == expect
    s, e = intervals.split_at(a_s, a_e, sorted(points))
    assert covered(s, e) == covered(a_s, a_e)
    assert not any(((s < p) & (e > p)).any() for p in points)
