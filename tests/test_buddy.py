"""The next kernel's buddy allocator: kernel allocation and merging, bulk allocation, invariants."""

import numpy as np
import pytest
from buddy_invariants import check_free_lists
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kho.errors import KHOError
from kho.memory import intervals
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea
from kho.nextkernel.buddy import BuddyAllocator
from kho.nextkernel.freelist import NORMAL, Segments, build_free_areas
from kho.nextkernel.memmap import ALLOCATED, FREE, PRESERVED, RESERVED, MemMap
from kho.nextkernel.restore import IncomingKHO


def make_buddy(memory, reserved=(), units=(), seed=0):
    """A buddy allocator over ``memory`` minus ``reserved`` pfn ranges and preserved ``units``."""
    memmap = MemMap(memory)
    shift = memory.page_shift
    ram_s = np.array([b.start >> shift for b in memory.banks], np.uint64)
    ram_e = np.array([b.end >> shift for b in memory.banks], np.uint64)
    u_pfn = np.array([p for p, _ in units], np.uint64)
    u_ord = np.array([o for _, o in units], np.uint64)
    taken_s = np.concatenate([np.array([s for s, _ in reserved], np.uint64), u_pfn])
    taken_e = np.concatenate([np.array([e for _, e in reserved], np.uint64), u_pfn + (np.uint64(1) << u_ord)])
    free_s, free_e = intervals.subtract(ram_s, ram_e, *intervals.normalize(taken_s, taken_e))
    segs = Segments.from_memory(memory)
    free = memmap.ranges_mask(free_s, free_e)
    memmap.set_free(free)
    areas = build_free_areas(free, memmap, segs, memory.geometry.max_order)
    if units:
        memmap.mark_preserved(u_pfn, u_ord)
    return BuddyAllocator(memory, memmap, segs, areas, seed)


def small_machine():
    mem = PhysicalMemory([Bank(0, 16 << 20), Bank(32 << 20, 8 << 20, 1)])
    mem.set_scratch([ScratchArea(4 << 20, 2 << 20, "lowmem"), ScratchArea(36 << 20, 2 << 20, "node1")])
    return mem


def test_boot_state_invariants_and_accounting():
    mem = small_machine()
    alloc = make_buddy(mem, reserved=[(0, 16)], units=[(100, 0), (512, 9), (8192 + 7, 0)])
    check_free_lists(alloc)
    total = mem.nr_pages
    assert alloc.nr_free_scratch_pages == 1024
    assert alloc.nr_free_pages == total - 16 - (1 + 512 + 1) - 1024
    assert alloc.memmap.count(PRESERVED) == 514 and alloc.memmap.count(RESERVED) == 16
    assert not alloc.is_free(100 << 12, 4096) and alloc.is_free(101 << 12, 4096)


def test_alloc_pages_takes_the_smallest_order_and_splits_like_expand():
    mem = PhysicalMemory.single_bank(8 << 20)
    alloc = make_buddy(mem, reserved=[(0, 1024), (1028, 1536)])  # free: pages 1024..1027 and 1536..2047
    lists = alloc.free_lists()
    assert lists[2].tolist() == [1024] and lists[9].tolist() == [1536]
    assert alloc.alloc_pages(1) == 1024 << 12  # the order-2 block is the smallest that fits: keep its low half
    assert alloc.free_lists()[1].tolist() == [1026]
    assert alloc.alloc_pages(0) == 1026 << 12
    assert alloc.free_lists()[0].tolist() == [1027]
    assert alloc.alloc_pages(9) == 1536 << 12
    with pytest.raises(KHOError) as err:
        alloc.alloc_pages(10)
    assert err.value.errno_name == "ENOMEM"
    check_free_lists(alloc)


def test_free_pages_merges_back_to_the_boot_lists():
    mem = small_machine()
    alloc = make_buddy(mem, reserved=[(0, 3)])
    before = [a.tolist() for a in alloc.free_lists()]
    blocks = [(alloc.alloc_pages(o), o) for o in (0, 3, 0, 10, 2, 0, 5)]
    check_free_lists(alloc)
    for phys, order in reversed(blocks[::2]):
        alloc.free_pages(phys, order)
    for phys, order in blocks[1::2]:
        alloc.free_pages(phys, order)
    check_free_lists(alloc)
    assert [a.tolist() for a in alloc.free_lists()] == before


def test_free_pages_rejects_bad_blocks():
    mem = small_machine()
    alloc = make_buddy(mem, reserved=[(0, 16)], units=[(64, 2)])
    phys = alloc.alloc_pages(1)
    cases = [(phys + 4096, 1), (phys, 2), (0, 0), (64 << 12, 2), ((200 << 12), 0), (16 << 20, 0), (phys, 11)]
    for bad_phys, order in cases:
        with pytest.raises(KHOError) as err:
            alloc.free_pages(bad_phys, order)
        assert err.value.errno_name == "EINVAL"
    alloc.free_pages(phys, 1)
    with pytest.raises(KHOError):
        alloc.free_pages(phys, 1)  # double free
    check_free_lists(alloc)


def test_scratch_memory_is_never_handed_out():
    mem = PhysicalMemory.single_bank(8 << 20)
    mem.set_scratch([ScratchArea(0, 4 << 20)])
    alloc = make_buddy(mem)
    got = alloc.alloc_many(alloc.nr_free_pages, 0)
    assert (got >= np.uint64(4 << 20)).all()
    with pytest.raises(KHOError) as err:
        alloc.alloc_pages(0)
    assert err.value.errno_name == "ENOMEM"
    assert alloc.nr_free_scratch_pages == 1024
    assert alloc.claim_pages(np.array([0, 4096], np.uint64)).size == 0


def test_alloc_many_is_deterministic_all_or_nothing_and_uniform():
    mem = PhysicalMemory.single_bank(8 << 20)
    a, b = make_buddy(mem, seed=7), make_buddy(mem, seed=7)
    assert np.array_equal(a.alloc_many(300, 1), b.alloc_many(300, 1))
    lists = [x.tolist() for x in a.free_lists()]
    with pytest.raises(KHOError) as err:
        a.alloc_many(a.nr_free_pages + 1, 0)
    assert err.value.errno_name == "ENOMEM"
    assert [x.tolist() for x in a.free_lists()] == lists
    check_free_lists(a)
    # uniform over pages: both halves of RAM get about the same share
    c = make_buddy(mem, seed=1)
    pfn = c.alloc_many(1000, 0) >> np.uint64(12)
    assert 400 < np.count_nonzero(pfn < 1024) < 600
    assert (c.memmap.state[pfn.astype(np.int64)] == ALLOCATED).all()
    check_free_lists(c)


def test_claim_pages_takes_free_pages_in_the_given_order():
    mem = PhysicalMemory.single_bank(4 << 20)
    alloc = make_buddy(mem, reserved=[(10, 11)])
    phys = np.array([5, 10, 700, 5, 3, 1 << 30], np.uint64) << np.uint64(12)
    got = alloc.claim_pages(phys)
    assert (got >> np.uint64(12)).tolist() == [5, 700, 3]
    check_free_lists(alloc)
    assert alloc.memmap.state[[3, 5, 700]].tolist() == [ALLOCATED] * 3


class BuddyMachine(RuleBasedStateMachine):
    """Random alloc / restore / free sequences keep the free-list invariants."""

    @initialize(seed=st.integers(0, 1000), data=st.data())
    def setup(self, seed, data):
        mem = small_machine()
        units = data.draw(st.lists(st.tuples(st.integers(2000, 3000), st.integers(0, 3)), max_size=6))
        units = sorted({(p >> o << o, o) for p, o in units})
        units = [u for i, u in enumerate(units) if i == 0 or units[i - 1][0] + (1 << units[i - 1][1]) <= u[0]]
        self.alloc = make_buddy(mem, reserved=[(0, 8)], units=units, seed=seed)
        self.kho = IncomingKHO(mem, self.alloc.memmap, None, np.array([p << 12 for p, _ in units], np.uint64),
                               np.array([o for _, o in units], np.uint8))
        self.preserved = [(p << 12, o) for p, o in units]
        self.owned = []

    @rule(order=st.integers(0, 10))
    def alloc_one(self, order):
        try:
            self.owned.append((self.alloc.alloc_pages(order), order))
        except KHOError as err:
            assert err.errno_name == "ENOMEM"
            assert all(self.alloc.areas[NORMAL].count(o) == 0 for o in range(order, 11))

    @rule(count=st.integers(0, 40), order=st.integers(0, 4))
    def alloc_bulk(self, count, order):
        before = self.alloc.nr_free_pages
        try:
            got = self.alloc.alloc_many(count, order)
        except KHOError:
            assert self.alloc.nr_free_pages == before
            return
        assert (got % np.uint64(4096 << order) == 0).all()
        self.owned += [(int(p), order) for p in got]
        assert self.alloc.nr_free_pages == before - (count << order)

    @precondition(lambda self: self.preserved)
    @rule(data=st.data())
    def restore_one(self, data):
        phys, order = self.preserved.pop(data.draw(st.integers(0, len(self.preserved) - 1)))
        assert self.kho.restore_folio(phys) == order
        self.owned.append((phys, order))  # restored memory is the caller's: it may free it

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def free_one(self, data):
        i = data.draw(st.integers(0, len(self.owned) - 1))
        phys, order = self.owned.pop(i)
        self.alloc.free_pages(phys, order)

    @invariant()
    def free_lists_are_sound(self):
        check_free_lists(self.alloc)
        state = self.alloc.memmap.state
        assert np.count_nonzero(state == ALLOCATED) == sum(1 << o for _, o in self.owned)
        assert np.count_nonzero(state == PRESERVED) == sum(1 << o for _, o in self.preserved)
        assert self.kho.leaked()[0].tolist() == sorted(p for p, _ in self.preserved)
        assert self.alloc.nr_free_pages + self.alloc.nr_free_scratch_pages == np.count_nonzero(state == FREE)


TestBuddyMachine = BuddyMachine.TestCase
TestBuddyMachine.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
