"""The toolkit every encoding uses: page checks, reads, pointer and unit validation.

Decoders read untrusted memory.  Everything here is vectorized over numpy arrays, bounded
by its arguments (never by a count read from the input), and raises
:class:`~kho.errors.KHOFormatError` naming the field and the address where the bad value
was read.  Encoders share two helpers: :func:`alloc_pages_bulk` (all-or-nothing metadata
pages) and :func:`tracker_bitmaps` (the tracker's bitmaps regrouped to another size).

Units: ``phys`` in bytes (uint64), ``pfn`` page frame numbers, ``order`` log2 of pages.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from kho.abi.kexec_handover import KHO_FDT_MEMORY_MAP_PROP_NAME
from kho.currentkernel.tracker import Tracker
from kho.devicetree.layout import unpack_u64_prop
from kho.encodings.base import DecodedMap
from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory

#: The highest physical address bit + 1 a unit may use (52-bit physical addresses).
PHYS_ADDR_BITS = 52
#: Bitmaps or nodes read and expanded at a time while decoding: bounds a decoder's
#: temporary memory (1024 page bitmaps = 4 MiB, 32 MiB expanded) whatever counts the input claims.
DECODE_BATCH = 1024
#: Largest block :func:`alloc_pages_bulk` asks for: 16 pages, which even a fragmented
#: allocator usually has (bigger blocks save little, and every refused order costs the
#: first-fit allocator a scan of all RAM).
BULK_ORDER = 4


def check_page_size(name: str, encoding_page_size: int, memory: PhysicalMemory) -> None:
    """KHOError(EINVAL) when encoding ``name`` and the memory disagree on the page size.  O(1)."""
    if encoding_page_size != memory.page_size:
        raise KHOError("EINVAL", f"{name} for {encoding_page_size}-byte pages used on a machine with "
                                 f"{memory.page_size}-byte pages")


# -- encoder helpers ---------------------------------------------------------------------------
def alloc_pages_bulk(allocator, count: int, page_size: int, max_order: int = BULK_ORDER) -> np.ndarray:
    """Allocate ``count`` pages of ``page_size`` bytes; their phys (uint64, in allocation order).

    Asks for blocks of up to ``max_order`` (0: page by page, in the allocator's order, as
    the kernel ABIs allocate), no larger than the remaining count, stepping down on ENOMEM
    and never up again, so that ``count`` pages cost about ``count / 16`` calls.  Only
    ``alloc_pages``/``free_pages`` are used.  Page 0 is never returned (phys 0 means NULL
    in every pointer): if a block holds it, one more page is taken and page 0 freed.  All
    or nothing: on ENOMEM every block taken is freed again.  O(count / 2**max_order) calls.
    """
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
    pages = np.concatenate([np.uint64(phys) + np.arange(1 << order, dtype=np.uint64) * np.uint64(page_size)
                            for phys, order in blocks])
    if (pages == 0).any():
        allocator.free_pages(0, 0)
        pages = pages[pages != 0]
    return pages


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


# -- reading -----------------------------------------------------------------------------------
def read_map_pointer(props: Mapping[str, bytes], *, name: str = KHO_FDT_MEMORY_MAP_PROP_NAME,
                     allow_zero: bool = False) -> int:
    """The u64 in root property ``name`` (``preserved-memory-map`` by default): present,
    exactly 8 bytes, and non-zero unless ``allow_zero`` (KHOFormatError otherwise).  O(1)."""
    raw = props.get(name)
    value = unpack_u64_prop(None if raw is None else bytes(raw), f"fdt.{name}")
    if value == 0 and not allow_zero:
        raise KHOFormatError(f"fdt.{name}", "the memory map pointer is 0")
    return value


def read_pages(memory: PhysicalMemory, pages: np.ndarray, field: str = "map.metadata") -> np.ndarray:
    """The contents of pages ``pages`` (phys, validated page-aligned and in RAM, any order) as a
    ``(n, page_size)`` uint8 array; consecutive pages are read in one call.  KHOFormatError
    (``field``) when one lies in a generated page run (:meth:`PhysicalMemory.is_generated`):
    metadata is stored, so what a map yields stays bounded by the bytes its input holds.
    O(n pages + groups log runs)."""
    pages = np.asarray(pages, dtype=np.uint64)
    ps = memory.page_size
    out = np.empty((pages.size, ps), dtype=np.uint8)
    if not pages.size:
        return out
    breaks = np.flatnonzero(np.diff(pages.astype(np.int64)) != ps) + 1
    firsts = np.concatenate([[0], breaks]).tolist()
    lasts = np.concatenate([breaks, [pages.size]]).tolist()
    for first, last in zip(firsts, lasts):
        if memory.is_generated(int(pages[first]), (last - first) * ps):
            raise KHOFormatError(field, "metadata in a generated page run (pages with no stored contents)",
                                 int(pages[first]))
        data = memory.read(int(pages[first]), (last - first) * ps)
        out[first:last] = np.frombuffer(data, dtype=np.uint8).reshape(last - first, ps)
    return out


# -- pointers ----------------------------------------------------------------------------------
def check_pointers(memory: PhysicalMemory, phys: np.ndarray, size: int, align: int, field: str, *,
                   strict: bool = True, where: np.ndarray | None = None) -> None:
    """KHOFormatError unless every ``phys`` is ``align``-aligned with ``[phys, phys + size)``
    inside one RAM bank and, when ``strict``, outside every scratch area (the next kernel's
    early allocations come from scratch and could overwrite metadata there before it is
    read).  The error's address is ``where[i]`` (where pointer ``i`` was read; 0 = unknown)
    when given, else the pointer itself.  O(n log banks + n log areas)."""
    phys = np.asarray(phys, dtype=np.uint64)
    if phys.size == 1:  # one pointer (a list's next link): the same checks on Python ints
        p = int(phys.reshape(-1)[0])
        message = (f"is not aligned to {align} bytes" if p & (align - 1) else
                   f"to {size} bytes is outside RAM" if not memory.in_ram(p, size) else
                   "points into a scratch area: metadata inside a scratch area"
                   if strict and memory.overlaps_scratch(p, size) else None)
        if message:
            raise KHOFormatError(field, f"pointer {p:#x} {message}", p if where is None else (int(np.asarray(where).reshape(-1)[0]) or None))
        return

    def fail(mask: np.ndarray, message: str) -> None:
        if mask.any():
            i = int(np.argmax(mask))
            at = int(phys[i]) if where is None else (int(np.asarray(where)[i]) or None)
            raise KHOFormatError(field, f"pointer {int(phys[i]):#x} {message}", at)

    fail((phys & np.uint64(align - 1)) != 0, f"is not aligned to {align} bytes")
    fail(~memory.in_ram_array(phys, np.uint64(size)), f"to {size} bytes is outside RAM")
    if strict:
        fail(memory.overlaps_scratch_array(phys, np.uint64(size)), "points into a scratch area: metadata inside a scratch area")


def check_distinct(phys: np.ndarray, field: str, what: str) -> None:
    """KHOFormatError when a pointer occurs twice (a loop or shared metadata).  O(n log n)."""
    if phys.size < 2:
        return
    ordered = np.sort(phys)
    dup = ordered[1:] == ordered[:-1]
    if dup.any():
        raise KHOFormatError(field, f"{what} reached twice", int(ordered[1:][dup][0]))


# -- units -------------------------------------------------------------------------------------
def max_unit_order(memory: PhysicalMemory, strict: bool, capped: bool = True) -> int:
    """The largest order a decoded unit may have: MAX_PAGE_ORDER when ``strict`` and the
    format's writers cap their units (``capped``); else the largest unit that fits in the
    52-bit physical address space (a kernel reads and reserves units above MAX_PAGE_ORDER,
    which only its restore refuses; Linux 7.x writes them).  O(1)."""
    return memory.geometry.max_order if strict and capped else PHYS_ADDR_BITS - memory.page_shift


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
        raw = maps.reshape(-1) if sel.size == order.size else maps[sel].reshape(-1)
        nonzero = np.count_nonzero(raw)
        if nonzero > raw.size >> 3:  # dense enough: expanding every byte is cheaper than gathering
            flat = np.flatnonzero(np.unpackbits(raw, bitorder="little").view(bool))
        else:
            nonzero = np.flatnonzero(raw)
            pos = np.flatnonzero(np.unpackbits(raw[nonzero], bitorder="little").view(bool))
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
        if sel.size and firsts[-1] - firsts[0] == (sel.size - 1) << bits_log2 and (
                sel.size == 1 or (np.diff(firsts) == nbits).all()):  # consecutive bitmaps: one offset
            unit += firsts[0]
        else:
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


def check_units(memory: PhysicalMemory, phys: np.ndarray, order: np.ndarray, field: str = "unit",
                locate: Callable[[int], int | None] | None = None, *, strict: bool = True, capped: bool = True) -> None:
    """KHOFormatError unless the units ``(phys, order)``, sorted by phys, are valid.

    Both modes: every order at most :func:`max_unit_order` (``capped``: the format's writers
    never exceed MAX_PAGE_ORDER), every unit inside one RAM
    bank.  ``strict`` adds: no unit overlapping (or repeating) the one before it, none
    meeting a scratch area.  ``locate(i)`` gives the address where unit ``i`` was read, for
    the error (default: the unit's own phys).  O(n) numpy for orders and overlaps, then
    O((banks + areas) log n) binary searches (sorted, disjoint units have ascending ends);
    the lenient RAM check is O(n log banks).
    """
    if not phys.size:
        return
    locate = locate or (lambda i: int(phys[i]))

    def fail(i: int, message: str) -> None:
        raise KHOFormatError(field, f"unit {int(phys[i]):#x} order {int(order[i])}: {message}", locate(i))

    limit = max_unit_order(memory, strict, capped)
    top = int(order.max())
    if top > limit:
        fail(int(np.argmax(order > limit)), f"above MAX_PAGE_ORDER {limit}" if strict and capped
             else f"too large for the {PHYS_ADDR_BITS}-bit physical address space")
    if not strict:
        outside = ~memory.in_ram_array(phys, np.left_shift(np.uint64(memory.page_size), order.astype(np.uint64)))
        if outside.any():
            fail(int(np.argmax(outside)), "outside RAM")
        return
    if int(phys.max()) < 1 << 63:  # one signed difference finds both overlaps and descents
        step = phys[1:].view(np.int64) - phys[:-1].view(np.int64)
        if top == int(order.min()):
            overlap = step < (memory.page_size << top)
        else:
            overlap = step < np.left_shift(np.int64(memory.page_size), order[:-1].astype(np.int64))
    else:
        if top == int(order.min()):
            overlap = phys[1:] - phys[:-1] < np.uint64(memory.page_size << top)
        else:
            overlap = phys[1:] - phys[:-1] < np.left_shift(np.uint64(memory.page_size), order[:-1].astype(np.uint64))
        overlap |= phys[1:] <= phys[:-1]
    if overlap.any():
        fail(int(np.argmax(overlap)) + 1, "overlaps or precedes the unit before it")

    def end_of(i: int) -> int:
        return int(phys[i]) + (memory.page_size << int(order[i]))

    covered = 0
    for bank in memory.banks:
        lo, hi = np.searchsorted(phys, np.array([bank.start, bank.end], dtype=np.uint64)).tolist()  # same dtype: no cast of phys
        if lo < hi and end_of(hi - 1) > bank.end:
            fail(hi - 1, "outside RAM")
        if lo > covered:
            fail(covered, "outside RAM")
        covered = max(covered, hi)
    if covered < phys.size:
        fail(covered, "outside RAM")
    for area in memory.scratch:
        i = int(np.searchsorted(phys, np.uint64(area.end))) - 1
        if i >= 0 and end_of(i) > area.addr:
            fail(i, f"overlaps the {area.kind} scratch area")


def check_metadata_disjoint(memory: PhysicalMemory, pages: np.ndarray, phys: np.ndarray, order: np.ndarray,
                            field: str) -> None:
    """KHOFormatError when a metadata page (phys) lies inside a decoded unit (units sorted by
    phys, disjoint).  O(pages log units)."""
    if not pages.size or not phys.size:
        return
    i = np.searchsorted(phys, pages, side="right").astype(np.int64) - 1
    j = np.maximum(i, 0)
    end = phys[j] + np.left_shift(np.uint64(memory.page_size), order[j].astype(np.uint64))
    inside = (i >= 0) & (pages < end)
    if inside.any():
        k = int(np.argmax(inside))
        raise KHOFormatError(field, f"metadata page {int(pages[k]):#x} lies inside the preserved unit at "
                                    f"{int(phys[j[k]]):#x}", int(pages[k]))


def finish_units(memory: PhysicalMemory, phys: np.ndarray, order: np.ndarray, metadata: np.ndarray, *,
                 strict: bool = True, field: str = "unit", metadata_field: str = "metadata",
                 exact_orders: bool = True, capped: bool = True) -> DecodedMap:
    """Sort decoded units by address, validate them (:func:`check_units`; when ``strict``
    also :func:`check_metadata_disjoint` for the ``metadata`` pages) and return the map.

    ``phys`` may arrive as a few ascending runs (per order): the stable sort merges them.
    O(n log n) at worst for the sort, then the checks' costs.
    """
    phys = np.asarray(phys, dtype=np.uint64)
    order = np.asarray(order, dtype=np.uint8)
    if phys.size > 1 and not bool(np.all(phys[1:] > phys[:-1])):
        sort = np.argsort(phys, kind="stable")
        phys, order = phys[sort], order[sort]
    metadata = np.unique(np.asarray(metadata, dtype=np.uint64))
    check_units(memory, phys, order, field, strict=strict, capped=capped)
    if strict:
        check_metadata_disjoint(memory, metadata, phys, order, metadata_field)
    return DecodedMap(phys, order, exact_orders, metadata)
