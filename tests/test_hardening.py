"""One test per validation of the kernel-ABI decoders (kho-v1, kho-v2), in both modes.

Each case builds a small valid map by hand from the layout, breaks one thing, and states
the field the error must name and whether the kernel-compatible reader (``strict=False``)
refuses it too ("both") or accepts it ("strict" only).  The machine is the fuzz sample's:
RAM 0..16 MiB and 32..48 MiB, scratch at 4 MiB and 38 MiB, hand-made metadata in the
arena at 13 MiB.
"""

import struct

import numpy as np
import pytest
from fuzz.samples import ARENA, PS, machine

from kho.abi.kexec_handover import RadixGeometry
from kho.abi.kho_v1 import khoser_bitmap_size as chunk_capacity
from kho.encodings import get_encoding
from kho.errors import KHOFormatError

MiB = 1 << 20
MAP = "preserved-memory-map"
CAP = chunk_capacity(PS)
G = RadixGeometry(12)
#: Metadata pages: chunks (or radix nodes) from the arena's start, bitmaps (leaves) after.
C = [ARENA + i * PS for i in range(16)]
B = [ARENA + (16 + i) * PS for i in range(8)]
#: The valid units: an order-0 page in bank 0 and an order-3 folio in bank 1.
UNITS = [(12 * MiB, 0), (34 * MiB, 3)]


def u64(value: int) -> bytes:
    return struct.pack("<Q", value % (1 << 64))


def bitmap(*bits: int, size: int = PS) -> bytes:
    data = bytearray(size)
    for bit in bits:
        data[bit // 8] |= 1 << (bit % 8)
    return bytes(data)


def chunk(next_phys: int, order: int, entries, num_elms: int | None = None) -> bytes:
    """A kho-v1 chunk page: {u64 next; u32 order; u32 num_elms} then {u64 phys_start; u64 bitmap}."""
    data = struct.pack("<QII", next_phys, order, len(entries) if num_elms is None else num_elms)
    data += b"".join(struct.pack("<QQ", start, bm) for start, bm in entries)
    return data + bytes(PS - len(data))


def v1_pages():
    """The valid kho-v1 map of UNITS: chunk C0 (order 0) -> C1 (order 3), one page bitmap each."""
    return {
        C[0]: chunk(C[1], 0, [(0, B[0])]),
        C[1]: chunk(0, 3, [(0, B[1])]),
        B[0]: bitmap((12 * MiB) >> 12),
        B[1]: bitmap((34 * MiB) >> 15),
    }


def decode(name, pages, props=None, strict=True):
    memory = machine()
    for phys, page in pages.items():
        memory.write(phys, page)
    return get_encoding(name, PS).decode(memory, {MAP: u64(C[0])} if props is None else props, strict=strict)


def check(name, pages, field, modes, props=None, location=None):
    """The strict decode fails naming ``field`` (at ``location`` when given); the lenient one
    fails the same way when ``modes == "both"`` and succeeds when ``modes == "strict"``."""
    with pytest.raises(KHOFormatError) as err:
        decode(name, pages, props)
    assert err.value.field == field, err.value
    if location is not None:
        assert err.value.location == location, err.value
    if modes == "both":
        with pytest.raises(KHOFormatError) as err:
            decode(name, pages, props, strict=False)
        assert err.value.field == field, err.value
    else:
        assert modes == "strict"
        return decode(name, pages, props, strict=False)


def with_pages(base, **changes):
    pages = dict(base)
    pages.update(changes.get("pages", {}))
    return pages


# -- kho-v1 ----------------------------------------------------------------------------------

def test_v1_valid_map_decodes_in_both_modes():
    for strict in (True, False):
        assert decode("kho-v1", v1_pages(), strict=strict).units() == UNITS


@pytest.mark.parametrize("props, modes", [
    pytest.param({}, "both", id="missing"),
    pytest.param({MAP: b"\1" * 4}, "both", id="4-bytes"),
    pytest.param({MAP: u64(C[0] + 8)}, "both", id="misaligned"),
    pytest.param({MAP: u64(20 * MiB)}, "both", id="in-the-hole"),
    pytest.param({MAP: u64(1 << 60)}, "both", id="beyond-RAM"),
    pytest.param({MAP: u64(4 * MiB)}, "strict", id="in-scratch"),
])
def test_v1_map_pointer(props, modes):
    check("kho-v1", v1_pages(), "fdt.preserved-memory-map", modes, props)


def test_v1_zero_map_pointer_is_empty_only_when_lenient():
    with pytest.raises(KHOFormatError):
        decode("kho-v1", v1_pages(), {MAP: u64(0)})
    assert len(decode("kho-v1", v1_pages(), {MAP: u64(0)}, strict=False)) == 0


@pytest.mark.parametrize("edit, field, modes", [
    pytest.param({C[1]: chunk(C[0], 3, [(0, B[1])])}, "chunk.next", "both", id="loop"),
    pytest.param({C[0]: chunk(C[0], 0, [(0, B[0])])}, "chunk.next", "both", id="self-loop"),
    pytest.param({C[0]: chunk(C[1] + 8, 0, [(0, B[0])])}, "chunk.next", "both", id="next-misaligned"),
    pytest.param({C[0]: chunk(30 * MiB, 0, [(0, B[0])])}, "chunk.next", "both", id="next-in-the-hole"),
    pytest.param({C[0]: chunk(38 * MiB, 0, [(0, B[0])])}, "chunk.next", "strict", id="next-in-scratch"),
    pytest.param({C[0]: chunk(C[1], 0, [(0, B[0])], num_elms=CAP + 1)}, "chunk.num_elms", "both", id="num_elms-past-the-page"),
    pytest.param({C[0]: chunk(C[1], 0, [(0, B[0])], num_elms=1 << 31)}, "chunk.num_elms", "both", id="num_elms-huge"),
    pytest.param({C[1]: chunk(0, 11, [(0, B[1])]), B[1]: bitmap((32 * MiB) >> 23)}, "chunk.order", "strict",
                 id="order-above-MAX_PAGE_ORDER"),
    pytest.param({C[1]: chunk(0, 41, [(0, B[1])])}, "chunk.order", "both", id="order-beyond-52-bits"),
    pytest.param({C[0]: chunk(C[1], 3, [(0, B[1])]), C[1]: chunk(0, 0, [(0, B[0])])}, "chunk.order", "strict",
                 id="orders-descending"),
    pytest.param({C[0]: chunk(C[1], 0, [(0, B[0])]), C[1]: chunk(C[2], 0, [(128 * MiB, B[2])]),
                  C[2]: chunk(0, 3, [(0, B[1])]), B[2]: bytes(PS)}, "chunk.num_elms", "strict",
                 id="same-order-after-a-partial-chunk"),
])
def test_v1_chunk_list(edit, field, modes):
    check("kho-v1", with_pages(v1_pages(), pages=edit), field, modes)


@pytest.mark.parametrize("entries, field, modes", [
    pytest.param([(1 << 52, B[0])], "chunk.phys_start", "both", id="beyond-52-bits"),
    pytest.param([(PS, B[0])], "chunk.phys_start", "strict", id="not-a-bitmap-span"),
    pytest.param([(0, B[0]), (0, B[2])], "chunk.phys_start", "strict", id="repeated"),
    pytest.param([(128 * MiB, B[2]), (0, B[0])], "chunk.phys_start", "strict", id="descending"),
    pytest.param([(0, B[0] + 512)], "chunk.bitmap", "both", id="bitmap-misaligned"),
    pytest.param([(0, 30 * MiB)], "chunk.bitmap", "both", id="bitmap-in-the-hole"),
    pytest.param([(0, 64 * MiB)], "chunk.bitmap", "both", id="bitmap-beyond-RAM"),
    pytest.param([(0, 38 * MiB)], "chunk.bitmap", "strict", id="bitmap-in-scratch"),
    pytest.param([(0, B[1])], "chunk.bitmap", "both", id="bitmap-shared-with-another-chunk"),
    pytest.param([(0, C[1])], "chunk.bitmap", "both", id="chunk-page-as-bitmap"),
])
def test_v1_entries(entries, field, modes):
    pages = with_pages(v1_pages(), pages={C[0]: chunk(C[1], 0, entries), B[2]: bytes(PS)})
    check("kho-v1", pages, field, modes)


def test_v1_entry_error_names_the_entry_address():
    pages = with_pages(v1_pages(), pages={C[0]: chunk(C[1], 0, [(0, B[0]), (1 << 52, B[2])])})
    check("kho-v1", pages, "chunk.phys_start", "both", location=C[0] + 16 + 16)


@pytest.mark.parametrize("edit, field, modes", [
    pytest.param({B[0]: bitmap(3072, 3073, 5000)}, "unit", "both", id="unit-in-the-hole"),  # page 5000 = 19.5 MiB
    pytest.param({B[0]: bitmap(3072, (4 * MiB) >> 12)}, "unit", "strict", id="unit-in-scratch"),
    pytest.param({B[0]: bitmap(3072, (34 * MiB) >> 12)}, "unit", "strict", id="units-overlap"),
    pytest.param({B[0]: bitmap(3072, C[1] >> 12)}, "chunk.bitmap", "strict", id="metadata-inside-a-unit"),
])
def test_v1_units(edit, field, modes):
    check("kho-v1", with_pages(v1_pages(), pages=edit), field, modes)


# -- kho-v2 ----------------------------------------------------------------------------------

def v2_pages(units=UNITS, extra_leaf_bits=()):
    """A kho-v2 tree for ``units`` with nodes at C[...] (root C[0]) and leaves at B[...];
    returns (pages, {(level, prefix): phys})."""
    nodes = {(G.root_level, 0): C[0]}
    tables: dict[int, dict[int, int]] = {C[0]: {}}
    leaves: dict[int, set[int]] = {}
    free_nodes, free_leaves = iter(C[1:]), iter(B)
    for phys, order in units:
        key = G.encode_key(phys, order)
        parent = C[0]
        for level in range(G.root_level, 0, -1):
            prefix = key >> ((level - 1) * G.table_log2 + G.bitmap_log2)
            if (level - 1, prefix) not in nodes:
                child = next(free_leaves) if level == 1 else next(free_nodes)
                nodes[(level - 1, prefix)] = child
                (leaves.setdefault(child, set()) if level == 1 else tables.setdefault(child, {}))
            child = nodes[(level - 1, prefix)]
            tables[parent][G.table_index(key, level)] = child
            parent = child
        leaves[parent].add(G.bitmap_index(key))
    pages = {}
    for phys, slots in tables.items():
        data = bytearray(PS)
        for index, child in slots.items():
            data[8 * index:8 * index + 8] = u64(child)
        pages[phys] = bytes(data)
    for phys, bits in leaves.items():
        pages[phys] = bitmap(*bits, *extra_leaf_bits)
    return pages, nodes


def slot_of(phys, order, level):
    return 8 * G.table_index(G.encode_key(phys, order), level)


def patch(page: bytes, offset: int, value: int) -> bytes:
    return page[:offset] + u64(value) + page[offset + 8:]


def test_v2_valid_tree_decodes_in_both_modes():
    pages, _ = v2_pages()
    for strict in (True, False):
        assert decode("kho-v2", pages, strict=strict).units() == UNITS


@pytest.mark.parametrize("props, modes", [
    pytest.param({MAP: u64(0)}, "both", id="zero"),
    pytest.param({MAP: u64(C[0] + 8)}, "both", id="misaligned"),
    pytest.param({MAP: u64(1 << 45)}, "both", id="beyond-RAM"),
    pytest.param({MAP: u64(38 * MiB)}, "strict", id="in-scratch"),
])
def test_v2_root_pointer(props, modes):
    check("kho-v2", v2_pages()[0], "fdt.preserved-memory-map", modes, props)


def corrupt_slot(level, value, unit=UNITS[0]):
    """The tree with the slot on ``unit``'s path at ``level`` set to ``value``."""
    pages, nodes = v2_pages()
    key = G.encode_key(*unit)
    node = nodes[(level, key >> ((level) * G.table_log2 + G.bitmap_log2))]
    pages[node] = patch(pages[node], slot_of(*unit, level), value)
    return pages, node


@pytest.mark.parametrize("level, value, field, modes", [
    pytest.param(5, C[0], "radix.node", "both", id="loop-to-the-root"),
    pytest.param(3, C[0] + 8, "radix.node", "both", id="misaligned"),
    pytest.param(2, 30 * MiB, "radix.node", "both", id="in-the-hole"),
    pytest.param(4, 38 * MiB, "radix.node", "strict", id="in-scratch"),
    pytest.param(1, B[1], "radix.leaf", "both", id="leaf-shared-by-two-paths"),
    pytest.param(1, 1 << 50, "radix.leaf", "both", id="leaf-beyond-RAM"),
])
def test_v2_pointers(level, value, field, modes):
    pages, _ = corrupt_slot(level, value)
    check("kho-v2", pages, field, modes)


def test_v2_slot_holding_keys_of_no_order():
    pages, nodes = v2_pages()
    root = pages[C[0]]
    pages[C[0]] = patch(root, 8 * 4, C[1])  # root slot 4: keys from 2**53, whose order would be negative
    check("kho-v2", pages, "radix.table", "both", location=C[0] + 8 * 4)


@pytest.mark.parametrize("order, field, modes", [pytest.param(11, "unit", "strict", id="order-11"),
                                                pytest.param(45, "radix.key", "both", id="order-45")])
def test_v2_leaf_key_order(order, field, modes):
    """A leaf whose keys encode ``order``: above MAX_PAGE_ORDER (Linux 7.x writes such units:
    read in both modes; here 8 MiB at 0, which only a strict read refuses, for the scratch
    area it covers), or too large for 52-bit addresses (refused in both)."""
    pages, nodes = v2_pages()
    key = G.encode_key(0, order)
    free = iter(C[10:])
    parent = C[0]
    for level in range(G.root_level, 0, -1):
        child = B[7] if level == 1 else next(free)
        page = pages.get(parent, bytes(PS))
        pages[parent] = patch(page, 8 * G.table_index(key, level), child)
        pages.setdefault(child, bytes(PS))
        parent = child
    pages[B[7]] = bitmap(0)
    result = check("kho-v2", pages, field, modes)
    if result is not None:
        assert (0, order) in result.units()


@pytest.mark.parametrize("extra, field, modes", [
    pytest.param([(20 * MiB) >> 12], "unit", "both", id="unit-in-the-hole"),
    pytest.param([(4 * MiB) >> 12], "unit", "strict", id="unit-in-scratch"),
    pytest.param([C[2] >> 12], "radix.node", "strict", id="metadata-inside-a-unit"),
])
def test_v2_units(extra, field, modes):
    """Extra bits in the order-0 leaf (units 12 MiB + ...; leaf covers 0..128 MiB)."""
    pages, nodes = v2_pages(units=[(12 * MiB, 0)], extra_leaf_bits=extra)
    check("kho-v2", pages, field, modes)


def test_v2_overlap_of_two_orders():
    pages, _ = v2_pages(units=[(34 * MiB, 3), (34 * MiB + PS, 0)])
    result = check("kho-v2", pages, "unit", "strict")
    assert result.units() == [(34 * MiB, 3), (34 * MiB + PS, 0)]


def test_bounded_reads_for_a_wide_tree():
    """A level-4 node whose 512 slots point at 512 distinct pages never written: each is read
    once as an empty node (512 reads for one page of input), nothing below; both modes succeed."""
    table = np.arange(512, dtype="<u8") * np.uint64(PS) + np.uint64(14 * MiB)
    pages = {C[0]: patch(bytes(PS), 0, C[1]), C[1]: table.tobytes()}
    for strict in (True, False):
        assert len(decode("kho-v2", pages, strict=strict)) == 0


def test_v1_unit_past_52_bits_never_wraps():
    """Order 40 is the largest a unit can have; its unit number 1 would start at 2**52.
    Strict refuses the order; lenient computes the address exactly and refuses the unit
    (shifted in 64 bits it would have wrapped onto RAM from unit 4096 on)."""
    pages = with_pages(v1_pages(), pages={C[1]: chunk(0, 40, [(0, B[1])]), B[1]: bitmap(1, 4096)})
    with pytest.raises(KHOFormatError) as err:
        decode("kho-v1", pages)
    assert err.value.field == "chunk.order"
    with pytest.raises(KHOFormatError) as err:
        decode("kho-v1", pages, strict=False)
    assert err.value.field == "unit" and "52-bit" in str(err.value) and err.value.location == B[1]
