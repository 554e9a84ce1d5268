"""``ranges-packed``: 8-byte ranges (52-bit pfn, 12-bit length) in a chunk list of pages.

Entry (:data:`PACKED_ENTRY`, one little-endian u64)::

    bits 63..12  pfn of the first page (52 bits)
    bits 11..0   number of pages, 1..4095 (0 is invalid)

Units that touch are merged into runs (never across a RAM bank boundary); a run longer
than :data:`MAX_RUN_PAGES` is cut into entries of 4095 pages and a remainder.  Entries
are sorted by pfn and disjoint.  Like ``ranges`` this loses the folio orders: the decoder
merges touching entries again and returns the kernel's greedy split
(``DecodedMap.exact_orders = False``).

The entries live in a chunk list (:mod:`kho.encodings.chunklist`) with magic ``KHRP``:
``(page_size - 16) / 8`` = 510 entries a 4 KiB page.  The root FDT property
``preserved-memory-map`` holds the phys of the first chunk.  512 KiB of entries hold
65,536 ranges: 256 MiB of isolated 4 KiB pages.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from kho.abi.kexec_handover import KHO_FDT_MEMORY_MAP_PROP_NAME
from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.devicetree.layout import pack_u64
from kho.encodings.base import DecodedMap, EncodedMap, Encoding, register
from kho.encodings.chunklist import magic_of, read_chunk_list, write_chunk_list
from kho.encodings.common import check_metadata_disjoint, check_page_size, read_map_pointer
from kho.encodings.ranges import check_runs, decode_runs, merge_units
from kho.errors import KHOFormatError
from kho.memory.physical import PhysicalMemory

#: One entry: ``pfn << LENGTH_BITS | nr_pages``.
PACKED_ENTRY = np.dtype("<u8")
LENGTH_BITS = 12
LENGTH_MASK = (1 << LENGTH_BITS) - 1
#: Longest run one entry holds (pages); a length of 0 is invalid.
MAX_RUN_PAGES = LENGTH_MASK
#: Chunk magic: the bytes ``KHRP``.
CHUNK_MAGIC = magic_of(b"KHRP")


def pack_runs(start_pfn: np.ndarray, end_pfn: np.ndarray) -> np.ndarray:
    """Entries (uint64) for sorted ``[start, end)`` pfn runs (int64), cutting runs above 4095 pages."""
    length = end_pfn - start_pfn
    if not (length > MAX_RUN_PAGES).any():
        return (start_pfn.astype(np.uint64) << np.uint64(LENGTH_BITS)) | length.astype(np.uint64)
    pieces = -(-length // MAX_RUN_PAGES)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    piece = np.arange(first.size, dtype=np.int64) - first
    run = np.repeat(np.arange(start_pfn.size), pieces)
    pfn = start_pfn[run] + piece * MAX_RUN_PAGES
    pages = np.minimum(MAX_RUN_PAGES, end_pfn[run] - pfn)
    return (pfn.astype(np.uint64) << np.uint64(LENGTH_BITS)) | pages.astype(np.uint64)


@register
class RangesPacked(Encoding):
    """Packed 8-byte ranges in page-sized chunks; loses folio orders."""

    name = "ranges-packed"
    compatible = "kho-ranges-packed"
    keeps_orders = False

    def encode(self, tracker: Tracker, allocator: PageAllocator) -> EncodedMap:
        """O(units) numpy work plus one write per chunk page."""
        memory = tracker.memory
        check_page_size(self.name, self.page_size, memory)
        entries = pack_runs(*merge_units(memory, *tracker.units_array()))
        pages = write_chunk_list(memory, allocator, entries.astype(PACKED_ENTRY).view(np.uint8), PACKED_ENTRY.itemsize, CHUNK_MAGIC)
        props = {KHO_FDT_MEMORY_MAP_PROP_NAME: pack_u64(int(pages[0]))}
        return EncodedMap(self.name, self.compatible, props, np.sort(pages), self.page_size)

    def decode(self, memory: PhysicalMemory, props: Mapping[str, bytes], *, strict: bool = True) -> DecodedMap:
        """Walk the chunks, validate every entry, split greedily.  O(chunks + units log units).

        Both modes: the chunk list checks of :func:`read_chunk_list`, every range inside
        one RAM bank.  ``strict`` adds: no zero-length entry, entries sorted and disjoint,
        outside scratch, chunks outside scratch and outside the preserved ranges.
        ``strict=False`` skips zero-length entries and reserves the union of the rest."""
        check_page_size(self.name, self.page_size, memory)
        chunks = read_chunk_list(memory, read_map_pointer(props), PACKED_ENTRY.itemsize, CHUNK_MAGIC, "ranges-packed.chunk",
                                 strict=strict)
        entries = chunks.payload.view(PACKED_ENTRY).astype(np.uint64)
        start = (entries >> np.uint64(LENGTH_BITS)).view(np.int64)
        end = start + (entries & np.uint64(LENGTH_MASK)).view(np.int64)
        zero = end == start
        index = np.arange(entries.size)
        if zero.any():
            if strict:
                i = int(np.argmax(zero))
                raise KHOFormatError("ranges-packed.entry", f"entry {int(entries[i]):#018x} has length 0", chunks.location(i))
            index, start, end = index[~zero], start[~zero], end[~zero]
        check_runs(memory, start, end, "ranges-packed.entry", lambda i: chunks.location(int(index[i])), strict=strict)
        metadata = np.sort(chunks.pages)
        decoded = decode_runs(memory, start, end, metadata, strict=strict, field="ranges-packed.entry")
        if strict:
            check_metadata_disjoint(memory, metadata, decoded.phys, decoded.order, "ranges-packed.chunk")
        return decoded
