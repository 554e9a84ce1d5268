import numpy as np
import pytest
from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.errors import KHOError
from kho.memory.geometry import greedy_split
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea

MiB = 1 << 20
PS = 4096


def machine():
    m = PhysicalMemory([Bank(0, 4 * MiB), Bank(8 * MiB, 4 * MiB)])
    m.set_scratch([ScratchArea(2 * MiB, 64 << 10, "lowmem")])
    return m


def errno_of(fn, *args):
    try:
        fn(*args)
    except KHOError as err:
        return err.errno_name
    return None


def test_bitmap_layout_matches_the_kernel():
    t = Tracker(PhysicalMemory.single_bank(1 << 30), 4096)
    t.preserve_folio(0x5000, 0)  # pfn 5 -> bit 5 of index 0
    key = 4096 * 8 + 3  # order 1: index 8, bit 3
    t.preserve_folio(key << (12 + 1), 1)
    bitmaps = {(o, i): bm for o, i, bm in t.bitmaps()}
    assert bitmaps[(0, 0)][0] == 1 << 5 and bitmaps[(0, 0)].size == 512
    assert bitmaps[(1, 8)][0] == 1 << 3 and not bitmaps[(1, 8)][1:].any()


def test_preserve_bits_choice():
    assert Tracker(machine(), 4096).bitmap_bytes == 512
    assert Tracker(machine(), "page").bitmap_bytes == 4096
    assert Tracker(PhysicalMemory.single_bank(1 << 24, 16384)).preserve_bits == 16384 * 8
    with pytest.raises(KHOError):
        Tracker(machine(), 1000)


def test_errors_of_single_units():
    t = Tracker(machine())
    assert errno_of(t.preserve_folio, 0x1001, 0) == "EINVAL"  # unaligned
    assert errno_of(t.preserve_folio, 0x1000, 1) == "EINVAL"  # not aligned to its order
    assert errno_of(t.preserve_folio, 0, 11) == "EINVAL"  # above MAX_PAGE_ORDER
    assert errno_of(t.preserve_folio, 5 * MiB, 0) == "EINVAL"  # hole between banks
    assert errno_of(t.preserve_folio, 2 * MiB + 0x3000, 0) == "EINVAL"  # scratch
    assert errno_of(t.preserve_folio, 0, 10) == "EINVAL"  # 4 MiB from 0 covers the scratch area
    assert errno_of(t.preserve_folio, 8 * MiB, 10) is None
    assert errno_of(t.preserve_folio, 8 * MiB + 0x3000, 0) == "EEXIST"  # inside the order-10 unit
    assert errno_of(t.unpreserve_folio, 8 * MiB + 0x3000, 0) == "ENOENT"
    assert errno_of(t.unpreserve_folio, 8 * MiB, 9) == "ENOENT"
    assert errno_of(t.preserve_folio, 0x1000, 0) is None
    assert errno_of(t.preserve_folio, 0, 1) == "EEXIST"  # would contain a preserved page
    assert len(t) == 2 and t.nr_pages == 1025
    t.finalize()
    assert errno_of(t.preserve_folio, 9 * MiB, 0) == "EBUSY"
    assert errno_of(t.unpreserve_folio, 8 * MiB, 10) == "EBUSY"
    assert errno_of(t.preserve_many, np.array([9 * MiB]), 0) == "EBUSY"


def test_lenient_mode_accepts_double_preservation_like_the_kernel():
    t = Tracker(machine(), strict=False)
    t.preserve_folio(0x4000, 2)
    t.preserve_folio(0x4000, 2)
    t.preserve_folio(0x5000, 0)
    assert t.units() == [(0x4000, 2), (0x5000, 0)]
    t.unpreserve_folio(0x4000, 2)
    assert t.is_preserved(0x5000) and not t.is_preserved(0x4000)


def test_preserve_pages_greedy_split_capped():
    t = Tracker(PhysicalMemory.single_bank(64 * MiB))
    t.preserve_pages(0x1000, 1200)
    expect = [(pfn * PS, order) for pfn, order in greedy_split(1, 1200, 10)]
    assert t.units() == expect
    assert t.nr_pages == 1200
    t.preserve_pages(8 * MiB, 2048 + 5)
    assert (8 * MiB, 10) in t.units() and (16 * MiB, 2) in t.units() and (16 * MiB + 4 * PS, 0) in t.units()
    t.unpreserve_pages(0x1000, 1200)
    t.unpreserve_pages(8 * MiB, 2048 + 5)
    assert len(t) == 0 and t.nr_pages == 0


def test_uncapped_split_would_exceed_max_order():
    orders = [o for _, o in greedy_split(0, 4096)]
    assert orders == [12]  # what the kernel writes; kho caps it
    assert [o for _, o in greedy_split(0, 4096, 10)] == [10] * 4


def test_preserve_phys_checks_size():
    t = Tracker(machine())
    assert errno_of(t.preserve_phys, 0x1000, 0x1800) == "EINVAL"
    t.preserve_phys(0x1000, 0x3000)
    assert t.units() == [(0x1000, 0), (0x2000, 1)]


def test_failing_range_changes_nothing():
    t = Tracker(machine())
    t.preserve_folio(0x10000, 0)
    before = (t.units(), t.nr_pages)
    assert errno_of(t.preserve_pages, 0x8000, 100) == "EEXIST"
    assert errno_of(t.preserve_pages, 2 * MiB - 0x4000, 100) == "EINVAL"  # runs into scratch
    assert (t.units(), t.nr_pages) == before
    assert not t.is_preserved(0x8000)


def test_batches():
    t = Tracker(machine())
    phys = np.array([0x1000, 0x4000, 8 * MiB], dtype=np.uint64)
    t.preserve_many(phys, np.array([0, 2, 9]))
    assert t.units() == [(0x1000, 0), (0x4000, 2), (8 * MiB, 9)]
    assert errno_of(t.preserve_many, np.array([0x20000, 0x20000]), 0) == "EEXIST"
    assert errno_of(t.preserve_many, np.array([0x20000, 0x20000]), np.array([0, 1])) == "EEXIST"
    assert errno_of(t.preserve_many, np.array([0x20000, 0x5000]), 0) == "EEXIST"
    assert errno_of(t.preserve_many, np.array([0x20000, 0x5001]), 0) == "EINVAL"
    assert errno_of(t.preserve_many, np.array([0x20000]), np.array([0, 1])) == "EINVAL"
    assert errno_of(t.preserve_many, np.array([-4096]), 0) == "EINVAL"
    assert errno_of(t.preserve_many, np.array([0.5]), 0) == "EINVAL"
    assert len(t) == 3
    assert errno_of(t.unpreserve_many, np.array([0x1000, 0x2000]), 0) == "ENOENT"
    assert errno_of(t.unpreserve_many, np.array([0x1000, 0x1000]), 0) == "ENOENT"
    assert len(t) == 3
    t.unpreserve_many(np.array([0x4000, 0x1000]), np.array([2, 0]))
    assert t.units() == [(8 * MiB, 9)]
    ph, od = t.units_array()
    assert ph.dtype == np.uint64 and od.dtype == np.uint8


def test_unit_at_and_vector_queries():
    t = Tracker(machine())
    t.preserve_folio(0x8000, 3)
    assert t.unit_at(0xa123) == (0x8000, 3) and t.unit_at(0x7000) is None
    q = t.is_preserved_array(np.array([0x7000, 0x8000, 0xf000, 0x10000, 6 * MiB], dtype=np.uint64))
    assert q.tolist() == [False, True, True, False, False]


def test_kernel_memory_of_the_benchmark_set_shape():
    m = PhysicalMemory.single_bank(64 << 30)
    t = Tracker(m)
    rng = np.random.default_rng(0)
    # one page in each 128 MiB window: 512 page-sized bitmaps, one per window
    pfns = np.arange(512, dtype=np.uint64) * np.uint64(32768) + rng.integers(0, 32768, 512).astype(np.uint64)
    t.preserve_many(pfns << np.uint64(12), 0)
    mem = t.kernel_memory()
    assert mem.nr_bitmaps == 512 and mem.bitmaps == 2 * MiB
    # orders XArray holds only index 0 (no node); the order-0 XArray spans 512 indices: 1 root + 8 leaves
    assert mem.nr_xarray_nodes == 9 and mem.total == 2 * MiB + 9 * 576


# ---- stateful test against a plain set of pages ----------------------------------------------
RAM_PAGES = [(0, 1024), (2048, 3072)]  # pfn ranges of the two banks
SCRATCH = range(512, 528)


def unit_problem(pfn, order):
    """EINVAL if the unit is invalid on this machine, else None (the model's validation)."""
    if not 0 <= order <= 10 or pfn % (1 << order):
        return "EINVAL"
    end = pfn + (1 << order)
    if not any(lo <= pfn and end <= hi for lo, hi in RAM_PAGES):
        return "EINVAL"
    if pfn < SCRATCH.stop and end > SCRATCH.start:
        return "EINVAL"
    return None


pfns = st.one_of(st.integers(0, 3100), st.sampled_from([0, 512, 1024, 2048, 2047, 3071]))
orders = st.integers(0, 11)


class TrackerVsSet(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tracker = Tracker(machine(), 4096)
        self.units: set[tuple[int, int]] = set()
        self.finalized = False

    def pages(self):
        return {p for pfn, o in self.units for p in range(pfn, pfn + (1 << o))}

    def expect_preserve(self, units):
        if self.finalized:
            return "EBUSY"
        if any(unit_problem(*u) for u in units):
            return "EINVAL"
        seen = self.pages()
        for pfn, o in units:
            span = set(range(pfn, pfn + (1 << o)))
            if span & seen:
                return "EEXIST"
            seen |= span
        return None

    def apply(self, expected, fn, *args):
        got = errno_of(fn, *args)
        assert got == expected, (fn.__name__, args, got, expected)
        return got is None

    @rule(pfn=pfns, order=orders)
    def preserve_folio(self, pfn, order):
        if self.apply(self.expect_preserve([(pfn, order)]), self.tracker.preserve_folio, pfn * PS, order):
            self.units.add((pfn, order))

    @rule(pfn=pfns, order=orders)
    def unpreserve_folio(self, pfn, order):
        if self.finalized:
            expected = "EBUSY"
        elif unit_problem(pfn, order):
            expected = "EINVAL"
        else:
            expected = None if (pfn, order) in self.units else "ENOENT"
        if self.apply(expected, self.tracker.unpreserve_folio, pfn * PS, order):
            self.units.discard((pfn, order))

    @rule(pfn=pfns, nr=st.integers(1, 1500))
    def preserve_pages(self, pfn, nr):
        units = list(greedy_split(pfn, nr, 10))
        if self.apply(self.expect_preserve(units), self.tracker.preserve_pages, pfn * PS, nr):
            self.units |= set(units)

    @rule(data=st.data())
    def unpreserve_pages_of_a_preserved_unit(self, data):
        assume(self.units)
        pfn, order = data.draw(st.sampled_from(sorted(self.units)))
        expected = "EBUSY" if self.finalized else None
        if self.apply(expected, self.tracker.unpreserve_pages, pfn * PS, 1 << order):
            self.units.discard((pfn, order))

    @rule(batch=st.lists(st.tuples(pfns, st.integers(0, 3)), max_size=12))
    def preserve_many(self, batch):
        phys = np.array([p * PS for p, _ in batch], dtype=np.uint64)
        ords = np.array([o for _, o in batch], dtype=np.int64)
        if self.apply(self.expect_preserve(batch), self.tracker.preserve_many, phys, ords):
            self.units |= set(batch)

    @rule(data=st.data())
    def unpreserve_many(self, data):
        batch = data.draw(st.lists(st.sampled_from(sorted(self.units) or [(0, 0)]), max_size=6, unique=True))
        extra = data.draw(st.booleans())
        if extra:
            batch = batch + [(3000, 0)]
        if self.finalized:
            expected = "EBUSY"
        else:
            expected = None if all(u in self.units for u in batch) else "ENOENT"
        phys = np.array([p * PS for p, _ in batch], dtype=np.uint64)
        ords = np.array([o for _, o in batch], dtype=np.int64)
        if self.apply(expected, self.tracker.unpreserve_many, phys, ords):
            self.units -= set(batch)

    @precondition(lambda self: not self.finalized)
    @rule()
    def finalize(self):
        self.tracker.finalize()
        self.finalized = True

    @invariant()
    def same_units(self):
        assert self.tracker.units() == sorted((p * PS, o) for p, o in self.units)
        assert len(self.tracker) == len(self.units)
        pages = self.pages()
        assert self.tracker.nr_pages == len(pages)
        probe = np.array([p * PS for p in range(0, 3072, 7)], dtype=np.uint64)
        assert self.tracker.is_preserved_array(probe).tolist() == [int(p) // PS in pages for p in probe]


TestTrackerVsSet = TrackerVsSet.TestCase
TestTrackerVsSet.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)


@pytest.mark.parametrize("preserve_bits", ["page", 4096])
def test_units_array_against_what_was_preserved(preserve_bits):
    """Several orders, sparse XArray indices in two banks with a hole, an emptied bitmap."""
    memory = PhysicalMemory([Bank(0, 256 * MiB), Bank(1024 * MiB, 64 * MiB)])
    alloc = PageAllocator(memory, seed=3)
    tracker = Tracker(memory, preserve_bits)
    assert [a.size for a in tracker.units_array()] == [0, 0]
    expected = set()
    for order in (10, 5, 2, 0, 0):
        phys = alloc.alloc_many(300 >> (order // 2), order)
        tracker.preserve_many(phys, order)
        expected |= {(p, order) for p in phys.tolist()}
    first = min(expected)
    tracker.unpreserve_folio(*first)  # its bitmap stays in the XArray, maybe empty
    expected.discard(first)
    phys, orders = tracker.units_array()
    assert phys.dtype == np.uint64 and orders.dtype == np.uint8
    assert list(zip(phys.tolist(), orders.tolist())) == sorted(expected)
