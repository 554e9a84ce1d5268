"""kho-v1: round trips, a golden image written from the layout, conversions, bad input."""

import struct

import numpy as np
import pytest
from abi_helpers import MAP, PS, MiB, ScriptedAllocator, machines_and_units, memory_with, u64
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kho.abi.kho_v1 import khoser_bitmap_size as chunk_capacity
from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.encodings import get_encoding
from kho.encodings.kho_v1 import KhoV1
from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory, ScratchArea


def chunk_page(next_phys, order, entries, page_size=PS, num_elms=None):
    """A chunk page from the layout: {u64 next; u32 order; u32 num_elms} then {u64, u64} entries."""
    data = struct.pack("<QII", next_phys, order, len(entries) if num_elms is None else num_elms)
    data += b"".join(struct.pack("<QQ", start, bitmap) for start, bitmap in entries)
    return data + bytes(page_size - len(data))


def with_allocator(memory, tracker):
    """A page allocator for metadata that avoids every preserved unit."""
    alloc = PageAllocator(memory)
    for phys, order in tracker.units():
        alloc.reserve(phys, PS << order)
    return alloc


# -- golden image ---------------------------------------------------------------------------
# Units: order 0 at 0x0 (page 0) and 0x5000, order 2 at 0x100000.
# kho allocates the chunk pages first (one per order), then the bitmap pages.
C0, C1, B0, B1 = 0x200000, 0x201000, 0x202000, 0x203000


def golden_pages(bitmap_bytes):
    if bitmap_bytes == PS:
        b0 = bytes([0b00100001]) + bytes(PS - 1)  # bits 0 and 5
        b1 = bytes(8) + bytes([1]) + bytes(PS - 9)  # order 2: pfn 0x100 >> 2 = 64 -> byte 8 bit 0
        return {C0: chunk_page(C1, 0, [(0, B0)]), C1: chunk_page(0, 2, [(0, B1)]), B0: b0, B1: b1}
    # 512-byte bitmaps: both packed into the first bitmap page, the second at offset 512
    bitmaps = bytes([0b00100001]) + bytes(511) + bytes(8) + bytes([1]) + bytes(503)
    return {C0: chunk_page(C1, 0, [(0, B0)]), C1: chunk_page(0, 2, [(0, B0 + 512)]), B0: bitmaps + bytes(PS - 1024)}


GOLDEN_UNITS = [(0x0, 0), (0x5000, 0), (0x100000, 2)]


@pytest.mark.parametrize("bitmap_bytes", [PS, 512])
def test_golden_image_decodes(bitmap_bytes):
    memory = PhysicalMemory.single_bank(16 * MiB)
    for phys, page in golden_pages(bitmap_bytes).items():
        memory.write(phys, page)
    decoded = KhoV1(PS, bitmap_bytes="page" if bitmap_bytes == PS else 512).decode(memory, {MAP: u64(C0)})
    assert decoded.units() == GOLDEN_UNITS and decoded.exact_orders
    assert sorted(decoded.metadata_pages.tolist()) == sorted(golden_pages(bitmap_bytes))


@pytest.mark.parametrize("bitmap_bytes", [PS, 512])
@pytest.mark.parametrize("preserve_bits", [4096, "page"])
def test_encoder_writes_the_golden_bytes(bitmap_bytes, preserve_bits):
    memory = PhysicalMemory.single_bank(16 * MiB)
    tracker = Tracker(memory, preserve_bits)
    for phys, order in GOLDEN_UNITS:
        tracker.preserve_folio(phys, order)
    expected = golden_pages(bitmap_bytes)
    alloc = ScriptedAllocator(sorted(expected))
    enc = KhoV1(PS, bitmap_bytes="page" if bitmap_bytes == PS else 512)
    out = enc.encode(tracker, alloc)
    assert out.props == {MAP: u64(C0)} and out.compatible == "kho-v1"
    assert out.metadata_pages.tolist() == sorted(expected)
    for phys, page in expected.items():
        assert memory.read(phys, PS) == page, hex(phys)
    assert out.options == {"bitmap_bytes": "page" if bitmap_bytes == PS else 512}


def test_chunk_capacity_and_options():
    assert chunk_capacity(4096) == 255 and chunk_capacity(16384) == 1023 and chunk_capacity(65536) == 4095
    assert get_encoding("kho-v1", 4096, bitmap_bytes=512).options() == {"bitmap_bytes": 512}
    assert get_encoding("kho-v1", 4096).options() == {"bitmap_bytes": "page"}
    with pytest.raises(KHOError) as err:
        KhoV1(4096, bitmap_bytes=1024)
    assert err.value.errno_name == "EINVAL"


def test_a_full_chunk_starts_a_new_one():
    """300 bitmaps of order 0 need two chunks (255 + 45); order 3 starts its own."""
    memory = PhysicalMemory.single_bank(8 << 30)
    tracker = Tracker(memory, 4096)  # a 512-byte bitmap covers 16 MiB of order-0 pages
    phys = np.arange(300, dtype=np.uint64) * np.uint64(16 * MiB)
    tracker.preserve_many(phys, 0)
    tracker.preserve_folio(int(phys[-1]) + PS * 8, 3)
    enc = KhoV1(PS, bitmap_bytes=512)
    out = enc.encode(tracker, with_allocator(memory, tracker))
    _, chunks = enc.walk_chunks(memory, struct.unpack("<Q", out.props[MAP])[0])
    assert chunks["hdr"]["order"].tolist() == [0, 0, 3]
    assert chunks["hdr"]["num_elms"].tolist() == [255, 45, 1]
    assert out.metadata_pages.size == 3 + -(-301 // 8)
    assert enc.decode(memory, out.props).units() == tracker.units()


# -- round trips ------------------------------------------------------------------------------


def preserve_candidates(tracker, candidates):
    for phys, order in candidates:
        size = PS << order
        try:
            tracker.preserve_folio(phys // size * size, order)
        except KHOError:
            pass  # outside RAM / overlapping: skipped


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machines_and_units(), st.sampled_from([(4096, 512), (4096, "page"), ("page", 512), ("page", "page")]))
def test_round_trip(machine, bits):
    memory, candidates = machine
    preserve_bits, bitmap_bytes = bits
    tracker = Tracker(memory, preserve_bits)
    preserve_candidates(tracker, candidates)
    enc = KhoV1(PS, bitmap_bytes=bitmap_bytes)
    alloc = with_allocator(memory, tracker)
    free_before = alloc.nr_free_pages
    # A machine whose every page is preserved leaves no page for the map (ENOMEM, tested apart).
    assume(free_before >= 2 + 2 * len(tracker))
    out = enc.encode(tracker, alloc)
    assert free_before - alloc.nr_free_pages == out.metadata_pages.size
    decoded = enc.decode(memory, out.props)
    phys, order = tracker.units_array()
    assert np.array_equal(decoded.phys, phys) and np.array_equal(decoded.order, order)
    assert set(decoded.metadata_pages.tolist()) == set(out.metadata_pages.tolist())
    assert not tracker.is_preserved_array(out.metadata_pages).any()


@pytest.mark.parametrize("page_size", [16384, 65536])
def test_other_page_sizes(page_size):
    memory = PhysicalMemory.single_bank(4 << 30, page_size)
    alloc = PageAllocator(memory, seed=3)
    tracker = Tracker(memory)
    max_order = memory.geometry.max_order
    for order in (0, 1, max_order):
        tracker.preserve_many(alloc.alloc_many(2 if order == max_order else 5, order), order)
    for bitmap_bytes in ("page", 512):
        enc = KhoV1(page_size, bitmap_bytes=bitmap_bytes)
        out = enc.encode(tracker, alloc)
        assert enc.decode(memory, out.props).units() == tracker.units()


def test_empty_tracker_writes_one_empty_chunk():
    memory = PhysicalMemory.single_bank(16 * MiB)
    enc = KhoV1(PS)
    out = enc.encode(Tracker(memory), PageAllocator(memory))
    assert out.metadata_pages.size == 1
    decoded = enc.decode(memory, out.props)
    assert len(decoded) == 0 and decoded.metadata_pages.tolist() == out.metadata_pages.tolist()


def test_enomem_frees_what_was_taken():
    memory = PhysicalMemory.single_bank(16 * MiB)
    tracker = Tracker(memory)
    tracker.preserve_folio(0, 0)
    tracker.preserve_folio(0x100000, 2)
    alloc = ScriptedAllocator([C0, C1, B0])  # needs 4 pages
    with pytest.raises(KHOError) as err:
        KhoV1(PS).encode(tracker, alloc)
    assert err.value.errno_name == "ENOMEM" and sorted(alloc.freed) == [C0, C1, B0]
    assert memory.nr_stored_pages == 0


def test_page_size_mismatch():
    memory = PhysicalMemory.single_bank(64 * MiB, 16384)
    with pytest.raises(KHOError):
        KhoV1(4096).encode(Tracker(memory), PageAllocator(memory))


# -- bad input ------------------------------------------------------------------------------------

def golden_memory(overrides=None):
    return memory_with(golden_pages(PS), overrides)


def decode_error(memory, props=None, enc=None):
    enc = enc or KhoV1(PS)
    with pytest.raises(KHOFormatError) as err:
        enc.decode(memory, {MAP: u64(C0)} if props is None else props)
    return err.value


@pytest.mark.parametrize("props, field", [
    ({}, "fdt.preserved-memory-map"),
    ({MAP: b"\0" * 4}, "fdt.preserved-memory-map"),
    ({MAP: u64(0)}, "fdt.preserved-memory-map"),
    ({MAP: u64(C0 + 8)}, "fdt.preserved-memory-map"),
    ({MAP: u64(1 << 40)}, "fdt.preserved-memory-map"),
])
def test_bad_map_pointer(props, field):
    assert decode_error(golden_memory(), props).field == field


def test_looping_chunk_list():
    err = decode_error(golden_memory({C1: chunk_page(C0, 2, [(0, B1)])}))
    assert err.field == "chunk.next" and err.location == C0


def test_self_loop():
    assert decode_error(golden_memory({C0: chunk_page(C0, 0, [(0, B0)])})).field == "chunk.next"


@pytest.mark.parametrize("page, field", [
    (chunk_page(C1, 0, [(0, B0)], num_elms=256), "chunk.num_elms"),
    (chunk_page(C1, 11, [(0, B0)]), "chunk.order"),
    (chunk_page(0x5000000, 0, [(0, B0)]), "chunk.next"),
    (chunk_page(C1 + 16, 0, [(0, B0)]), "chunk.next"),
    (chunk_page(C1, 0, [(0, 0x5000000)]), "chunk.bitmap"),
    (chunk_page(C1, 0, [(0, B0 + 8)]), "chunk.bitmap"),
    (chunk_page(C1, 0, [(0x1000, B0)]), "chunk.phys_start"),
    (chunk_page(C1, 0, [(1 << 60, B0)]), "chunk.phys_start"),
    (chunk_page(C1, 0, [(0, B1)]), "chunk.bitmap"),  # B1 is also the order-2 entry's bitmap
    (chunk_page(C1, 0, [(0, C1)]), "chunk.bitmap"),  # a chunk page used as a bitmap
    (chunk_page(C1, 0, [(0, B0), (0, B0 + 0)]), "chunk.phys_start"),
])
def test_corrupt_first_chunk(page, field):
    assert decode_error(golden_memory({C0: page})).field == field


def test_overlapping_units():
    # order 2 at 0x0 (bit 0 of the order-2 bitmap) overlaps the order-0 page 0x0
    err = decode_error(golden_memory({B1: bytes([1]) + bytes(PS - 1)}))
    assert err.field == "unit" and "overlaps" in str(err)


def test_unit_outside_ram():
    # bit 5000 of the order-0 bitmap is page 5000 = 0x1388000, beyond 16 MiB
    bitmap = bytearray(PS)
    bitmap[5000 // 8] |= 1 << (5000 % 8)
    err = decode_error(golden_memory({B0: bytes(bitmap)}))
    assert err.field == "unit" and "outside RAM" in str(err)


def test_unit_in_scratch():
    memory = golden_memory()
    memory.set_scratch([ScratchArea(0x4000, 0x4000, "lowmem")])
    assert "scratch" in str(decode_error(memory))


def test_bitmap_size_must_match_the_encoding():
    """A page-bitmap decoder reading a 6.16 (512-byte bitmap) map finds a bitmap that is not page-aligned."""
    memory = PhysicalMemory.single_bank(16 * MiB)
    for phys, page in golden_pages(512).items():
        memory.write(phys, page)
    err = decode_error(memory, enc=KhoV1(PS, bitmap_bytes="page"))
    assert err.field == "chunk.bitmap" and err.location == B0 + 512


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_corruption_never_crashes(data):
    """Random byte rewrites of the metadata: decode succeeds with valid units or raises KHOFormatError."""
    pages = golden_pages(PS)
    target = data.draw(st.sampled_from(sorted(pages)))
    page = bytearray(pages[target])
    for _ in range(data.draw(st.integers(1, 4))):
        offset = data.draw(st.integers(0, 63 if target in (C0, C1) else PS - 1))
        page[offset] = data.draw(st.integers(0, 255))
    memory = golden_memory({target: bytes(page)})
    try:
        decoded = KhoV1(PS).decode(memory, {MAP: u64(C0)})
    except KHOFormatError:
        return
    ends = decoded.phys + (np.uint64(PS) << decoded.order.astype(np.uint64))
    assert np.all(decoded.phys[1:] >= ends[:-1]) and np.all(ends <= 16 * MiB)
