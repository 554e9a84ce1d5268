"""Page-level helpers shared by the ranges-packed, maple and instructions encodings.

* A **chunk list**: a singly linked list of page-sized chunks, each a 16-byte
  :data:`CHUNK_HEADER` (``u64 next`` phys of the next chunk or 0, ``u32 count`` entries
  used in this chunk, ``u32 magic`` naming the encoding) followed by fixed-size entries.
  The decoders read it with cycle detection and every count bounded by the page.
* The tracker's units by address, straight from its bitmaps.
* Bulk allocation of metadata pages from a page allocator, in blocks of up to 16 pages,
  all or nothing, never page 0.
* Reading many pages, the root pointer property, and the checks every decoder applies to
  the units it decodes (inside RAM, outside scratch, sorted and disjoint) and to its own
  metadata pages (never on preserved memory).

Units: ``phys`` in bytes, ``pfn`` page frame numbers, ``order`` log2 of pages.  All
little-endian (the native order of arm64 and x86 kernels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from kho.devicetree.layout import MEMORY_MAP_PROP, unpack_u64_prop
from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory

#: ``struct { u64 next; u32 count; u32 magic; }`` at the start of every chunk page.
CHUNK_HEADER = np.dtype([("next", "<u8"), ("count", "<u4"), ("magic", "<u4")])


def magic_of(tag: bytes) -> int:
    """The u32 magic whose little-endian bytes spell ``tag`` (4 ASCII bytes)."""
    return int.from_bytes(tag, "little")


def chunk_capacity(page_size: int, entry_size: int) -> int:
    """Entries of ``entry_size`` bytes one chunk page holds after its header."""
    return (page_size - CHUNK_HEADER.itemsize) // entry_size


def check_page_size(encoding_page_size: int, memory: PhysicalMemory) -> None:
    """KHOError(EINVAL) when an encoding instance and the memory disagree on the page size."""
    if encoding_page_size != memory.page_size:
        raise KHOError("EINVAL", f"encoding for {encoding_page_size}-byte pages used on a machine with {memory.page_size}-byte pages")


# -- the tracker's units ------------------------------------------------------------------
# -- allocation ---------------------------------------------------------------------------
#: Largest block :func:`alloc_pages_bulk` asks for: 16 pages, which even a fragmented
#: allocator usually has (bigger blocks save little, and every refused order costs the
#: first-fit allocator a scan of all RAM).
BULK_ORDER = 4


def alloc_pages_bulk(allocator, count: int, page_size: int, max_order: int = BULK_ORDER) -> np.ndarray:
    """Allocate ``count`` pages of ``page_size`` bytes; their phys (uint64, in allocation order).

    Asks for blocks of up to ``max_order`` (0: page by page, in the allocator's order, as
    the kernel ABIs allocate), no larger than the remaining count,
    stepping down on ENOMEM and never up again, so that ``count`` pages cost about
    ``count / 16`` calls.  Only ``alloc_pages``/``free_pages`` are used.
    Page 0 is never returned (phys 0 means NULL in every pointer): if a block holds it, one
    more page is taken and page 0 freed.  All or nothing: on ENOMEM every block taken is
    freed again.
    """
    ps = page_size
    blocks: list[tuple[int, int]] = []
    order = max_order  # at most BULK_ORDER, below every MAX_PAGE_ORDER
    remaining = count
    try:
        while remaining:
            order = min(order, remaining.bit_length() - 1)
            try:
                phys = allocator.alloc_pages(order)
            except KHOError as err:
                if err.errno_name != "ENOMEM" or order == 0:
                    raise
                order -= 1
                continue
            blocks.append((phys, order))
            remaining -= 1 << order
        if any(phys == 0 for phys, _ in blocks):
            # Phys 0 is the NULL pointer (end of a list, empty slot): never a metadata page.
            blocks.append((allocator.alloc_pages(0), 0))
    except KHOError:
        for phys, order in blocks:
            allocator.free_pages(phys, order)
        raise
    if not blocks:
        return np.empty(0, np.uint64)
    pages = np.concatenate([np.uint64(phys) + np.arange(1 << order, dtype=np.uint64) * np.uint64(ps) for phys, order in blocks])
    if (pages == 0).any():
        allocator.free_pages(0, 0)
        pages = pages[pages != 0]
    return pages


# -- reading ------------------------------------------------------------------------------
def read_root_pointer(props: Mapping[str, bytes], name: str = MEMORY_MAP_PROP) -> int:
    """The u64 in root property ``name``: present, exactly 8 bytes, non-zero (else KHOFormatError)."""
    raw = props.get(name)
    value = unpack_u64_prop(None if raw is None else bytes(raw), f"fdt.{name}")
    if value == 0:
        raise KHOFormatError(f"fdt.{name}", "property is zero")
    return value


def check_pointer(memory: PhysicalMemory, phys: int, size: int, align: int, field: str, location: int | None,
                  *, strict: bool = True) -> None:
    """KHOFormatError unless ``[phys, phys+size)`` is ``align``-aligned and inside one RAM bank
    and, when ``strict``, outside every scratch area (metadata there could be overwritten by
    the next kernel's early allocations before it is read)."""
    if phys % align:
        raise KHOFormatError(field, f"pointer {phys:#x} is not {align}-byte aligned", location)
    if not memory.in_ram(phys, size):
        raise KHOFormatError(field, f"pointer {phys:#x} is outside RAM", location)
    if strict and memory.overlaps_scratch(phys, size):
        raise KHOFormatError(field, f"pointer {phys:#x} points into a scratch area", location)


def read_pages(memory: PhysicalMemory, pages: np.ndarray) -> np.ndarray:
    """The contents of pages ``pages`` (phys, ascending, validated by the caller) as a
    ``(n, page_size)`` uint8 array; contiguous pages are read in one call.  O(n pages)."""
    ps = memory.page_size
    out = np.empty((pages.size, ps), dtype=np.uint8)
    if not pages.size:
        return out
    breaks = np.flatnonzero(np.diff(pages.astype(np.int64)) != ps) + 1
    firsts = np.concatenate([[0], breaks]).tolist()
    lasts = np.concatenate([breaks, [pages.size]]).tolist()
    for first, last in zip(firsts, lasts):
        data = memory.read(int(pages[first]), (last - first) * ps)
        out[first:last] = np.frombuffer(data, dtype=np.uint8).reshape(last - first, ps)
    return out


# -- chunk lists --------------------------------------------------------------------------
def write_chunk_list(memory: PhysicalMemory, allocator, payload: np.ndarray, entry_size: int, magic: int) -> np.ndarray:
    """Write ``payload`` (uint8, a whole number of entries) as a chunk list.

    Allocates ``max(1, ceil(entries / capacity))`` pages with :func:`alloc_pages_bulk`
    (nothing is written on ENOMEM) and returns their phys in list order (the first is the
    head).  O(payload bytes).
    """
    ps = memory.page_size
    cap = chunk_capacity(ps, entry_size)
    entries = payload.size // entry_size
    nchunks = max(1, -(-entries // cap))
    pages = alloc_pages_bulk(allocator, nchunks, memory.page_size)
    buf = np.zeros((nchunks, ps), dtype=np.uint8)
    header = np.zeros(nchunks, dtype=CHUNK_HEADER)
    header["next"][:-1] = pages[1:]
    header["count"] = np.minimum(cap, entries - np.arange(nchunks) * cap)
    header["magic"] = magic
    buf[:, :CHUNK_HEADER.itemsize] = header.view(np.uint8).reshape(nchunks, CHUNK_HEADER.itemsize)
    body = np.zeros(nchunks * cap * entry_size, dtype=np.uint8)
    body[:payload.size] = payload
    buf[:, CHUNK_HEADER.itemsize:CHUNK_HEADER.itemsize + cap * entry_size] = body.reshape(nchunks, cap * entry_size)
    for i, phys in enumerate(pages.tolist()):
        memory.write(phys, buf[i])
    return pages


@dataclass
class ChunkList:
    """A chunk list read back: its pages in list order, entries per chunk, and the
    concatenated entries (uint8)."""

    pages: np.ndarray
    counts: np.ndarray
    payload: np.ndarray
    entry_size: int

    def location(self, entry: int) -> int:
        """Phys of entry number ``entry`` (0-based over the whole list)."""
        ends = np.cumsum(self.counts)
        chunk = int(np.searchsorted(ends, entry, side="right"))
        first = int(ends[chunk] - self.counts[chunk])
        return int(self.pages[chunk]) + CHUNK_HEADER.itemsize + (entry - first) * self.entry_size


def read_chunk_list(memory: PhysicalMemory, head: int, entry_size: int, magic: int, field: str, *,
                    strict: bool = True) -> ChunkList:
    """Follow a chunk list from ``head``: every pointer page-aligned and in RAM (and outside
    scratch when ``strict``), the magic right, ``count`` at most the page's capacity, no
    chunk visited twice (so the walk ends after at most one visit per stored page: a page
    never written reads as zeros, whose magic is wrong).  KHOFormatError names ``field``.
    O(chunks) reads."""
    ps = memory.page_size
    cap = chunk_capacity(ps, entry_size)
    seen: set[int] = set()
    pages, counts, parts = [], [], []
    phys, where = head, None
    while phys:
        check_pointer(memory, phys, ps, ps, f"{field}.next" if pages else f"fdt.{MEMORY_MAP_PROP}", where, strict=strict)
        if phys in seen:
            raise KHOFormatError(f"{field}.next", f"chunk {phys:#x} is reached twice (the list loops)", where)
        seen.add(phys)
        page = memory.read(phys, ps)
        header = np.frombuffer(page, dtype=CHUNK_HEADER, count=1)[0]
        if int(header["magic"]) != magic:
            raise KHOFormatError(f"{field}.magic", f"{int(header['magic']):#010x}, expected {magic:#010x}", phys)
        count = int(header["count"])
        if count > cap:
            raise KHOFormatError(f"{field}.count", f"{count} entries, a chunk holds at most {cap}", phys)
        pages.append(phys)
        counts.append(count)
        parts.append(np.frombuffer(page, dtype=np.uint8, count=count * entry_size, offset=CHUNK_HEADER.itemsize))
        where, phys = phys, int(header["next"])
    return ChunkList(np.array(pages, dtype=np.uint64), np.array(counts, dtype=np.int64),
                     np.concatenate(parts) if parts else np.empty(0, np.uint8), entry_size)


# -- checks on decoded units --------------------------------------------------------------
def usable_segments(memory: PhysicalMemory) -> tuple[np.ndarray, np.ndarray]:
    """RAM minus the scratch areas: sorted, disjoint ``[start, end)`` pfn intervals (int64),
    one or more per bank (two intervals never merge across a bank boundary).  Banks and
    areas are both sorted and disjoint, so one merge-like pass does it: O(banks + areas)."""
    shift = memory.page_shift
    starts, ends = [], []
    areas = [(a.addr >> shift, a.end >> shift) for a in memory.scratch]
    first = 0  # the first area that may still meet the current or a later bank
    for bank in memory.banks:
        pos, end = bank.start >> shift, bank.end >> shift
        while first < len(areas) and areas[first][1] <= pos:
            first += 1
        i = first
        while i < len(areas) and areas[i][0] < end:
            a_start, a_end = areas[i]
            if a_start > pos:
                starts.append(pos)
                ends.append(a_start)
            pos = max(pos, a_end)
            i += 1
        if pos < end:
            starts.append(pos)
            ends.append(end)
    return np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)


def in_usable(memory: PhysicalMemory, start_pfn: np.ndarray, end_pfn: np.ndarray) -> np.ndarray:
    """Bool per ``[start, end)`` pfn span (int64, non-empty): inside one usable segment
    (one RAM bank, no scratch page).  One searchsorted: O(n log segments)."""
    seg_start, seg_end = usable_segments(memory)
    seg = np.searchsorted(seg_start, start_pfn, side="right") - 1
    return (seg >= 0) & (end_pfn <= seg_end[np.maximum(seg, 0)])


def check_units(memory: PhysicalMemory, phys: np.ndarray, order: np.ndarray, field: str,
                locate: Callable[[int], int | None] = lambda i: None, *, strict: bool = True) -> None:
    """KHOFormatError unless every unit ``(phys, order)`` (sorted by phys; orders and
    alignment already checked by the caller) lies inside one RAM bank and, when ``strict``,
    meets no scratch area and does not overlap the next unit.  ``locate(i)`` gives the phys
    where unit ``i`` was read, for the error.  O(n log segments) numpy work."""
    if not phys.size:
        return
    if not strict:
        outside = ~memory.in_ram_array(phys, np.left_shift(np.uint64(memory.page_size), order.astype(np.uint64)))
        if outside.any():
            i = int(np.argmax(outside))
            raise KHOFormatError(field, f"unit {int(phys[i]):#x} order {int(order[i])}: outside RAM", locate(i))
        return
    shift = memory.page_shift
    start = phys.view(np.int64) >> shift
    end = start + np.left_shift(1, order.astype(np.int64))

    def fail(mask: np.ndarray, message: str) -> None:
        i = int(np.argmax(mask))
        raise KHOFormatError(field, f"unit {int(phys[i]):#x} order {int(order[i])}: {message}", locate(i))

    if not in_usable(memory, start, end).all():
        size = np.left_shift(np.uint64(memory.page_size), order.astype(np.uint64))
        for mask, message in (
            (~memory.in_ram_array(phys, size), "outside RAM"),
            (memory.overlaps_scratch_array(phys, size), "inside a scratch area"),
        ):
            if mask.any():
                fail(mask, message)
    overlap = start[1:] < end[:-1]
    if overlap.any():
        fail(np.concatenate([[False], overlap]), "overlaps or precedes the unit before it")


def check_metadata_disjoint(memory: PhysicalMemory, pages: np.ndarray, phys: np.ndarray, order: np.ndarray, field: str) -> None:
    """KHOFormatError when a metadata page (phys) lies inside a decoded unit (units sorted by phys)."""
    if not pages.size or not phys.size:
        return
    i = np.searchsorted(phys, pages, side="right").astype(np.int64) - 1
    j = np.maximum(i, 0)
    end = phys[j] + np.left_shift(np.uint64(memory.page_size), order[j].astype(np.uint64))
    inside = (i >= 0) & (pages < end)
    if inside.any():
        k = int(np.argmax(inside))
        raise KHOFormatError(field, f"metadata page {int(pages[k]):#x} lies inside preserved unit {int(phys[j[k]]):#x}", int(pages[k]))
