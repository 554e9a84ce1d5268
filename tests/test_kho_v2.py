"""kho-v2: key arithmetic, round trips, a golden radix tree written from the layout, bad input."""


import numpy as np
import pytest
from abi_helpers import MAP, PS, MiB, ScriptedAllocator, machines_and_units, memory_with, u64
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kho.abi.kexec_handover import RadixGeometry
from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.encodings.kho_v2 import KhoV2
from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory, ScratchArea


def table(slots):
    """An inner node page: u64 table[512], ``slots`` = {index: phys}."""
    data = bytearray(PS)
    for index, phys in slots.items():
        data[8 * index:8 * index + 8] = u64(phys)
    return bytes(data)


def leaf(bits):
    data = bytearray(PS)
    for bit in bits:
        data[bit // 8] |= 1 << (bit % 8)
    return bytes(data)


# -- geometry ---------------------------------------------------------------------------------

def test_geometry_from_page_shift():
    g4, g16, g64 = RadixGeometry(12), RadixGeometry(14), RadixGeometry(16)
    assert (g4.order0_log2, g4.table_log2, g4.bitmap_log2, g4.depth) == (52, 9, 15, 6)
    assert (g16.order0_log2, g16.table_log2, g16.bitmap_log2, g16.depth) == (50, 11, 17, 4)
    assert (g64.order0_log2, g64.table_log2, g64.bitmap_log2, g64.depth) == (48, 13, 19, 4)


@given(st.integers(0, (1 << 40) - 1), st.integers(0, 10))
def test_key_round_trip(unit, order):
    g = RadixGeometry(12)
    phys = unit << (12 + order)
    key = g.encode_key(phys, order)
    assert key.bit_length() == 52 - order + 1
    assert g.decode_key(key) == (phys, order)
    assert g.bitmap_index(key) == key % (1 << 15)
    assert g.table_index(key, 1) == (key >> 15) % 512 and g.table_index(key, 5) == (key >> 51) % 512


# -- golden tree ------------------------------------------------------------------------------
# Units: order 0 at 0x0 (page 0) and 0x5000, order 2 at 0x100000.
# Keys: order 0 -> 1 << 52 | pfn (leaf key 1 << 37, bits 0 and 5); order 2 -> 1 << 50 | 0x40
# (leaf key 1 << 35, bit 64).  Slots by level (leaf key >> 9*(level-1)) % 512:
#   order 2: level 5: 0, level 4: 256, levels 3..1: 0;  order 0: level 5: 2, levels 4..1: 0.
# kho allocates the root, then each level's nodes (ascending key) from level 4 down, then leaves.
P = [0x400000 + i * PS for i in range(11)]
GOLDEN = {
    P[0]: table({0: P[1], 2: P[2]}),      # root (level 5)
    P[1]: table({256: P[3]}), P[2]: table({0: P[4]}),  # level 4: order 2, order 0
    P[3]: table({0: P[5]}), P[4]: table({0: P[6]}),    # level 3
    P[5]: table({0: P[7]}), P[6]: table({0: P[8]}),    # level 2
    P[7]: table({0: P[9]}), P[8]: table({0: P[10]}),   # level 1
    P[9]: leaf([64]), P[10]: leaf([0, 5]),              # leaves
}
GOLDEN_UNITS = [(0x0, 0), (0x5000, 0), (0x100000, 2)]


def golden_memory(overrides=None):
    return memory_with(GOLDEN, overrides)


def test_golden_tree_decodes():
    decoded = KhoV2(PS).decode(golden_memory(), {MAP: u64(P[0])})
    assert decoded.units() == GOLDEN_UNITS and decoded.exact_orders
    assert decoded.metadata_pages.tolist() == P


@pytest.mark.parametrize("preserve_bits", [4096, "page"])
def test_encoder_writes_the_golden_bytes(preserve_bits):
    memory = PhysicalMemory.single_bank(16 * MiB)
    tracker = Tracker(memory, preserve_bits)
    for phys, order in GOLDEN_UNITS:
        tracker.preserve_folio(phys, order)
    out = KhoV2(PS).encode(tracker, ScriptedAllocator(P))
    assert out.props == {MAP: u64(P[0])} and out.compatible == "kho-v2"
    assert out.metadata_pages.tolist() == P
    for phys, page in GOLDEN.items():
        assert memory.read(phys, PS) == page, hex(phys)


def test_walk_order_is_highest_order_first():
    """The kernel's walk order (ascending keys): order 2 before order 0."""
    g = RadixGeometry(12)
    keys = sorted(g.encode_key(p, o) for p, o in GOLDEN_UNITS)
    assert [g.decode_key(k) for k in keys] == [(0x100000, 2), (0x0, 0), (0x5000, 0)]


def test_empty_tracker_is_a_bare_root():
    memory = PhysicalMemory.single_bank(16 * MiB)
    out = KhoV2(PS).encode(Tracker(memory), PageAllocator(memory))
    assert out.metadata_pages.size == 1 and memory.read(int(out.metadata_pages[0]), PS) == bytes(PS)
    assert len(KhoV2(PS).decode(memory, out.props)) == 0


def test_page_zero_is_never_a_node():
    memory = PhysicalMemory.single_bank(16 * MiB)
    alloc = PageAllocator(memory)
    out = KhoV2(PS).encode(Tracker(memory), alloc)
    assert out.metadata_pages.tolist() == [PS] and alloc.is_free(0, PS)


def test_enomem_frees_what_was_taken():
    memory = PhysicalMemory.single_bank(16 * MiB)
    tracker = Tracker(memory)
    tracker.preserve_folio(0x5000, 0)
    alloc = ScriptedAllocator(P[:3])
    with pytest.raises(KHOError) as err:
        KhoV2(PS).encode(tracker, alloc)
    assert err.value.errno_name == "ENOMEM" and alloc.freed == P[:3] and memory.nr_stored_pages == 0


# -- round trips ------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machines_and_units(), st.sampled_from([4096, "page"]))
def test_round_trip(machine, preserve_bits):
    memory, candidates = machine
    tracker = Tracker(memory, preserve_bits)
    for phys, order in candidates:
        size = PS << order
        try:
            tracker.preserve_folio(phys // size * size, order)
        except KHOError:
            pass
    alloc = PageAllocator(memory)
    for phys, order in tracker.units():
        alloc.reserve(phys, PS << order)
    # A machine whose every page is preserved leaves no page for the map (ENOMEM, tested above).
    assume(alloc.nr_free_pages >= 2 * RadixGeometry(12).depth + len(tracker))
    out = KhoV2(PS).encode(tracker, alloc)
    decoded = KhoV2(PS).decode(memory, out.props)
    phys, order = tracker.units_array()
    assert np.array_equal(decoded.phys, phys) and np.array_equal(decoded.order, order)
    assert decoded.metadata_pages.tolist() == out.metadata_pages.tolist()
    assert 0 not in out.metadata_pages.tolist()


@pytest.mark.parametrize("page_size, orders", [(16384, (1, 3, 11)), (65536, (0, 3, 13))])
def test_other_page_sizes(page_size, orders):
    memory = PhysicalMemory.single_bank(4 << 30, page_size)
    alloc = PageAllocator(memory, seed=5)
    tracker = Tracker(memory)
    max_order = memory.geometry.max_order
    for order in sorted(orders, reverse=True):
        tracker.preserve_many(alloc.alloc_many(2 if order == max_order else 7, order), order)
    enc = KhoV2(page_size)
    out = enc.encode(tracker, alloc)
    assert enc.decode(memory, out.props).units() == tracker.units()
    assert out.metadata_pages.size == 1 + (enc.geometry.depth - 2) * len(orders) + len(orders)


def test_16k_pages_cannot_hold_order_0():
    """The kernel's depth formula leaves the order-0 order bit (bit 50) outside a 16 KiB-page tree."""
    memory = PhysicalMemory.single_bank(1 << 30, 16384)
    tracker = Tracker(memory)
    tracker.preserve_folio(16384 * 7, 0)
    with pytest.raises(KHOError) as err:
        KhoV2(16384).encode(tracker, PageAllocator(memory))
    assert err.value.errno_name == "EINVAL" and "order 0" in err.value.message


# -- bad input ------------------------------------------------------------------------------------

def decode_error(memory, props=None):
    with pytest.raises(KHOFormatError) as err:
        KhoV2(PS).decode(memory, {MAP: u64(P[0])} if props is None else props)
    return err.value


@pytest.mark.parametrize("props", [{}, {MAP: b"\1" * 7}, {MAP: u64(0)}, {MAP: u64(P[0] + 8)}, {MAP: u64(1 << 45)}])
def test_bad_root_pointer(props):
    assert decode_error(golden_memory(), props).field == "fdt.preserved-memory-map"


def test_node_reached_twice():
    err = decode_error(golden_memory({P[3]: table({0: P[5], 1: P[5]})}))
    assert err.field == "radix.node" and "twice" in str(err)


def test_loop_back_to_the_root():
    err = decode_error(golden_memory({P[7]: table({0: P[0]})}))
    assert err.field == "radix.leaf" and "twice" in str(err)


def test_leaf_shared_by_two_parents():
    assert "twice" in str(decode_error(golden_memory({P[8]: table({0: P[9]})})))


@pytest.mark.parametrize("page, field", [
    (table({0: P[1], 2: P[2], 4: P[3]}), "radix.table"),  # keys >= 2**53: no order
    (table({0: P[1], 2: 1 << 40}), "radix.node"),
    (table({0: P[1], 2: P[2] + 12}), "radix.node"),
])
def test_corrupt_root(page, field):
    assert decode_error(golden_memory({P[0]: page})).field == field


def test_order_above_max_page_order():
    """Leaf key 1 << 25 (root slot 0, level 4 slot 0, level 3 slot 128) has fls 26 + 15 = 41:
    order 52 - 41 + 1 = 12, above MAX_PAGE_ORDER 10.  Linux 7.x writes such units (its
    kho_preserve_pages does not cap the split), so the key is read; the unit, 16 MiB at
    16 MiB, lies past this machine's RAM, which both modes refuse."""
    extra = {P[1]: table({0: 0x600000, 256: P[3]}), 0x600000: table({128: 0x601000}),
             0x601000: table({0: 0x602000}), 0x602000: table({0: 0x603000}), 0x603000: leaf([1])}
    err = decode_error(golden_memory(extra))
    assert err.field == "unit" and "order 12: outside RAM" in str(err) and err.location == 1 << 24


def test_unit_outside_ram_and_overlap():
    err = decode_error(golden_memory({P[10]: leaf([0, 5, 5000])}))  # page 5000 is beyond 16 MiB
    assert err.field == "unit" and "outside RAM" in str(err)
    err = decode_error(golden_memory({P[9]: leaf([0])}))  # order 2 at 0 overlaps page 0
    assert err.field == "unit" and "overlaps" in str(err)


def test_unit_in_scratch():
    memory = golden_memory()
    memory.set_scratch([ScratchArea(0x100000, 0x100000, "global")])
    assert "scratch" in str(decode_error(memory))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_corruption_never_crashes(data):
    target = data.draw(st.sampled_from(P))
    page = bytearray(GOLDEN[target])
    for _ in range(data.draw(st.integers(1, 4))):
        offset = data.draw(st.one_of(st.integers(0, 31), st.integers(2040, 2063), st.integers(0, PS - 1)))
        page[offset] = data.draw(st.integers(0, 255))
    try:
        decoded = KhoV2(PS).decode(golden_memory({target: bytes(page)}), {MAP: u64(P[0])})
    except KHOFormatError:
        return
    ends = decoded.phys + (np.uint64(PS) << decoded.order.astype(np.uint64))
    assert np.all(decoded.phys[1:] >= ends[:-1]) and np.all(ends <= 16 * MiB)
