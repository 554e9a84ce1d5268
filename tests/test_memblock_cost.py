"""The memblock work counted by kho.nextkernel.memblock_cost against a direct simulation of
the kernel's algorithm (mm/memblock.c: memblock_add_range, memblock_isolate_range,
memblock_merge_regions, memblock_insert_region, memblock_double_array), region by region."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho.currentkernel.machine import Machine
from kho.errors import KHOError
from kho.handover.outgoing import KHO
from kho.nextkernel import memblock_cost as MC
from kho.nextkernel.memblock import MemblockFlag

NOINIT = int(MemblockFlag.RSRV_NOINIT)


class DirectMemblock:
    """One ``struct memblock_type`` as the kernel keeps it: a list of [base, size, flags]
    with ``cnt``/``max`` and the empty dummy entry, every step of the algorithm counted."""

    def __init__(self, regions, initial_max=MC.INIT_MEMBLOCK_RESERVED_REGIONS):
        self.r = [list(x) for x in regions] or [[0, 0, 0]]
        self.max = initial_max
        while self.max < len(self.r):
            self.max *= 2
        self.c = {key: 0 for key in ("counting_passes", "reserve_scan_visits", "reserve_merge_iterations",
                                     "reserve_regions_moved", "reserve_doubling_copied", "isolate_scan_visits",
                                     "noinit_merge_iterations", "noinit_regions_moved", "noinit_doubling_copied",
                                     "doublings")}
        self.call = "reserve"

    @property
    def cnt(self):
        return len(self.r)

    def double(self):
        self.c[f"{self.call}_doubling_copied"] += self.max
        self.c["doublings"] += 1
        self.max *= 2

    def insert(self, idx, base, size, flags):
        assert self.cnt < self.max
        self.c[f"{self.call}_regions_moved"] += self.cnt - idx
        self.r.insert(idx, [base, size, flags])

    def merge(self, start, end):
        i = start - 1 if start else 0
        end = min(end, self.cnt - 1)
        while i < end:
            self.c[f"{self.call}_merge_iterations"] += 1
            this, nxt = self.r[i], self.r[i + 1]
            if this[0] + this[1] != nxt[0] or this[2] != nxt[2]:
                assert this[0] + this[1] <= nxt[0]
                i += 1
                continue
            this[1] += nxt[1]
            self.c[f"{self.call}_regions_moved"] += self.cnt - (i + 2)
            del self.r[i + 1]
            end -= 1

    def add_range(self, base, size, flags=0):
        self.call = "reserve"
        end = base + size
        if self.r[0][1] == 0:
            self.r[0] = [base, size, flags]
            return
        insert = self.cnt * 2 + 1 <= self.max
        if not insert:
            self.c["counting_passes"] += 1
        while True:
            b, nr_new, start_rgn, end_rgn = base, 0, -1, -1
            idx = 0
            while idx < self.cnt:
                self.c["reserve_scan_visits"] += 1
                rbase, rend = self.r[idx][0], self.r[idx][0] + self.r[idx][1]
                if rbase >= end:
                    break
                if rend <= b:
                    idx += 1
                    continue
                if rbase > b:
                    nr_new += 1
                    if insert:
                        if start_rgn == -1:
                            start_rgn = idx
                        end_rgn = idx + 1
                        self.insert(idx, b, rbase - b, flags)
                        idx += 1
                b = min(rend, end)
                idx += 1
            if b < end:
                nr_new += 1
                if insert:
                    if start_rgn == -1:
                        start_rgn = idx
                    end_rgn = idx + 1
                    self.insert(idx, b, end - b, flags)
            if not nr_new:
                return
            if insert:
                self.merge(start_rgn, end_rgn)
                return
            while self.cnt + nr_new > self.max:
                self.double()
            insert = True

    def mark_noinit(self, base, size):
        self.call = "noinit"
        end = base + size
        while self.cnt + 2 > self.max:
            self.double()
        start_rgn = end_rgn = 0
        idx = 0
        while idx < self.cnt:
            self.c["isolate_scan_visits"] += 1
            rgn = self.r[idx]
            rbase, rend = rgn[0], rgn[0] + rgn[1]
            if rbase >= end:
                break
            if rend <= base:
                idx += 1
                continue
            if rbase < base:
                rgn[0], rgn[1] = base, rend - base
                self.insert(idx, rbase, base - rbase, rgn[2])
            elif rend > end:
                rgn[0], rgn[1] = end, rend - end
                self.insert(idx, rbase, end - rbase, rgn[2])
                idx -= 1
            else:
                if not end_rgn:
                    start_rgn = idx
                end_rgn = idx + 1
            idx += 1
        for i in range(start_rgn, end_rgn):
            self.r[i][2] |= NOINIT
        self.merge(start_rgn, end_rgn)


def direct(units, base_regions, initial_max=MC.INIT_MEMBLOCK_RESERVED_REGIONS):
    mb = DirectMemblock(base_regions, initial_max)
    for base, size in units:
        mb.add_range(base, size)
        mb.mark_noinit(base, size)
    return mb


def fast(units, base_regions, initial_max=MC.INIT_MEMBLOCK_RESERVED_REGIONS):
    ub = [u[0] for u in units]
    us = [u[1] for u in units]
    base = tuple(np.array([r[i] for r in base_regions], dtype=np.int64) for i in range(3))
    return MC.count_memblock(ub, us, base, initial_max)


@st.composite
def layouts(draw):
    """Pages 0..N-1 of a small address space: some base regions (flags 0, NOINIT or another
    flag), some units (1 or 2 pages, possibly touching each other or a base region), the
    units in a random walk order; a small initial array so that it doubles."""
    n_slots = draw(st.integers(1, 60))
    kinds = draw(st.lists(st.sampled_from(["gap", "unit", "unit2", "base0", "baseN", "baseX"]), min_size=n_slots,
                          max_size=n_slots))
    units, base, page = [], [], 0
    for kind in kinds:
        width = 2 if kind == "unit2" else 1
        if kind.startswith("unit"):
            units.append((page * 4096, width * 4096))
        elif kind.startswith("base"):
            flags = {"base0": 0, "baseN": NOINIT, "baseX": int(MemblockFlag.NOMAP)}[kind]
            if base and base[-1][0] + base[-1][1] == page * 4096 and base[-1][2] == flags:
                base[-1][1] += 4096  # memblock keeps the base list minimal
            else:
                base.append([page * 4096, 4096, flags])
        page += width
    perm = draw(st.permutations(range(len(units))))
    initial_max = draw(st.sampled_from([4, 8, 128]))
    return [units[i] for i in perm], [tuple(b) for b in base], initial_max


@settings(max_examples=400, deadline=None)
@given(layouts())
def test_counts_equal_the_direct_simulation(layout):
    units, base, initial_max = layout
    mb = direct(units, base, initial_max)
    counts = fast(units, base, initial_max)
    for key, value in mb.c.items():
        assert getattr(counts, key) == value, key
    real = [r for r in mb.r if r[1]]
    assert counts.final_regions == len(real)
    assert counts.final_max == mb.max


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.sampled_from(["radix", "v1", "address"]), st.randoms(use_true_random=False))
def test_walk_orders_of_mixed_orders_match_the_direct_simulation(n, kind, rnd):
    """Units of mixed orders placed at random aligned spots, walked as each map walks them."""
    ps = 4096
    taken, phys, order = set(), [], []
    for _ in range(n):
        o = rnd.choice([0, 0, 0, 1, 2, 3])
        slot = rnd.randrange(8, 1 << 12) >> o << o
        pages = set(range(slot, slot + (1 << o)))
        if pages & taken:
            continue
        taken |= pages
        phys.append(slot * ps)
        order.append(o)
    compatible = {"radix": "kho-v4", "v1": "kho-v1", "address": "kho-ranges"}[kind]
    idx = MC.walk_order(np.array(phys, np.uint64), np.array(order), compatible)
    units = [(phys[i], ps << order[i]) for i in idx.tolist()]
    base = [(0, ps, 0), ((1 << 12) * ps + ps, 16 * ps, 0)]
    mb = direct(units, base)
    counts = fast(units, base)
    for key, value in mb.c.items():
        assert getattr(counts, key) == value, key


def test_walk_order_radix_highest_order_first_then_address():
    phys = np.array([0x1000, 0x8000, 0x2000, 0x10000], np.uint64)
    order = np.array([0, 3, 0, 4])
    idx = MC.walk_order(phys, order, "kho-v2")
    assert phys[idx].tolist() == [0x10000, 0x8000, 0x1000, 0x2000]
    idx = MC.walk_order(phys, order, "kho-v1")
    assert phys[idx].tolist() == [0x1000, 0x2000, 0x8000, 0x10000]


def test_overlapping_units_are_refused():
    with pytest.raises(KHOError) as err:
        MC.count_memblock([0x1000, 0x1000], [0x1000, 0x2000])
    assert err.value.errno_name == "EINVAL"
    with pytest.raises(KHOError):
        MC.count_memblock([0x1000], [0x1000], ([0x0], [0x2000], [0]))


def test_fragmented_is_quadratic_and_adjacent_linear():
    small_f = MC.count_memblock(*MC.fragmented_units(2000))
    big_f = MC.count_memblock(*MC.fragmented_units(8000))
    small_a = MC.count_memblock(*MC.adjacent_units(2000))
    big_a = MC.count_memblock(*MC.adjacent_units(8000))
    assert big_f.region_visits / small_f.region_visits == pytest.approx(16, rel=0.05)
    assert big_a.region_visits / small_a.region_visits == pytest.approx(4, rel=0.05)
    assert big_f.final_regions == 8000 and big_a.final_regions == 1
    assert big_f.region_visits > 1000 * big_a.region_visits


def test_four_million_units_are_counted():
    counts = MC.count_memblock(*MC.fragmented_units(1 << 22))
    # no two touch: every unit is its own region, the array doubled from 128 to 4M entries
    assert counts.final_regions == 1 << 22
    assert counts.final_max == 1 << 23
    assert counts.doublings == 16


def test_radix_pages_count_leaves_and_tables():
    # one order-0 unit: a leaf and one table on each of the 5 levels above it
    assert MC.radix_pages(np.array([0x1000], np.uint64), np.array([0])) == 6
    # 32768 consecutive order-0 pages from 0 share one leaf; a 32769th needs another leaf
    phys = np.arange(32769, dtype=np.uint64) * np.uint64(4096)
    assert MC.radix_pages(phys, np.zeros(phys.size, np.int64)) == 7


def test_radix_pages_are_the_pages_the_kho_v2_encoder_writes():
    machine = Machine.boot(1 << 30, seed=2)
    kho = KHO(machine.memory, machine.allocator, "kho-v2")
    kho.tracker.preserve_many(machine.allocator.alloc_many(5000, 0), 0)
    kho.tracker.preserve_many(machine.allocator.alloc_many(300, 3), 3)
    handover = kho.finalize()
    phys, order = kho.tracker.units_array()
    assert MC.radix_pages(phys, order) == handover.encoded.metadata_pages.size
