"""Edge cases of ranges, ranges-packed, maple and instructions: page 0, top of RAM, every
order, holes, long runs, tall maple trees, the FDT size of ranges, and the order loss."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.encodings import get_encoding
from kho.encodings.chunklist import CHUNK_HEADER, read_chunk_list
from kho.encodings.common import alloc_pages_bulk
from kho.encodings.maple import MAPLE_NODE, lookup
from kho.encodings.ranges import RANGE, fdt_min_bytes
from kho.encodings.ranges_packed import CHUNK_MAGIC, LENGTH_BITS, MAX_RUN_PAGES
from kho.errors import KHOError
from kho.memory.geometry import greedy_split, greedy_split_array
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea

MiB = 1 << 20
MINE = ["ranges", "ranges-packed", "maple", "instructions"]


def setup(banks=((0, 16 * MiB),), page_size=4096, scratch=()):
    memory = PhysicalMemory([Bank(*b) for b in banks], page_size)
    memory.set_scratch([ScratchArea(*s) for s in scratch])
    return memory, PageAllocator(memory, seed=1), Tracker(memory)


def round_trip(name, memory, alloc, tracker):
    enc = get_encoding(name, memory.page_size)
    encoded = enc.encode(tracker, alloc)
    return encoded, enc.decode(memory, encoded.props)


def covered(decoded, page_shift):
    out = set()
    for phys, order in decoded.units():
        out.update(range(phys >> page_shift, (phys >> page_shift) + (1 << order)))
    return out


@pytest.mark.parametrize("name", MINE)
def test_page_zero_top_of_ram_and_every_order(name):
    memory, alloc, tracker = setup(((0, 64 * MiB),))
    top = memory.banks[-1].end - 4096
    tracker.preserve_folio(0, 0)
    tracker.preserve_folio(top, 0)
    for order in range(11):  # every order up to MAX_PAGE_ORDER
        tracker.preserve_folio((order + 1) * 4 * MiB, order)
    for phys, order in tracker.units():
        alloc.reserve(phys, 4096 << order)
    _, decoded = round_trip(name, memory, alloc, tracker)
    assert covered(decoded, 12) == {p for u in tracker.units() for p in range(u[0] >> 12, (u[0] >> 12) + (1 << u[1]))}
    if decoded.exact_orders:
        assert decoded.units() == tracker.units()
    assert (0, 0) in decoded.units() or decoded.units()[0][0] == 0
    assert decoded.units()[-1][0] + (4096 << decoded.units()[-1][1]) == memory.banks[-1].end


@pytest.mark.parametrize("name", MINE)
@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
def test_banks_with_holes_adjacent_banks_and_scratch(name, page_size):
    ps = page_size
    banks = ((0, 1024 * ps), (1024 * ps, 512 * ps, 1), (4096 * ps, 1024 * ps, 2))  # 2nd touches 1st; hole before 3rd
    memory, alloc, tracker = setup(banks, ps, scratch=[(300 * ps, 100 * ps, "lowmem")])
    # A run across the boundary of the touching banks, and units on both sides of the hole.
    tracker.preserve_many(np.arange(1000, 1100, dtype=np.uint64) * np.uint64(ps), 0)
    tracker.preserve_many(np.array([1535 * ps, 4096 * ps], dtype=np.uint64), 0)
    tracker.preserve_folio(4096 * ps + 512 * ps, 9)  # ends at the top of RAM
    for phys, order in tracker.units():
        alloc.reserve(phys, ps << order)
    encoded, decoded = round_trip(name, memory, alloc, tracker)
    shift = ps.bit_length() - 1
    assert covered(decoded, shift) == {p for u in tracker.units() for p in range(u[0] >> shift, (u[0] >> shift) + (1 << u[1]))}
    for phys, order in decoded.units():  # no unit crosses a bank boundary
        assert memory.in_ram(phys, ps << order)
    if name == "ranges":
        table = np.frombuffer(encoded.props["mem"], dtype=RANGE)
        assert (1024 * ps) in table["addr"].tolist()  # the run is cut at the bank boundary


def test_ranges_packed_long_runs():
    memory, alloc, tracker = setup(((0, 256 * MiB),))
    runs = [(16, 4095), (8192, 4096), (16384, 4097), (24576, 10000)]  # start pfn, pages
    for start, pages in runs:
        tracker.preserve_pages(start * 4096, pages)
        alloc.reserve(start * 4096, pages * 4096)
    enc = get_encoding("ranges-packed")
    encoded = enc.encode(tracker, alloc)
    head = int.from_bytes(encoded.props["preserved-memory-map"], "little")
    entries = read_chunk_list(memory, head, 8, CHUNK_MAGIC, "t").payload.view("<u8")
    lengths = (entries & np.uint64(MAX_RUN_PAGES)).tolist()
    pfns = (entries >> np.uint64(LENGTH_BITS)).tolist()
    assert lengths == [4095, 4095, 1, 4095, 2, 4095, 4095, 1810]
    assert pfns == [16, 8192, 8192 + 4095, 16384, 16384 + 4095, 24576, 24576 + 4095, 24576 + 8190]
    decoded = enc.decode(memory, encoded.props)
    # Entries that touch are merged again: the split is the kernel's split of each whole run.
    expected = [(pfn << 12, order) for start, pages in runs for pfn, order in greedy_split(start, pages, 10)]
    assert decoded.units() == expected


def test_ranges_packed_spans_several_chunks():
    memory, alloc, tracker = setup(((0, 64 * MiB),))
    tracker.preserve_many(np.arange(0, 4000, 2, dtype=np.uint64) * np.uint64(4096), 0)  # 2000 isolated pages
    for phys, _ in tracker.units():
        alloc.reserve(phys, 4096)
    encoded, decoded = round_trip("ranges-packed", memory, alloc, tracker)
    assert encoded.metadata_pages.size == 4  # 510 entries a chunk
    assert decoded.units() == tracker.units()


def test_split_runs_matches_the_kernel_split():
    rng = np.random.default_rng(3)
    start = np.sort(rng.choice(1 << 20, 500, replace=False))[::2].astype(np.int64)
    end = np.minimum(start + rng.integers(1, 5000, start.size), np.append(start[1:], 1 << 21))
    pfn, order = greedy_split_array(start, end, 10)
    expected = [u for s, e in zip(start.tolist(), end.tolist()) for u in greedy_split(s, e - s, 10)]
    assert list(zip(pfn.tolist(), order.tolist())) == expected
    assert greedy_split_array(np.array([0]), np.array([5000]), 10)[1].tolist() == [10, 10, 10, 10, 9, 8, 7, 3]


@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 3000)), max_size=30), st.sampled_from([0, 3, 10]))
@settings(deadline=None, max_examples=150)
def test_split_runs_property(gaps_and_lengths, max_order):
    """Short runs only, long runs only, or both (the two code paths), against the kernel's loop."""
    start, end, pos = [], [], 0
    for gap, length in gaps_and_lengths:
        pos += gap
        start.append(pos)
        end.append(pos + length)
        pos += length + 1
    pfn, order = greedy_split_array(np.array(start, dtype=np.int64), np.array(end, dtype=np.int64), max_order)
    expected = [u for s, e in zip(start, end) for u in greedy_split(s, e - s, max_order)]
    assert list(zip(pfn.tolist(), order.tolist())) == expected


def test_ranges_loses_orders_and_a_folio_restore_fails():
    """Two order-0 folios side by side become one 8 KiB range; decoded, it is one order-1
    unit.  A folio restore of the second page finds no head there (the kernel's
    kho_restore_folio would fail), and the first comes back twice the size."""
    memory, alloc, tracker = setup()
    tracker.preserve_folio(0x10000, 0)
    tracker.preserve_folio(0x11000, 0)
    for name in ("ranges", "ranges-packed"):
        _, decoded = round_trip(name, memory, alloc, tracker)
        assert not decoded.exact_orders
        heads = dict(decoded.units())
        assert heads == {0x10000: 1}
        assert 0x11000 not in heads  # restore_folio(0x11000): no preserved head page -> fails
        assert heads[0x10000] != 0  # restore_folio(0x10000) yields an order-1 folio, not order 0
    _, exact = round_trip("maple", memory, alloc, tracker)
    assert dict(exact.units()) == {0x10000: 0, 0x11000: 0}


def test_ranges_fdt_size_is_reported_honestly():
    memory, alloc, tracker = setup()
    tracker.preserve_many(np.arange(0, 600, 2, dtype=np.uint64) * np.uint64(4096), 0)
    big = get_encoding("ranges").encode(tracker, alloc)
    assert big.nr_ranges == 300 and big.fdt_bytes == 4800
    assert not big.fits_in_fdt_page  # 300 ranges already exceed the kernel's one-page FDT
    tracker2 = Tracker(memory)
    tracker2.preserve_many(np.arange(0, 40, 2, dtype=np.uint64) * np.uint64(4096), 0)
    assert get_encoding("ranges").encode(tracker2, alloc).fits_in_fdt_page


def test_fdt_min_bytes_is_the_size_of_the_smallest_fdt():
    libfdt = pytest.importorskip("libfdt")
    props = {"mem": bytes(range(48)), "preserved-memory-map": (0x1234).to_bytes(8, "little")}
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", "kho-ranges")
    for name, value in props.items():
        sw.property(name, value)
    sw.end_node()
    fdt = sw.as_fdt()
    fdt.pack()
    assert fdt_min_bytes("kho-ranges", props) == fdt.totalsize()


def test_maple_height_three_and_more_and_lookup():
    memory, alloc, tracker = setup(((0, 256 * MiB),))
    rng = np.random.default_rng(5)
    phys = np.sort(rng.choice(15000, 5000, replace=False)).astype(np.uint64) * np.uint64(4 * 4096)
    orders = rng.integers(0, 3, phys.size).astype(np.uint8)
    tracker.preserve_many(phys, orders)
    for p, o in tracker.units():
        alloc.reserve(p, 4096 << o)
    enc = get_encoding("maple")
    encoded = enc.encode(tracker, alloc)
    assert encoded.height == 4 and encoded.nr_nodes == 313 + 20 + 2 + 1
    assert enc.decode(memory, encoded.props).units() == tracker.units()
    for p, o in tracker.units()[::37]:
        assert lookup(memory, encoded.props, p) == (p, o)
        assert enc.lookup(memory, encoded.props, p + (4096 << o) - 1) == (p, o)
    taken = set()
    for p, o in tracker.units():
        taken.update(range(p, p + (4096 << o), 4096))
    for probe in (0, 4096 * 3, int(phys[-1]) + 4 * 4096 * 8, 255 * MiB, (1 << 64) - 1):
        if probe not in taken:
            assert lookup(memory, encoded.props, probe) is None
    with pytest.raises(KHOError):
        lookup(memory, encoded.props, -1)


@pytest.mark.parametrize("n, height", [(0, 1), (1, 1), (15, 1), (16, 2), (17, 2), (255, 2), (256, 3), (4095, 3), (4096, 4)])
def test_maple_tree_shapes(n, height):
    """The rightmost leaf holds at most 15 units; trees grow a level when it would need 16."""
    memory, alloc, tracker = setup(((0, 64 * MiB),))
    if n:
        tracker.preserve_many(np.arange(n, dtype=np.uint64) * np.uint64(2 * 4096), 0)
        alloc.reserve(0, n * 2 * 4096)
    enc = get_encoding("maple")
    encoded = enc.encode(tracker, alloc)
    assert encoded.height == height
    assert enc.decode(memory, encoded.props).units() == tracker.units()
    if n:
        assert lookup(memory, encoded.props, (n - 1) * 2 * 4096) == ((n - 1) * 2 * 4096, 0)
        assert lookup(memory, encoded.props, (n - 1) * 2 * 4096 + 4096) is None


def test_maple_full_leaf_takes_its_end_from_the_parent():
    memory, alloc, tracker = setup(((0, 64 * MiB),))
    tracker.preserve_many(np.arange(20, dtype=np.uint64) * np.uint64(3 * 4096), 0)
    alloc.reserve(0, 64 * 4096)
    encoded = get_encoding("maple").encode(tracker, alloc)
    root = int.from_bytes(encoded.props["preserved-memory-map"], "little")
    node = np.frombuffer(memory.read(root, 256), dtype=MAPLE_NODE)[0]
    assert node["level"] == 1 and node["count"] == 2
    leaf = np.frombuffer(memory.read(int(node["slot"][0]), 256), dtype=MAPLE_NODE)[0]
    assert leaf["count"] == 16
    last_end = 15 * 3 * 4096 + 4095
    assert int(node["pivot"][0]) == last_end and int(leaf["pivot"][14]) == 14 * 3 * 4096 + 4095


def test_metadata_never_on_page_zero():
    memory, alloc, tracker = setup(((0, 4 * MiB),))
    pages = alloc_pages_bulk(alloc, 3, 4096)
    assert 0 not in pages.tolist() and pages.size == 3
    assert alloc.is_free(0, 4096)  # page 0 went back to the allocator
    one_by_one = alloc_pages_bulk(alloc, 3, 4096, max_order=0)  # the kernel ABIs' way
    assert one_by_one.tolist() == [pages[-1] + 4096 * i for i in range(1, 4)]
    assert CHUNK_HEADER.itemsize == 16


def test_alloc_pages_bulk_is_all_or_nothing():
    memory, alloc, _ = setup(((0, 1 * MiB),))
    free = alloc.nr_free_pages
    with pytest.raises(KHOError) as err:
        alloc_pages_bulk(alloc, free + 1, 4096)
    assert err.value.errno_name == "ENOMEM" and alloc.nr_free_pages == free


@pytest.mark.parametrize("name", MINE)
def test_encode_refuses_a_page_size_mismatch(name):
    memory, alloc, tracker = setup()
    with pytest.raises(KHOError):
        get_encoding(name, 16384).encode(tracker, alloc)
