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

This module also holds the helpers the kho-v2 encoding shares with it: regrouping the
tracker's bitmaps to another bitmap size, reading pages, and validating decoded units.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import PRESERVE_BITS_6_16, Tracker
from kho.devicetree.layout import MEMORY_MAP_PROP, pack_u64, unpack_u64_prop
from kho.encodings.base import DecodedMap, EncodedMap, Encoding, register
from kho.encodings.chunklist import alloc_pages_bulk
from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory

#: ``struct khoser_mem_chunk_hdr``.
CHUNK_HEADER_DTYPE = np.dtype([("next", "<u8"), ("order", "<u4"), ("num_elms", "<u4")])
#: ``struct khoser_mem_bitmap_ptr``.
CHUNK_ENTRY_DTYPE = np.dtype([("phys_start", "<u8"), ("bitmap", "<u8")])
#: Bytes in one of the 6.16 bitmaps.
BITMAP_BYTES_6_16 = PRESERVE_BITS_6_16 // 8
#: The highest physical address bit + 1 a unit may use (52-bit physical addresses).
PHYS_ADDR_BITS = 52
#: Bitmaps (or kho-v2 nodes) read and expanded at a time while decoding: bounds the
#: decoder's temporary memory (1024 page bitmaps = 4 MiB, 32 MiB expanded) whatever counts the input claims.
DECODE_BATCH = 1024


def chunk_capacity(page_size: int) -> int:
    """Entries in one chunk: ``(page_size - 16) / 16`` (255 for 4 KiB pages)."""
    return (page_size - CHUNK_HEADER_DTYPE.itemsize) // CHUNK_ENTRY_DTYPE.itemsize


def chunk_dtype(page_size: int) -> np.dtype:
    """A whole chunk page: header then :func:`chunk_capacity` entries (exactly one page)."""
    return np.dtype([("hdr", CHUNK_HEADER_DTYPE), ("entries", CHUNK_ENTRY_DTYPE, (chunk_capacity(page_size),))])


# -- helpers shared with kho-v2 ------------------------------------------------------------


def tracker_bitmaps(tracker: Tracker, bits: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """The tracker's bitmaps regrouped to ``bits`` bits a bitmap, per order ascending.

    Returns ``[(order, index int64[n], bitmaps uint8[n, bits // 8])]`` with indices
    ascending, where bitmap ``k`` covers units ``index[k] * bits .. + bits - 1`` (unit
    number = ``pfn >> order``).  With the tracker's own size the bitmaps are returned as the
    tracker holds them (empty ones included, as the kernel writes them); when merging,
    ``bits / preserve_bits`` tracker bitmaps make one; when splitting, all-zero parts are
    dropped.  O(bitmaps) Python plus O(bitmap bytes) numpy work.
    """
    src = tracker.preserve_bits
    out = []
    for order, phys_bits in tracker.orders.items():
        items = list(phys_bits.items())
        if not items:
            continue
        index = np.fromiter((i for i, _ in items), dtype=np.int64, count=len(items))
        maps = np.stack([b for _, b in items])
        if bits > src:
            ratio = bits // src
            merged, inverse = np.unique(index // ratio, return_inverse=True)
            grouped = np.zeros((merged.size, ratio, src // 8), dtype=np.uint8)
            grouped[inverse, index % ratio] = maps
            index, maps = merged, grouped.reshape(merged.size, bits // 8)
        elif bits < src:
            ratio = src // bits
            maps = maps.reshape(-1, bits // 8)
            index = (index[:, None] * ratio + np.arange(ratio, dtype=np.int64)).reshape(-1)
            keep = maps.any(axis=1)
            index, maps = index[keep], maps[keep]
        out.append((int(order), index, maps))
    return out


def read_pages(memory: PhysicalMemory, phys: np.ndarray) -> np.ndarray:
    """The pages at ``phys`` (bytes, validated page-aligned and in RAM) as ``uint8[n, page_size]``.  O(n pages)."""
    ps = memory.page_size
    if not len(phys):
        return np.zeros((0, ps), dtype=np.uint8)
    data = b"".join(memory.read(int(p), ps) for p in phys)
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, ps)


def check_pointers(memory: PhysicalMemory, phys: np.ndarray, size: int, align: int, field: str, *, strict: bool = True) -> None:
    """KHOFormatError unless every ``phys`` is ``align``-aligned with ``[phys, phys+size)`` inside
    one RAM bank and, when ``strict``, outside every scratch area (the next kernel's early
    allocations come from scratch and could overwrite metadata there before it is read).  O(n)."""
    phys = np.asarray(phys, dtype=np.uint64)
    bad = (phys & np.uint64(align - 1)) != 0
    if bad.any():
        at = int(phys[np.argmax(bad)])
        raise KHOFormatError(field, f"pointer is not aligned to {align} bytes", at)
    outside = ~memory.in_ram_array(phys, np.uint64(size))
    if outside.any():
        at = int(phys[np.argmax(outside)])
        raise KHOFormatError(field, f"pointer to {size} bytes outside RAM", at)
    if strict:
        in_scratch = memory.overlaps_scratch_array(phys, np.uint64(size))
        if in_scratch.any():
            at = int(phys[np.argmax(in_scratch)])
            raise KHOFormatError(field, "metadata inside a scratch area", at)


def check_distinct(phys: np.ndarray, field: str, what: str) -> None:
    """KHOFormatError when a pointer occurs twice (a loop or shared metadata).  O(n log n)."""
    if phys.size < 2:
        return
    ordered = np.sort(phys)
    dup = ordered[1:] == ordered[:-1]
    if dup.any():
        raise KHOFormatError(field, f"{what} reached twice", int(ordered[1:][dup][0]))


def max_unit_order(memory: PhysicalMemory, strict: bool) -> int:
    """The largest order a decoded unit may have: MAX_PAGE_ORDER when ``strict``; else the
    largest unit that fits in the 52-bit physical address space (a kernel reads and
    reserves units above MAX_PAGE_ORDER, which only its restore refuses)."""
    return memory.geometry.max_order if strict else PHYS_ADDR_BITS - memory.page_shift


def units_from_bitmaps(maps: np.ndarray, first_unit: np.ndarray, order: np.ndarray, page_shift: int,
                       where: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The units marked in bitmaps: bit ``b`` of bitmap ``k`` is unit number
    ``first_unit[k] + b`` of ``order[k]`` (its phys is that number << (order + page_shift)).

    ``maps`` is ``uint8[n, bytes]`` (bit ``b`` in byte ``b // 8``, LSB first), ``first_unit``
    (int64, below 2**52) the unit number of bit 0.  A unit whose address would not fit in
    52 bits raises KHOFormatError (located at ``where[k]``, the bitmap's phys, when given)
    instead of wrapping around 64 bits.  Returns ``(phys uint64, order uint8)``, one
    ascending run per order group.  Only non-zero bytes are expanded: O(bitmap bytes +
    set bits) numpy work and memory, one pass per distinct order.
    """
    nbits = maps.shape[1] * 8
    bits_log2 = nbits.bit_length() - 1
    phys_parts, order_parts = [], []
    for o in np.unique(order).tolist():
        sel = np.flatnonzero(order == o)
        raw = maps[sel].reshape(-1)
        nonzero = np.flatnonzero(raw)
        if nonzero.size == raw.size:
            flat = np.flatnonzero(np.unpackbits(raw, bitorder="little"))
        else:
            pos = np.flatnonzero(np.unpackbits(raw[nonzero], bitorder="little"))
            flat = (nonzero[pos >> 3] << 3) | (pos & 7)
        room = PHYS_ADDR_BITS - o - page_shift
        firsts = first_unit[sel].astype(np.int64)
        if flat.size and (room < 0 or int(firsts.max()) + nbits > 1 << room):  # some bitmap reaches past 2**52
            unit = firsts[flat >> bits_log2] + (flat & (nbits - 1))
            high = unit >= (1 << room) if room >= 0 else np.ones(unit.size, dtype=bool)
            if high.any():
                i = int(np.argmax(high))
                at = None if where is None else int(np.asarray(where)[sel][int(flat[i]) >> bits_log2])
                raise KHOFormatError("unit", f"unit number {int(unit[i]):#x} of order {o} is beyond the "
                                             f"{PHYS_ADDR_BITS}-bit physical address space", at)
        # unit number = first_unit[row] + (flat - row * nbits), with row = flat >> bits_log2, in place
        unit = flat
        unit += (firsts - (np.arange(sel.size, dtype=np.int64) << bits_log2))[flat >> bits_log2]
        phys = unit.view(np.uint64)
        phys <<= np.uint64(o + page_shift)
        phys_parts.append(phys)
        order_parts.append(np.full(unit.size, o, dtype=np.uint8))
    if not phys_parts:
        return np.empty(0, np.uint64), np.empty(0, np.uint8)
    if len(phys_parts) == 1:
        return phys_parts[0], order_parts[0]
    return np.concatenate(phys_parts), np.concatenate(order_parts)


def finish_units(memory: PhysicalMemory, phys: np.ndarray, order: np.ndarray, metadata: np.ndarray, *,
                 strict: bool = True, metadata_field: str = "metadata") -> DecodedMap:
    """Sort decoded units by address, validate them and return the DecodedMap.

    Both modes: every unit inside one RAM bank, its order at most :func:`max_unit_order`.
    ``strict`` adds: order at most MAX_PAGE_ORDER, no two units overlapping (nor repeated),
    none meeting a scratch area, and no metadata page (``metadata``, phys) inside a unit
    (``metadata_field`` names it in the error).

    ``phys`` may arrive as a few ascending runs (per order): the stable sort merges them.
    Validation: O(n) numpy for overlaps, then O((banks + areas) log n) binary searches
    (sorted, disjoint units have ascending ends); the lenient RAM check is O(n log banks).
    """
    phys = np.asarray(phys, dtype=np.uint64)
    order = np.asarray(order, dtype=np.uint8)
    if phys.size > 1 and not bool(np.all(phys[1:] > phys[:-1])):
        sort = np.argsort(phys, kind="stable")
        phys, order = phys[sort], order[sort]
    metadata = np.unique(np.asarray(metadata, dtype=np.uint64))
    limit = max_unit_order(memory, strict)
    if phys.size:
        top = int(order.max())
        if top > limit:
            i = int(np.argmax(order > limit))
            what = f"above MAX_PAGE_ORDER {limit}" if strict else f"too large for the {PHYS_ADDR_BITS}-bit physical address space"
            raise KHOFormatError("unit.order", f"order {int(order[i])} is {what}", int(phys[i]))
        if not strict:
            sizes = np.left_shift(np.uint64(memory.page_size), order.astype(np.uint64))
            outside = ~memory.in_ram_array(phys, sizes)
            if outside.any():
                i = int(np.argmax(outside))
                raise KHOFormatError("unit", f"unit of order {int(order[i])} is outside RAM", int(phys[i]))
            return DecodedMap(phys, order, True, metadata)
        if top == int(order.min()):
            sizes = np.uint64(memory.page_size << top)
            overlap = phys[1:] - phys[:-1] < sizes
        else:
            sizes = np.left_shift(np.uint64(memory.page_size), order.astype(np.uint64))
            overlap = phys[1:] - phys[:-1] < sizes[:-1]
        if overlap.any():
            i = int(np.argmax(overlap))
            raise KHOFormatError("unit", f"unit of order {int(order[i])} overlaps the unit at {int(phys[i + 1]):#x}", int(phys[i]))

        def end_of(i: int) -> int:
            return int(phys[i]) + (memory.page_size << int(order[i]))

        covered = 0
        for bank in memory.banks:
            lo, hi = np.searchsorted(phys, [bank.start, bank.end]).tolist()
            if lo < hi and end_of(hi - 1) > bank.end:
                raise KHOFormatError("unit", f"unit of order {int(order[hi - 1])} is outside RAM", int(phys[hi - 1]))
            if lo > covered:
                raise KHOFormatError("unit", f"unit of order {int(order[covered])} is outside RAM", int(phys[covered]))
            covered = max(covered, hi)
        if covered < phys.size:
            raise KHOFormatError("unit", f"unit of order {int(order[covered])} is outside RAM", int(phys[covered]))
        for area in memory.scratch:
            i = int(np.searchsorted(phys, area.end)) - 1
            if i >= 0 and end_of(i) > area.addr:
                raise KHOFormatError("unit", f"unit of order {int(order[i])} overlaps the {area.kind} scratch area", int(phys[i]))
        if metadata.size:
            i = np.searchsorted(phys, metadata, side="right").astype(np.int64) - 1
            j = np.maximum(i, 0)
            inside = (i >= 0) & (metadata < phys[j] + np.left_shift(np.uint64(memory.page_size), order[j].astype(np.uint64)))
            if inside.any():
                k = int(np.argmax(inside))
                raise KHOFormatError(metadata_field, f"metadata page lies inside the preserved unit at {int(phys[j[k]]):#x}",
                                     int(metadata[k]))
    return DecodedMap(phys, order, True, metadata)


def map_pointer(props: Mapping[str, bytes], *, allow_zero: bool = False) -> int:
    """The root ``preserved-memory-map`` pointer: present, 8 bytes and non-zero unless
    ``allow_zero`` (KHOFormatError otherwise)."""
    value = unpack_u64_prop(props.get(MEMORY_MAP_PROP), f"fdt.{MEMORY_MAP_PROP}")
    if value == 0 and not allow_zero:
        raise KHOFormatError(f"fdt.{MEMORY_MAP_PROP}", "the memory map pointer is 0")
    return value


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
        self.capacity = chunk_capacity(page_size)
        self.chunk = chunk_dtype(page_size)

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
        if memory.page_size != self.page_size:
            raise KHOError("EINVAL", f"kho-v1 for {self.page_size}-byte pages cannot encode a {memory.page_size}-byte machine")
        groups = tracker_bitmaps(tracker, self.preserve_bits)
        if not groups:  # one empty chunk keeps the map pointer non-zero
            groups = [(0, np.empty(0, np.int64), np.empty((0, self.bitmap_bytes), np.uint8))]
        chunks_per_order = [max(1, -(-idx.size // self.capacity)) for _, idx, _ in groups]
        nr_chunks = sum(chunks_per_order)
        nr_bitmaps = sum(idx.size for _, idx, _ in groups)
        per_page = self.page_size // self.bitmap_bytes
        nr_bitmap_pages = -(-nr_bitmaps // per_page)
        pages = alloc_pages_bulk(allocator, nr_chunks + nr_bitmap_pages, self.page_size, max_order=0)
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
        return EncodedMap(self.name, self.compatible, {MEMORY_MAP_PROP: pack_u64(int(chunk_phys[0]))},
                          np.sort(pages), self.page_size, self.options())

    # -- decode ------------------------------------------------------------------------------
    def walk_chunks(self, memory: PhysicalMemory, first: int, *, strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Follow the chunk list from ``first``; returns (chunk phys uint64[c], chunk records).

        Both modes: every pointer page-aligned and in RAM, no chunk reached twice (so the walk
        ends after at most one visit per stored page: a chunk that is not stored reads as
        zeros and ends the list), ``num_elms`` at most the page's capacity, ``order`` at most
        :func:`max_unit_order`.  ``strict`` adds the kernel writer's layout: chunks outside
        scratch, orders ascending along the list, and a chunk followed by one of the same
        order full.  O(chunks).
        """
        ps = self.page_size
        seen: set[int] = set()
        phys_list, records = [], []
        phys = first
        top = max_unit_order(memory, strict)
        while phys:
            field = "chunk.next" if phys_list else f"fdt.{MEMORY_MAP_PROP}"
            check_pointers(memory, np.array([phys], dtype=np.uint64), ps, ps, field, strict=strict)
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
        :func:`finish_units` checks them.  ``strict`` adds: a non-zero map pointer,
        ``phys_start`` aligned to the span a bitmap covers and ascending within an order
        (so never repeated), bitmaps outside scratch.  Lenient, a zero map pointer is the
        empty map, as Linux 6.16 reads it.  Bitmaps are expanded :data:`DECODE_BATCH` at a
        time.  O(chunks + bitmaps) Python + O(bitmap bytes + set bits) numpy.
        """
        if memory.page_size != self.page_size:
            raise KHOError("EINVAL", f"kho-v1 for {self.page_size}-byte pages cannot decode a {memory.page_size}-byte machine")
        first = map_pointer(props, allow_zero=not strict)
        if not first:
            return DecodedMap(np.empty(0, np.uint64), np.empty(0, np.uint8), True, np.empty(0, np.uint64))
        chunk_phys, chunks = self.walk_chunks(memory, first, strict=strict)
        counts = chunks["hdr"]["num_elms"].astype(np.int64)
        used = np.arange(self.capacity)[None, :] < counts[:, None]
        entries = chunks["entries"][used]
        entry_order = np.repeat(chunks["hdr"]["order"].astype(np.int64), counts)
        entry_chunk = np.repeat(chunk_phys, counts)
        entry_at = entry_chunk + np.uint64(CHUNK_HEADER_DTYPE.itemsize) + (
            np.flatnonzero(used.reshape(-1)) % self.capacity).astype(np.uint64) * np.uint64(CHUNK_ENTRY_DTYPE.itemsize)
        start = entries["phys_start"]
        bitmap = entries["bitmap"]

        def fail(mask: np.ndarray, field: str, message) -> None:
            if mask.any():
                i = int(np.argmax(mask))
                raise KHOFormatError(field, message(i), int(entry_at[i]))

        fail(start >= np.uint64(1 << PHYS_ADDR_BITS), "chunk.phys_start",
             lambda i: f"{int(start[i]):#x} is beyond the {PHYS_ADDR_BITS}-bit physical address space")
        shift = (entry_order + (self.shift + self.preserve_bits.bit_length() - 1 if strict else self.shift)).astype(np.uint64)
        align = np.left_shift(np.uint64(1), shift)
        what = "the span a bitmap covers" if strict else "the unit size"
        fail((start & (align - np.uint64(1))) != 0, "chunk.phys_start",
             lambda i: f"{int(start[i]):#x} is not a multiple of {int(align[i]):#x} bytes, {what}")
        if strict:
            same = entry_order[1:] == entry_order[:-1]
            fail(np.concatenate([[False], same & (start[1:] <= start[:-1])]), "chunk.phys_start",
                 lambda i: f"{int(start[i]):#x} does not follow {int(start[i - 1]):#x}: a bitmap's start ascends within an order")
        check_pointers(memory, bitmap, self.bitmap_bytes, self.bitmap_bytes, "chunk.bitmap", strict=strict)
        check_distinct(bitmap, "chunk.bitmap", "a bitmap")
        bitmap_page = bitmap & ~np.uint64(self.page_size - 1)
        check_distinct(np.concatenate([chunk_phys, np.unique(bitmap_page)]), "chunk.bitmap", "a chunk page used as a bitmap page")

        per_page = self.page_size // self.bitmap_bytes
        slot = ((bitmap & np.uint64(self.page_size - 1)) // np.uint64(self.bitmap_bytes)).astype(np.int64)
        first_unit = (start >> (entry_order + self.shift).astype(np.uint64)).astype(np.int64)
        phys_parts, order_parts = [], []
        for b in range(0, bitmap.size, DECODE_BATCH):
            part = slice(b, b + DECODE_BATCH)
            pages, where = np.unique(bitmap_page[part], return_inverse=True)
            maps = read_pages(memory, pages).reshape(-1, self.bitmap_bytes)[where.reshape(-1) * per_page + slot[part]]
            phys, order = units_from_bitmaps(maps, first_unit[part], entry_order[part], self.shift, bitmap[part])
            phys_parts.append(phys)
            order_parts.append(order)
        phys = np.concatenate(phys_parts) if phys_parts else np.empty(0, np.uint64)
        order = np.concatenate(order_parts) if order_parts else np.empty(0, np.uint8)
        metadata = np.concatenate([chunk_phys, np.unique(bitmap_page)])
        return finish_units(memory, phys, order, metadata, strict=strict, metadata_field="chunk.bitmap")
