"""The stateless 7.x tracker (RadixTracker): a set model, the kho-v2 encoder's node contents,
the real 7.3 dump's map, the uncapped NUMA split, 16 KiB pages with and without the depth fix."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from abi_helpers import MAP, ScriptedAllocator, u64
from kho.abi.kexec_handover import RadixGeometry
from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.radix_tracker import RadixTracker
from kho.currentkernel.tracker import Tracker
from kho.encodings.kho_v2 import KhoV2
from kho.errors import KHOError
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea

MiB = 1 << 20
FIXTURES = Path(__file__).parent / "fixtures" / "linux-7.3-x86_64"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "realkernel" / "linux-7.3-x86_64"


def walk_tree(memory, root, geometry):
    """Read a radix tree from memory, independently of the trackers: ``{(level, prefix): x}``
    where ``x`` is the leaf's bytes (level 0) or the tuple of a table's nonzero slots."""
    nodes, frontier = {}, [(root, 0)]
    for level in range(geometry.root_level, 0, -1):
        children = []
        for phys, prefix in frontier:
            table = np.frombuffer(memory.read(phys, memory.page_size), dtype="<u8")
            slots = np.flatnonzero(table)
            nodes[(level, prefix)] = tuple(slots.tolist())
            children += [(int(table[s]), (prefix << geometry.table_log2) | int(s)) for s in slots]
        frontier = children
    for phys, prefix in frontier:
        nodes[(0, prefix)] = memory.read(phys, memory.page_size)
    return nodes


def units_of_tree(nodes, geometry):
    """The units the leaves of :func:`walk_tree` hold, in ascending key order (the kernel's walk)."""
    out = []
    for (level, prefix), leaf in sorted(nodes.items()):
        if level == 0:
            for bit in np.flatnonzero(np.unpackbits(np.frombuffer(leaf, np.uint8), bitorder="little")).tolist():
                out.append(geometry.decode_key((prefix << geometry.bitmap_log2) | bit))
    return sorted(out, key=lambda u: geometry.encode_key(*u))


def machine(ram=64 * MiB, page_size=4096, banks=None):
    memory = PhysicalMemory(banks or [Bank(0, ram)], page_size)
    return memory, PageAllocator(memory)


# -- the contract, against a set model --------------------------------------------------------------


class RadixVsSet(RuleBasedStateMachine):
    """Random preserve/unpreserve sequences; every failed call changes nothing."""

    PAGE_SIZE = 4096

    def __init__(self):
        super().__init__()
        self.memory, self.alloc = machine(64 * MiB, self.PAGE_SIZE)
        self.ps = self.PAGE_SIZE
        # metadata comes from the first 4 MiB; the units from the rest
        self.alloc.reserve(4 * MiB, 60 * MiB)
        self.tracker = RadixTracker(self.memory, self.alloc)
        self.model = set()

    def snapshot(self):
        t = self.tracker
        return (t.units(), len(t), t.nr_pages, t.radix_pages().tolist(),
                {int(p): bytes(self.memory.read(int(p), self.ps)) for p in t.radix_pages()}, self.alloc.nr_free_pages)

    def attempt(self, call, *args):
        before = self.snapshot()
        try:
            call(*args)
        except KHOError:
            assert self.snapshot() == before
            return False
        return True

    def covered(self, lo, hi):
        """True when a preserved unit shares a byte with ``[lo, hi)``."""
        return any(p < hi and lo < p + (self.ps << o) for p, o in self.model)

    def aligned(self, pfn, order):
        """The unit of ``order`` holding 4 KiB page ``pfn``."""
        return (pfn * 4096) & ~((self.ps << order) - 1)

    units = st.tuples(st.integers(4 * MiB // 4096, 64 * MiB // 4096 - 1), st.integers(0, 12))

    @rule(unit=units)
    def preserve_folio(self, unit):
        pfn, order = unit
        phys = self.aligned(pfn, order)
        end = phys + (self.ps << order)
        ok = self.attempt(self.tracker.preserve_folio, phys, order)
        assert ok == (end <= 64 * MiB and not self.covered(phys, end))
        if ok:
            self.model.add((phys, order))

    @rule(data=st.data())
    def unpreserve_folio(self, data):
        if self.model and data.draw(st.booleans()):
            phys, order = data.draw(st.sampled_from(sorted(self.model)))
        else:
            phys, order = 4 * MiB, data.draw(st.integers(0, 3))
        ok = self.attempt(self.tracker.unpreserve_folio, phys, order)
        assert ok == ((phys, order) in self.model)
        if ok:
            self.model.discard((phys, order))

    @rule(batch=st.lists(units, max_size=30), order=st.integers(0, 3))
    def preserve_many(self, batch, order):
        phys = sorted({self.aligned(pfn, order) for pfn, _ in batch})
        ok = self.attempt(self.tracker.preserve_many, np.array(phys, dtype=np.uint64), order)
        assert ok == (not any(self.covered(p, p + (self.ps << order)) for p in phys))
        if ok:
            self.model |= {(p, order) for p in phys}

    @rule(data=st.data())
    def unpreserve_many(self, data):
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.model)), max_size=6)) if self.model else []
        extra = data.draw(st.booleans())
        if extra:
            chosen = chosen + [(4 * MiB + self.ps, 1)]
        ok = self.attempt(self.tracker.unpreserve_many, np.array([p for p, _ in chosen], dtype=np.uint64),
                          np.array([o for _, o in chosen], dtype=np.uint8))
        assert ok == (len(set(chosen)) == len(chosen) and set(chosen) <= self.model)
        if ok:
            self.model -= set(chosen)

    @rule(start=st.integers(4 * MiB // 4096, 64 * MiB // 4096 - 1), nr=st.integers(1, 3000))
    def preserve_pages(self, start, nr):
        phys = self.aligned(start, 0)
        end = phys + nr * self.ps
        ok = self.attempt(self.tracker.preserve_pages, phys, nr)
        assert ok == (end <= 64 * MiB and not self.covered(phys, end))
        if ok:
            self.model |= set(zip(*(a.tolist() for a in self.tracker.split(phys, nr))))

    @invariant()
    def matches_model(self):
        t = self.tracker
        assert t.units() == sorted(self.model)
        assert len(t) == len(self.model)
        assert t.nr_pages == sum(1 << o for _, o in self.model)
        # the map in memory is valid at every moment
        geometry = t.geometry
        assert sorted(units_of_tree(walk_tree(self.memory, t.root_phys, geometry), geometry)) == sorted(self.model)


class RadixVsSet64K(RadixVsSet):
    PAGE_SIZE = 65536


TestRadixVsSet = RadixVsSet.TestCase
TestRadixVsSet.settings = settings(max_examples=40, stateful_step_count=20, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
TestRadixVsSet64K = RadixVsSet64K.TestCase
TestRadixVsSet64K.settings = settings(max_examples=15, stateful_step_count=15, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])


# -- byte-identical to the kho-v2 encoder ---------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(page_size=st.sampled_from([4096, 16384, 65536]),
       units=st.lists(st.tuples(st.integers(0, (256 * MiB >> 12) - 1), st.integers(0, 10)), max_size=60),
       removed=st.integers(0, 5))
def test_tree_equals_kho_v2_encoder(page_size, units, removed):
    """Same units (and the same unpreserves) into the 6.16 tracker + kho-v2 encoder and into a
    RadixTracker: the same nodes, the same leaf bytes, the same table slots.  16 KiB pages
    use the formula first merged, like the encoder (orders >= 1 only)."""
    depth_fix = False
    low = 1 if page_size == 16384 else 0
    mem_a, alloc_a = machine(256 * MiB, page_size)
    mem_b, alloc_b = machine(256 * MiB, page_size)
    for alloc in (alloc_a, alloc_b):
        alloc.reserve(16 * MiB, 240 * MiB)
    tracker = Tracker(mem_a, "page")
    radix = RadixTracker(mem_b, alloc_b, depth_fix=depth_fix)
    kept = []
    for pfn, order in units:
        order = max(order, low)
        phys = max(pfn * 4096, 16 * MiB) & ~((page_size << order) - 1)
        try:
            tracker.preserve_folio(phys, order)
        except KHOError as err:
            with pytest.raises(KHOError) as again:
                radix.preserve_folio(phys, order)
            assert again.value.errno_name == err.errno_name
            continue
        radix.preserve_folio(phys, order)
        kept.append((phys, order))
    for phys, order in kept[:removed]:
        tracker.unpreserve_folio(phys, order)
        radix.unpreserve_folio(phys, order)
    encoded = KhoV2(page_size).encode(tracker, alloc_a)
    root = int.from_bytes(encoded.props[MAP], "little")
    geometry = RadixGeometry(page_size.bit_length() - 1, depth_fix)
    assert walk_tree(mem_b, radix.root_phys, geometry) == walk_tree(mem_a, root, geometry)
    assert radix.radix_pages().size == encoded.metadata_pages.size


def test_decoded_by_kho_v2_decoder():
    """The live map, handed to the kho-v2 decoder as is, gives the preserved units."""
    memory, alloc = machine(1 << 30)
    radix = RadixTracker(memory, alloc)
    alloc.reserve(0x2000_0000, 0x400_0000)
    units = alloc.alloc_many(5000, 0)
    radix.preserve_many(units, 0)
    radix.preserve_pages(0x2000_0000, 0x4000)  # 64 MiB aligned: one order-14 unit
    decoded = KhoV2(4096).decode(memory, {MAP: u64(radix.root_phys)}, strict=False)
    phys, order = radix.units_array()
    assert np.array_equal(decoded.phys, phys) and np.array_equal(decoded.order, order)


# -- the real Linux 7.3 dump ------------------------------------------------------------------------


def real_units():
    lines = (FIXTURES / "units-0x344000.txt").read_text().split("\n")
    return [(int(a, 16), int(b)) for a, b in (line.split() for line in lines if line.strip())]


def real_machine():
    """The dumped QEMU guest: 512 MiB, System RAM 0x1000-0x9f000 and 0x100000-0x1ffe0000."""
    return PhysicalMemory([Bank(0x1000, 0x9e000), Bank(0x100000, 0x1ffe0000 - 0x100000)])


def rebuild_real_map():
    """The real 7.3 map's units preserved into a RadixTracker on the dumped machine."""
    units = real_units()
    memory = real_machine()
    alloc = PageAllocator(memory)
    for phys, order in units:
        alloc.reserve(phys, 4096 << order)
    radix = RadixTracker(memory, alloc)
    for phys, order in units:
        radix.preserve_folio(phys, order)
    return memory, radix


def test_real_73_map_rebuilt():
    """The 141 units of the real 7.3 map make 50 radix pages, walked in the kernel's order."""
    units = real_units()
    memory, radix = rebuild_real_map()
    assert len(units) == 141 and len(radix) == 141
    assert radix.radix_pages().size == 50
    phys, order = radix.walk_array()
    assert list(zip(phys.tolist(), order.tolist())) == units
    geometry = radix.geometry
    assert units_of_tree(walk_tree(memory, radix.root_phys, geometry), geometry) == units


def test_walk_in_chunks(monkeypatch):
    """Listing the units a leaf at a time gives the same walk."""
    _, radix = rebuild_real_map()
    whole = radix.walk_array()
    monkeypatch.setattr(RadixTracker, "_WALK_LEAVES", 1)
    for part, full in zip(radix.walk_array(), whole):
        assert np.array_equal(part, full)
    assert len(radix.units()) == 141


@pytest.mark.skipif(not (SHARED / "mem-stage1.raw.zst").exists(), reason="needs ../shared/realkernel")
def test_real_73_pages_equal_the_dump():
    """Node by node, the rebuilt tree has the dump's contents (tables compared by their slots)."""
    zstandard = pytest.importorskip("zstandard")
    with open(SHARED / "mem-stage1.raw.zst", "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    root = 0x343000
    geometry = RadixGeometry(12, True)
    pages = {}

    class DumpReader:  # just what walk_tree reads
        page_size = 4096

        @staticmethod
        def read(phys, size):
            pages[phys] = raw[phys:phys + size]
            return pages[phys]

    real = walk_tree(DumpReader, root, geometry)
    assert len(pages) == 50
    memory, radix = rebuild_real_map()
    assert walk_tree(memory, radix.root_phys, geometry) == real


# -- orders above MAX_PAGE_ORDER and NUMA nodes ---------------------------------------------------------


def test_uncapped_split_and_numa_boundaries():
    memory, alloc = machine(banks=[Bank(0, 64 * MiB, 0), Bank(64 * MiB, 64 * MiB, 1)])
    alloc.reserve(8 * MiB, 56 * MiB)
    alloc.reserve(64 * MiB, 64 * MiB)
    radix = RadixTracker(memory, alloc)
    # an 8 MiB-aligned 8 MiB region is one order-11 unit (as the real arm64 dump's reserve_mem)
    assert radix.split(8 * MiB, 2048)[1].tolist() == [11]
    # 32 MiB across the node boundary: never a unit spanning both nodes
    phys, order = radix.split(48 * MiB, 8192)
    ends = phys + (np.uint64(4096) << order.astype(np.uint64))
    assert not np.any((phys < 64 * MiB) & (ends > 64 * MiB))
    assert phys.tolist() == [48 * MiB, 64 * MiB] and order.tolist() == [12, 12]
    radix.preserve_pages(48 * MiB, 8192)
    assert radix.units() == [(48 * MiB, 12), (64 * MiB, 12)]
    radix.unpreserve_pages(48 * MiB, 8192)
    assert len(radix) == 0 and not radix.is_preserved(64 * MiB)
    with pytest.raises(KHOError) as err:
        radix.preserve_folio(0, radix.max_order + 1)
    assert err.value.errno_name == "EINVAL"


# -- 16 KiB pages -----------------------------------------------------------------------------------------


def test_16k_old_depth_refuses_order_0():
    memory, alloc = machine(256 * MiB, 16384)
    old = RadixTracker(memory, alloc, depth_fix=False)
    assert old.geometry.depth == 4 and old.min_order == 1
    before = old.radix_pages().tolist()
    for call in (lambda: old.preserve_folio(32 * MiB, 0), lambda: old.preserve_many([32 * MiB], 0),
                 lambda: old.preserve_pages(32 * MiB + 16384, 3)):
        with pytest.raises(KHOError) as err:
            call()
        assert err.value.errno_name == "EINVAL" and "depth fix" in err.value.message and "bit 50" in err.value.message
    assert old.radix_pages().tolist() == before and len(old) == 0
    old.preserve_folio(32 * MiB, 1)
    assert old.units() == [(32 * MiB, 1)]


@settings(max_examples=25, deadline=None)
@given(units=st.lists(st.tuples(st.integers(2048, 16383), st.integers(0, 11)), min_size=1, max_size=40))
def test_16k_fixed_depth_round_trip(units):
    """With the fix: 5 levels, order 0 included; the tree in memory holds exactly the units."""
    memory, alloc = machine(256 * MiB, 16384)
    alloc.reserve(32 * MiB, 224 * MiB)
    radix = RadixTracker(memory, alloc, depth_fix=True)
    assert radix.geometry.depth == 5 and radix.min_order == 0
    kept = set()
    for pfn, order in units:
        phys = (pfn * 16384) & ~((16384 << order) - 1)
        try:
            radix.preserve_folio(phys, order)
            kept.add((phys, order))
        except KHOError as err:
            assert err.errno_name == "EEXIST"
    assert radix.units() == sorted(kept)
    geometry = radix.geometry
    assert sorted(units_of_tree(walk_tree(memory, radix.root_phys, geometry), geometry)) == sorted(kept)


# -- errors, all or nothing ---------------------------------------------------------------------------


def test_enomem_changes_nothing():
    memory, _ = machine(64 * MiB)
    script = ScriptedAllocator([0x1000, 0x2000, 0x3000])  # the root and two more pages only
    radix = RadixTracker(memory, script)
    with pytest.raises(KHOError) as err:
        radix.preserve_folio(32 * MiB, 0)  # needs 5 new nodes
    assert err.value.errno_name == "ENOMEM"
    assert script.freed == [0x2000, 0x3000]
    assert len(radix) == 0 and not radix.is_preserved(32 * MiB) and radix.radix_pages().tolist() == [0x1000]
    assert memory.read(0x1000, 4096) == bytes(4096)
    script.pages = [0x2000, 0x3000, 0x4000, 0x5000, 0x6000]
    radix.preserve_many([32 * MiB, 48 * MiB], 0)
    assert radix.units() == [(32 * MiB, 0), (48 * MiB, 0)] and radix.kernel_memory().total == 6 * 4096


def test_errors():
    memory, alloc = machine(64 * MiB)
    memory.set_scratch([ScratchArea(16 * MiB, 4 * MiB)])
    alloc.reserve(8 * MiB, 56 * MiB)
    radix = RadixTracker(memory, alloc)
    cases = [(lambda: radix.preserve_folio(8 * MiB + 4096, 1), "EINVAL"),  # misaligned
             (lambda: radix.preserve_folio(64 * MiB, 0), "EINVAL"),  # outside RAM
             (lambda: radix.preserve_folio(16 * MiB, 0), "EINVAL"),  # scratch
             (lambda: radix.preserve_many([8 * MiB, 17 * MiB], 0), "EINVAL"),
             (lambda: radix.preserve_pages(15 * MiB, 512), "EINVAL"),  # runs into scratch
             (lambda: radix.unpreserve_folio(8 * MiB, 0), "ENOENT"),
             (lambda: radix.unpreserve_many([8 * MiB], 0), "ENOENT"),
             (lambda: radix.preserve_many([8 * MiB, 8 * MiB], 0), "EEXIST"),
             (lambda: radix.preserve_many([8 * MiB, 8 * MiB], [1, 0]), "EEXIST"),
             (lambda: radix.preserve_phys(8 * MiB, 100), "EINVAL"),
             (lambda: radix.split(8 * MiB, 0), "EINVAL")]
    for call, errno_name in cases:
        with pytest.raises(KHOError) as err:
            call()
        assert err.value.errno_name == errno_name
    assert len(radix) == 0 and radix.radix_pages().size == 1
    radix.preserve_folio(8 * MiB, 2)
    with pytest.raises(KHOError) as err:
        radix.preserve_folio(8 * MiB + 4096, 0)
    assert err.value.errno_name == "EEXIST"
    with pytest.raises(KHOError) as err:
        radix.unpreserve_many([8 * MiB, 8 * MiB], 2)
    assert err.value.errno_name == "ENOENT" and len(radix) == 1
    assert radix.unit_at(8 * MiB + 8192) == (8 * MiB, 2) and radix.unit_at(9 * MiB) is None
    assert radix.is_preserved_array(np.array([8 * MiB, 9 * MiB, 1 << 40], dtype=np.uint64)).tolist() == [True, False, False]


def test_kernel_compatible_double_preservation():
    memory, alloc = machine(64 * MiB)
    alloc.reserve(8 * MiB, 56 * MiB)
    radix = RadixTracker(memory, alloc, strict=False)
    radix.preserve_folio(8 * MiB, 2)
    radix.preserve_folio(8 * MiB, 2)  # the same unit again: a no-op
    radix.preserve_folio(8 * MiB, 0)  # overlapping, another order: kept
    radix.preserve_many([8 * MiB, 8 * MiB, 9 * MiB], 0)
    assert radix.units() == [(8 * MiB, 0), (8 * MiB, 2), (9 * MiB, 0)]
    radix.unpreserve_folio(8 * MiB, 2)
    assert radix.is_preserved(8 * MiB) and not radix.is_preserved(8 * MiB + 4096)


def test_empty_nodes_stay_and_memory_counts_pages():
    memory, alloc = machine(64 * MiB)
    alloc.reserve(8 * MiB, 56 * MiB)
    radix = RadixTracker(memory, alloc)
    radix.preserve_folio(8 * MiB, 0)
    pages = radix.radix_pages().tolist()
    assert radix.kernel_memory().nr_leaves == 1 and radix.kernel_memory().nr_tables == 5
    radix.unpreserve_folio(8 * MiB, 0)
    assert radix.radix_pages().tolist() == pages and len(radix) == 0 and radix.units() == []
    assert all(not alloc.is_free(p, 4096) for p in pages) and 0 not in pages
