"""The instruction stream: what walk() yields against a record-by-record reading, coverage
of every RAM bank, the stream's own pages being free, and the encoder's choices."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.encodings import get_encoding
from kho.encodings.chunklist import read_chunk_list
from kho.encodings.instructions import (
    CHUNK_MAGIC,
    OP_BITMAP,
    OP_FREE,
    OP_SKIP,
    OP_UNIT,
    RECORD,
    STREAM_HEADER,
    WORD,
    StreamWalk,
    build_stream,
    walk,
)
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea

PS = 4096


def machine(banks=((0, 4096), (6144, 2048, 1)), scratch=((1024, 256, "lowmem"),)):
    """Banks and scratch areas given in pages."""
    memory = PhysicalMemory([Bank(s * PS, n * PS, *rest) for s, n, *rest in banks])
    memory.set_scratch([ScratchArea(s * PS, n * PS, kind) for s, n, kind in scratch])
    return memory, PageAllocator(memory, seed=7)


def read_stream(memory, props):
    head = int.from_bytes(props["preserved-memory-map"], "little")
    payload = read_chunk_list(memory, head, 8, CHUNK_MAGIC, "t").payload
    header = np.frombuffer(payload[:STREAM_HEADER.itemsize].tobytes(), dtype=STREAM_HEADER)[0]
    nrec = int(header["nr_records"])
    body = payload[STREAM_HEADER.itemsize:]
    return body[:16 * nrec].view(RECORD), body[16 * nrec:].view(WORD)


def reference(records, words):
    """Read the stream one record at a time, the way a kernel loop would: page sets."""
    free, skip, units = set(), set(), []
    cursor = 0
    for head, arg in zip(records["head"].tolist(), records["arg"].tolist()):
        op, order, start = head >> 60, (head >> 52) & 0xF, head & ((1 << 52) - 1)
        if op == OP_FREE:
            free.update(range(start, start + arg))
        elif op == OP_SKIP:
            skip.update(range(start, start + arg))
        elif op == OP_UNIT:
            units.append((start, order))
            end = start + (1 << order)
            free.update(range(end, end + arg))
        else:
            assert op == OP_BITMAP
            for b in range(arg):
                word = int(words[cursor + b // 64])
                pfn = start + (b << order)
                if word >> (b % 64) & 1:
                    units.append((pfn, order))
                else:
                    free.update(range(pfn, pfn + (1 << order)))
            cursor += (arg + 63) // 64
    assert cursor == words.size
    return free, skip, sorted(units)


def pages(start, end):
    return {p for s, e in zip(start.tolist(), end.tolist()) for p in range(s, e)}


@st.composite
def preserved(draw):
    memory, alloc = machine()
    tracker = Tracker(memory)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for order in range(11):
        count = draw(st.integers(0, [300, 40, 20, 10, 6, 3, 2, 1, 1, 1, 1][order]))
        try:
            tracker.preserve_many(alloc.alloc_many(count, order), order)
        except Exception:
            pass
    if draw(st.booleans()):  # a dense patch: bitmaps win there
        base = int(rng.integers(0, 900)) * PS
        got = alloc.claim_pages(np.arange(base, base + 400 * PS, PS, dtype=np.uint64)[rng.random(400) < 0.5])
        tracker.preserve_many(got, 0)
    tracker.finalize()
    return memory, alloc, tracker


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=preserved())
def test_walk_agrees_with_a_record_by_record_reading(case):
    memory, alloc, tracker = case
    encoded = get_encoding("instructions").encode(tracker, alloc)
    walked = walk(memory, encoded.props)
    records, words = read_stream(memory, encoded.props)
    free, skip, units = reference(records, words)
    assert pages(walked.free_start_pfn, walked.free_end_pfn) == free
    assert pages(walked.skip_start_pfn, walked.skip_end_pfn) == skip
    assert list(zip((walked.unit_phys >> np.uint64(12)).tolist(), walked.unit_order.tolist())) == units
    assert list(zip(walked.unit_phys.tolist(), walked.unit_order.tolist())) == tracker.units()
    # Free runs are sorted, disjoint and maximal within a bank.
    assert (walked.free_start_pfn < walked.free_end_pfn).all()
    assert (walked.free_start_pfn[1:] > walked.free_end_pfn[:-1]).all() or memory.banks[0].end == memory.banks[1].start
    # Free, kept and skipped pages partition [first bank start, last bank end).
    kept = {p for phys, order in tracker.units() for p in range(phys // PS, phys // PS + (1 << order))}
    span = set(range(memory.banks[0].start // PS, memory.banks[-1].end // PS))
    assert free | skip | kept == span
    assert not (free & skip) and not (free & kept) and not (skip & kept)
    # Skipped: exactly the hole between the banks and the scratch area.
    hole = set(range(4096, 6144))
    scratch = set(range(1024, 1280))
    assert skip == hole | scratch
    # The stream's own pages are free memory for the next kernel, and so is any page the
    # running kernel allocated after the stream was built (the KHO FDT page, say).
    meta = set((walked.metadata_pages >> np.uint64(12)).tolist())
    assert meta <= free
    assert alloc.alloc_pages(0) // PS in free
    assert np.array_equal(np.sort(encoded.metadata_pages), walked.metadata_pages)


def test_decode_is_the_walks_units():
    memory, alloc = machine()
    tracker = Tracker(memory)
    tracker.preserve_many(alloc.alloc_many(50, 0), 0)
    tracker.preserve_many(alloc.alloc_many(5, 3), 3)
    enc = get_encoding("instructions")
    encoded = enc.encode(tracker, alloc)
    decoded = enc.decode(memory, encoded.props)
    walked = walk(memory, encoded.props)
    assert isinstance(walked, StreamWalk)
    assert decoded.exact_orders and decoded.units() == tracker.units()
    assert np.array_equal(decoded.metadata_pages, walked.metadata_pages)
    assert walked.nr_records == read_stream(memory, encoded.props)[0].size


def test_empty_set_frees_everything_but_scratch_and_holes():
    memory, alloc = machine()
    records, words = build_stream(memory, np.empty(0, np.uint64), np.empty(0, np.uint8))
    ops = (records["head"] >> np.uint64(60)).tolist()
    starts = (records["head"] & np.uint64((1 << 52) - 1)).tolist()
    assert list(zip(ops, starts, records["arg"].tolist())) == [
        (OP_FREE, 0, 1024), (OP_SKIP, 1024, 256), (OP_FREE, 1280, 2816), (OP_SKIP, 4096, 2048), (OP_FREE, 6144, 2048)]
    assert words.size == 0


def test_dense_pages_become_bitmaps_isolated_folios_units():
    memory, alloc = machine(banks=((0, 8192),), scratch=())
    tracker = Tracker(memory)
    tracker.preserve_many(np.arange(100, 612, 2, dtype=np.uint64) * np.uint64(PS), 0)  # 256 pages, every other one
    tracker.preserve_folio(4096 * PS, 3)
    tracker.preserve_folio(6000 * PS, 4)
    records, words = build_stream(memory, *tracker.units_array())
    head = records["head"]
    summary = list(zip((head >> np.uint64(60)).tolist(), ((head >> np.uint64(52)) & np.uint64(15)).tolist(),
                       (head & np.uint64((1 << 52) - 1)).tolist(), records["arg"].tolist()))
    assert summary == [
        (OP_FREE, 0, 0, 100),
        (OP_BITMAP, 0, 100, 511),  # 511 bits from pfn 100: 8 words instead of 256 UNIT records
        (OP_FREE, 0, 611, 4096 - 611),
        (OP_UNIT, 3, 4096, 6000 - 4104),  # then free up to the next folio
        (OP_UNIT, 4, 6000, 8192 - 6016),
    ]
    assert words.size == 8 and int(words[0]) == 0x5555555555555555
    assert int(words[7]) == 0x5555555555555555  # 511 bits: bit 63 of the last word is padding, 0


def test_bitmap_slices_end_at_large_gaps_and_straddle_chunks():
    memory, alloc = machine(banks=((0, 1 << 16),), scratch=())
    tracker = Tracker(memory)
    pfns = np.concatenate([np.arange(0, 20000, 3), np.arange(20000 + 300, 40000, 3)])  # gap of 300 > 256 units
    tracker.preserve_many(pfns.astype(np.uint64) * np.uint64(PS), 0)
    for p in pfns.tolist():
        alloc.reserve(p * PS, PS)
    enc = get_encoding("instructions")
    encoded = enc.encode(tracker, alloc)
    records, words = read_stream(memory, encoded.props)
    assert ((records["head"] >> np.uint64(60)) == OP_BITMAP).sum() == 2
    assert encoded.metadata_pages.size > 1  # the bitmap words run over several chunks
    assert enc.decode(memory, encoded.props).units() == tracker.units()


@pytest.mark.parametrize("page_size", [16384, 65536])
def test_other_page_sizes(page_size):
    top = 1 << PhysicalMemory([Bank(0, page_size)], page_size).geometry.max_order
    memory = PhysicalMemory([Bank(0, 2048 * page_size), Bank(16384 * page_size, top * page_size)], page_size)
    memory.set_scratch([ScratchArea(512 * page_size, 64 * page_size, "lowmem")])
    alloc = PageAllocator(memory, seed=2)
    tracker = Tracker(memory)
    tracker.preserve_many(alloc.alloc_many(1, memory.geometry.max_order), memory.geometry.max_order)
    tracker.preserve_many(alloc.alloc_many(300, 0), 0)
    encoded = get_encoding("instructions", page_size).encode(tracker, alloc)
    walked = walk(memory, encoded.props)
    assert list(zip(walked.unit_phys.tolist(), walked.unit_order.tolist())) == tracker.units()


def test_bitmaps_of_several_orders():
    memory, alloc = machine(banks=((0, 1 << 14),), scratch=((8192, 512, "global"),))
    tracker = Tracker(memory)
    tracker.preserve_many(np.arange(64, 64 + 3 * 200, 3, dtype=np.uint64) * np.uint64(PS), 0)  # order-0 slice
    tracker.preserve_many(np.arange(2048, 2048 + 8 * 100, 8, dtype=np.uint64) * np.uint64(PS), 2)  # order-2 slice
    tracker.preserve_many(np.arange(9000, 9000 + 2 * 300, 2, dtype=np.uint64) * np.uint64(PS), 1)  # after the scratch area
    for phys, order in tracker.units():
        alloc.reserve(phys, PS << order)
    encoded = get_encoding("instructions").encode(tracker, alloc)
    records, words = read_stream(memory, encoded.props)
    head = records["head"]
    bitmaps = (head >> np.uint64(60)) == OP_BITMAP
    assert sorted(((head[bitmaps] >> np.uint64(52)) & np.uint64(15)).tolist()) == [0, 1, 2]
    walked = walk(memory, encoded.props)
    free, skip, units = reference(records, words)
    assert list(zip(walked.unit_phys.tolist(), walked.unit_order.tolist())) == tracker.units()
    assert pages(walked.free_start_pfn, walked.free_end_pfn) == free
