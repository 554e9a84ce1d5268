"""kho-v1: the kernel's linked list of chunks of per-order bitmaps (Linux 6.16 .. 6.19).

Layout (little-endian, every chunk one page; defined once below as numpy dtypes):

* chunk header (16 bytes): ``u64 next`` (phys of the next chunk, 0 ends the list),
  ``u32 order``, ``u32 num_elms``;
* then ``(page_size - 16) / 16`` entries (255 with 4 KiB pages) of
  ``{u64 phys_start; u64 bitmap}``: ``bitmap`` is the phys of a bitmap of
  ``PRESERVE_BITS`` bits; bit ``b`` set means the unit of ``order`` at
  ``phys_start + (b << (order + PAGE_SHIFT))`` is preserved.

One chunk holds entries of one order; a new chunk starts for every order (ascending)
and whenever a chunk is full; entries ascend by tracker XArray index ``i`` with
``phys_start = (i * PRESERVE_BITS) << (order + PAGE_SHIFT)``.  The KHO FDT's root
property ``preserved-memory-map`` holds the phys of the first chunk (8 bytes, LE).

``PRESERVE_BITS`` is 4096 (512-byte bitmaps, Linux 6.16) or ``page_size * 8`` (page
bitmaps, later kernels): the ``bitmap_bytes`` option, recorded in images.

Where kho places what it writes (documented in spec/kho-abi.md, relied on by the golden
tests): all chunk pages are allocated first, in list order, then the bitmap pages; 512-byte
bitmaps are packed ``page_size / 512`` to a page in entry order.  An empty tracker is
written as one empty order-0 chunk, so the map pointer is never 0.

The layouts are :mod:`kho.abi.kho_v1`'s; the checks are :mod:`kho.encodings.common`'s.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from kho.abi.kexec_handover import KHO_FDT_MEMORY_MAP_PROP_NAME
from kho.abi.kho_v1 import (
    KHOSER_MEM_BITMAP_PTR_DTYPE,
    KHOSER_MEM_CHUNK_HDR_DTYPE,
    PRESERVE_BITS_6_16,
    khoser_bitmap_size,
    khoser_mem_chunk_dtype,
)
from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.devicetree.layout import pack_u64
from kho.encodings import common
from kho.encodings.base import DecodedMap, EncodedMap, Encoding, register
from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory

#: Bytes in one of the 6.16 bitmaps.
BITMAP_BYTES_6_16 = PRESERVE_BITS_6_16 // 8

# -- the encoding --------------------------------------------------------------------------


@register
class KhoV1(Encoding):
    """The kho-v1 chunk list.  ``bitmap_bytes``: 512 (Linux 6.16) or ``"page"`` (later kernels)."""

    name = "kho-v1"
    compatible = "kho-v1"
    keeps_orders = True

    def __init__(self, page_size: int = 4096, bitmap_bytes: int | str = "page", **options):
        super().__init__(page_size, **options)
        if bitmap_bytes == "page" or bitmap_bytes == page_size:
            bitmap_bytes = page_size
        elif bitmap_bytes in (BITMAP_BYTES_6_16, str(BITMAP_BYTES_6_16)):
            bitmap_bytes = BITMAP_BYTES_6_16
        else:
            raise KHOError("EINVAL", f"kho-v1 bitmap_bytes must be 512 or 'page', not {bitmap_bytes!r}")
        self.bitmap_bytes = int(bitmap_bytes)
        self.preserve_bits = self.bitmap_bytes * 8
        self.shift = page_size.bit_length() - 1
        self.capacity = khoser_bitmap_size(page_size)
        self.chunk = khoser_mem_chunk_dtype(page_size)

    def options(self) -> dict:
        return {"bitmap_bytes": "page" if self.bitmap_bytes == self.page_size else self.bitmap_bytes}

    # -- encode ------------------------------------------------------------------------------
    def encode(self, tracker: Tracker, allocator: PageAllocator) -> EncodedMap:
        """Write the chunk list and bitmaps for ``tracker`` into ``tracker.memory``.

        Pages: one chunk per order started plus one per 255 further entries, and
        ``ceil(bitmaps * bitmap_bytes / page_size)`` bitmap pages.  All allocated before
        anything is written (ENOMEM frees them again).  O(bitmaps) Python + O(bytes) numpy.
        """
        memory = tracker.memory
        common.check_page_size(self.name, self.page_size, memory)
        groups = common.tracker_bitmaps(tracker, self.preserve_bits)
        if not groups:  # one empty chunk keeps the map pointer non-zero
            groups = [(0, np.empty(0, np.int64), np.empty((0, self.bitmap_bytes), np.uint8))]
        chunks_per_order = [max(1, -(-idx.size // self.capacity)) for _, idx, _ in groups]
        nr_chunks = sum(chunks_per_order)
        nr_bitmaps = sum(idx.size for _, idx, _ in groups)
        per_page = self.page_size // self.bitmap_bytes
        nr_bitmap_pages = -(-nr_bitmaps // per_page)
        pages = common.alloc_pages_bulk(allocator, nr_chunks + nr_bitmap_pages, self.page_size, max_order=0)
        chunk_phys, bitmap_pages = pages[:nr_chunks], pages[nr_chunks:]

        chunks = np.zeros(nr_chunks, dtype=self.chunk)
        chunks["hdr"]["next"][:-1] = chunk_phys[1:]
        serial = np.arange(nr_bitmaps, dtype=np.uint64)
        bitmap_phys = bitmap_pages[serial // np.uint64(per_page)] + (serial % np.uint64(per_page)) * np.uint64(self.bitmap_bytes)
        first_chunk, first_entry = 0, 0
        for (order, index, _), n_chunks in zip(groups, chunks_per_order):
            chunks["hdr"]["order"][first_chunk:first_chunk + n_chunks] = order
            k = np.arange(index.size)
            chunk_of, slot = first_chunk + k // self.capacity, k % self.capacity
            entries = chunks["entries"]
            entries["phys_start"][chunk_of, slot] = (index.astype(np.uint64) * np.uint64(self.preserve_bits)) << np.uint64(order + self.shift)
            entries["bitmap"][chunk_of, slot] = bitmap_phys[first_entry:first_entry + index.size]
            chunks["hdr"]["num_elms"][first_chunk:first_chunk + n_chunks] = np.bincount(k // self.capacity, minlength=n_chunks)
            first_chunk += n_chunks
            first_entry += index.size

        raw = chunks.view(np.uint8).reshape(nr_chunks, self.page_size)
        for c in range(nr_chunks):
            memory.write(int(chunk_phys[c]), raw[c])
        if nr_bitmaps:
            data = np.zeros(nr_bitmap_pages * self.page_size, dtype=np.uint8)
            data[:nr_bitmaps * self.bitmap_bytes] = np.concatenate([maps for _, _, maps in groups]).reshape(-1)
            data = data.reshape(nr_bitmap_pages, self.page_size)
            for p in range(nr_bitmap_pages):
                memory.write(int(bitmap_pages[p]), data[p])
        return EncodedMap(self.name, self.compatible, {KHO_FDT_MEMORY_MAP_PROP_NAME: pack_u64(int(chunk_phys[0]))},
                          np.sort(pages), self.page_size, self.options())

    # -- decode ------------------------------------------------------------------------------
    def walk_chunks(self, memory: PhysicalMemory, first: int, *, strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Follow the chunk list from ``first``; returns (chunk phys uint64[c], chunk records).

        Both modes: every pointer page-aligned and in RAM, no chunk reached twice (so the walk
        ends after at most one visit per stored page: a chunk that is not stored reads as
        zeros and ends the list), ``num_elms`` at most the page's capacity, ``order`` at most
        :func:`~kho.encodings.common.max_unit_order`.  ``strict`` adds the kernel writer's layout: chunks outside
        scratch, orders ascending along the list, and a chunk followed by one of the same
        order full.  O(chunks).
        """
        ps = self.page_size
        seen: set[int] = set()
        phys_list, records = [], []
        phys = first
        top = common.max_unit_order(memory, strict)
        while phys:
            field = "chunk.next" if phys_list else f"fdt.{KHO_FDT_MEMORY_MAP_PROP_NAME}"
            common.check_pointers(memory, np.array([phys], dtype=np.uint64), ps, ps, field, strict=strict)
            if phys in seen:
                raise KHOFormatError("chunk.next", "the chunk list loops back to a chunk already read", phys)
            seen.add(phys)
            record = np.frombuffer(memory.read(phys, ps), dtype=self.chunk)[0]
            hdr = record["hdr"]
            order, count = int(hdr["order"]), int(hdr["num_elms"])
            if order > top:
                limit = "MAX_PAGE_ORDER" if strict else "the largest order of the physical address space"
                raise KHOFormatError("chunk.order", f"order {order} is above {limit} {top}", phys)
            if count > self.capacity:
                raise KHOFormatError("chunk.num_elms", f"{count} entries in a chunk of {self.capacity}", phys)
            if strict and records:
                prev = records[-1]["hdr"]
                if order < int(prev["order"]):
                    raise KHOFormatError("chunk.order", f"order {order} follows order {int(prev['order'])}: "
                                                        "the kernel writes orders ascending", phys)
                if order == int(prev["order"]) and int(prev["num_elms"]) != self.capacity:
                    raise KHOFormatError("chunk.num_elms", f"{int(prev['num_elms'])} entries, yet the next chunk has the "
                                                           f"same order (only a full chunk is followed by one)", phys_list[-1])
            phys_list.append(phys)
            records.append(record)
            phys = int(hdr["next"])
        return np.array(phys_list, dtype=np.uint64), np.array(records, dtype=self.chunk)

    def decode(self, memory: PhysicalMemory, props: Mapping[str, bytes], *, strict: bool = True) -> DecodedMap:
        """Read the chunk list and bitmaps back.

        Both modes: the chunk walk of :meth:`walk_chunks`; each ``phys_start`` below 2**52
        and aligned to its unit size; bitmap pointers aligned to the bitmap size and in RAM;
        no bitmap read twice and no chunk page used as a bitmap page; units as
        :func:`~kho.encodings.common.finish_units` checks them.  ``strict`` adds: a non-zero map pointer,
        ``phys_start`` aligned to the span a bitmap covers and ascending within an order
        (so never repeated), bitmaps outside scratch.  Lenient, a zero map pointer is the
        empty map, as Linux 6.16 reads it.  Bitmaps are expanded :data:`~kho.encodings.common.DECODE_BATCH` at a
        time.  O(chunks + bitmaps) Python + O(bitmap bytes + set bits) numpy.
        """
        common.check_page_size(self.name, self.page_size, memory)
        first = common.read_map_pointer(props, allow_zero=not strict)
        if not first:
            return DecodedMap(np.empty(0, np.uint64), np.empty(0, np.uint8), True, np.empty(0, np.uint64))
        chunk_phys, chunks = self.walk_chunks(memory, first, strict=strict)
        counts = chunks["hdr"]["num_elms"].astype(np.int64)
        used = np.arange(self.capacity)[None, :] < counts[:, None]
        entries = chunks["entries"][used]
        entry_order = np.repeat(chunks["hdr"]["order"].astype(np.int64), counts)
        entry_chunk = np.repeat(chunk_phys, counts)
        entry_at = entry_chunk + np.uint64(KHOSER_MEM_CHUNK_HDR_DTYPE.itemsize) + (
            np.flatnonzero(used.reshape(-1)) % self.capacity).astype(np.uint64) * np.uint64(KHOSER_MEM_BITMAP_PTR_DTYPE.itemsize)
        start = entries["phys_start"]
        bitmap = entries["bitmap"]

        def fail(mask: np.ndarray, field: str, message) -> None:
            if mask.any():
                i = int(np.argmax(mask))
                raise KHOFormatError(field, message(i), int(entry_at[i]))

        fail(start >= np.uint64(1 << common.PHYS_ADDR_BITS), "chunk.phys_start",
             lambda i: f"{int(start[i]):#x} is beyond the {common.PHYS_ADDR_BITS}-bit physical address space")
        shift = (entry_order + (self.shift + self.preserve_bits.bit_length() - 1 if strict else self.shift)).astype(np.uint64)
        align = np.left_shift(np.uint64(1), shift)
        what = "the span a bitmap covers" if strict else "the unit size"
        fail((start & (align - np.uint64(1))) != 0, "chunk.phys_start",
             lambda i: f"{int(start[i]):#x} is not a multiple of {int(align[i]):#x} bytes, {what}")
        if strict:
            same = entry_order[1:] == entry_order[:-1]
            fail(np.concatenate([[False], same & (start[1:] <= start[:-1])]), "chunk.phys_start",
                 lambda i: f"{int(start[i]):#x} does not follow {int(start[i - 1]):#x}: a bitmap's start ascends within an order")
        common.check_pointers(memory, bitmap, self.bitmap_bytes, self.bitmap_bytes, "chunk.bitmap", strict=strict)
        common.check_distinct(bitmap, "chunk.bitmap", "a bitmap")
        bitmap_page = bitmap & ~np.uint64(self.page_size - 1)
        common.check_distinct(np.concatenate([chunk_phys, np.unique(bitmap_page)]), "chunk.bitmap", "a chunk page used as a bitmap page")

        per_page = self.page_size // self.bitmap_bytes
        slot = ((bitmap & np.uint64(self.page_size - 1)) // np.uint64(self.bitmap_bytes)).astype(np.int64)
        first_unit = (start >> (entry_order + self.shift).astype(np.uint64)).astype(np.int64)
        phys_parts, order_parts = [], []
        for b in range(0, bitmap.size, common.DECODE_BATCH):
            part = slice(b, b + common.DECODE_BATCH)
            pages, where = np.unique(bitmap_page[part], return_inverse=True)
            maps = common.read_pages(memory, pages, "chunk.bitmap").reshape(-1, self.bitmap_bytes)[where.reshape(-1) * per_page + slot[part]]
            phys, order = common.units_from_bitmaps(maps, first_unit[part], entry_order[part], self.shift, bitmap[part])
            phys_parts.append(phys)
            order_parts.append(order)
        phys = np.concatenate(phys_parts) if phys_parts else np.empty(0, np.uint64)
        order = np.concatenate(order_parts) if order_parts else np.empty(0, np.uint8)
        metadata = np.concatenate([chunk_phys, np.unique(bitmap_page)])
        return common.finish_units(memory, phys, order, metadata, strict=strict, metadata_field="chunk.bitmap")
