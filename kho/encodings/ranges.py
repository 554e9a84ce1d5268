"""``ranges``: early KHO's ``mem`` property, an array of ``{u64 addr; u64 len}`` pairs in the FDT.

Layout (:data:`RANGE`): one 16-byte little-endian entry per range, ``addr`` and ``len``
in bytes, page-aligned, ``len > 0``, sorted by address and disjoint.  The encoder merges
units that touch into one range (never across a RAM bank boundary), so the folio orders
are lost: the decoder returns the kernel's greedy split of each range
(``DecodedMap.exact_orders = False``), which is what a ``kho_restore_pages`` of the whole
range would see, not the folios that were preserved.

Nothing is written to memory pages: the whole array is the root FDT property ``mem``.
The kernel builds the KHO root FDT in one page, so a large set cannot really be carried
this way; :class:`RangesEncodedMap` says how big the FDT would at least be and whether
it fits (``fits_in_fdt_page``).

This module also holds the merge / greedy-split helpers ranges-packed shares.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.devicetree.layout import FDT_HEADER, FDT_PROP_HEADER, FDT_RESERVE_ENTRY, FDT_TAG_ALIGN, FDT_TOKEN
from kho.encodings.base import DecodedMap, EncodedMap, Encoding, register
from kho.encodings.common import check_page_size
from kho.errors import KHOFormatError
from kho.files import check_host_memory
from kho.memory import intervals
from kho.memory.geometry import greedy_split_array, greedy_split_bound
from kho.memory.physical import PhysicalMemory

#: ``struct { u64 addr; u64 len; }``, bytes, little-endian.
RANGE = np.dtype([("addr", "<u8"), ("len", "<u8")])
#: The root FDT property holding the array.
MEM_PROPERTY = "mem"

def _fdt_align(size: int) -> int:
    return -(-size // FDT_TAG_ALIGN) * FDT_TAG_ALIGN


def fdt_min_bytes(compatible: str, props: Mapping[str, bytes]) -> int:
    """Bytes of the smallest flattened devicetree (Devicetree Specification v0.4, ch. 5)
    whose root holds ``compatible`` and ``props`` and nothing else: header, the
    terminating reservation entry, the root node's tokens and properties, the strings.
    Sub-nodes only add to it."""
    values = {"compatible": compatible.encode() + b"\0", **props}
    struct = FDT_TOKEN.size + _fdt_align(1)  # FDT_BEGIN_NODE and the root's empty name
    struct += sum(FDT_TOKEN.size + FDT_PROP_HEADER.size + _fdt_align(len(v)) for v in values.values())
    struct += 2 * FDT_TOKEN.size  # FDT_END_NODE, FDT_END
    strings = sum(len(name) + 1 for name in values)
    return FDT_HEADER.size + FDT_RESERVE_ENTRY.size + struct + strings


@dataclass
class RangesEncodedMap(EncodedMap):
    """An :class:`EncodedMap` that also reports the number of ranges and the least size of
    the root FDT carrying them (``fdt_min_bytes``); ``fits_in_fdt_page`` is False when
    the kernel could not build that FDT in its one page."""

    nr_ranges: int = 0
    fdt_min_bytes: int = 0

    @property
    def fits_in_fdt_page(self) -> bool:
        return self.fdt_min_bytes <= self.page_size


# -- helpers shared with ranges-packed -----------------------------------------------------
def merge_units(memory: PhysicalMemory, phys: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Units ``(phys, order)`` sorted by phys, as merged ``[start, end)`` pfn runs (int64)."""
    pfn = np.asarray(phys, dtype=np.uint64).view(np.int64) >> memory.page_shift
    return merge_in_banks(memory, *intervals.of_units(pfn, order))


def merge_in_banks(memory: PhysicalMemory, start_pfn: np.ndarray, end_pfn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint pfn runs with touching ones joined, never across a RAM bank boundary."""
    return intervals.merge_adjacent(start_pfn, end_pfn, intervals.banks(memory, np.int64)[0])


#: Most units a decoded ``ranges`` / ``ranges-packed`` map may split into: 2**28 (2.3 GiB of
#: phys and orders; 4x the 67M units of the 1 TiB scale run).  One 16-byte entry over a
#: 2**52-byte bank would be 2**30 units.
MAX_DECODED_UNITS = 1 << 28
#: Host bytes a decoded unit costs while it is split (pfn, phys, order and temporaries).
DECODED_UNIT_BYTES = 32


def check_split_size(start_pfn: np.ndarray, end_pfn: np.ndarray, max_order: int, field: str) -> None:
    """Before splitting: KHOFormatError when the runs' split could exceed
    :data:`MAX_DECODED_UNITS` units (:func:`~kho.memory.geometry.greedy_split_bound`),
    ENOMEM when the host has not the memory for it.  O(runs)."""
    bound = greedy_split_bound(start_pfn, end_pfn, max_order)
    if bound > MAX_DECODED_UNITS:
        raise KHOFormatError(field, f"{start_pfn.size:,} ranges split into up to {bound:,} units, "
                                    f"more than the {MAX_DECODED_UNITS:,} a decoded map may hold")
    check_host_memory(bound * DECODED_UNIT_BYTES, f"decoding {bound:,} units of {field}")


def decode_runs(memory: PhysicalMemory, start_pfn: np.ndarray, end_pfn: np.ndarray, metadata_pages: np.ndarray,
                *, strict: bool = True, field: str = f"fdt.{MEM_PROPERTY}") -> DecodedMap:
    """The :class:`DecodedMap` of validated runs: merged again, greedily split, orders lost.
    Strict runs arrive sorted and disjoint; lenient ones may come in any order and overlap,
    and are reduced to their union first (reserving a range twice reserves it once).
    Work and memory O(runs + units), the units bounded before any is made
    (:func:`check_split_size`)."""
    if not strict:
        start_pfn, end_pfn = intervals.normalize(start_pfn, end_pfn, merge_touching=False)
    start, end = merge_in_banks(memory, start_pfn, end_pfn)
    check_split_size(start, end, memory.geometry.max_order, field)
    pfn, order = greedy_split_array(start, end, memory.geometry.max_order)
    phys = pfn.astype(np.uint64) << np.uint64(memory.page_shift)
    return DecodedMap(phys, order, exact_orders=False, metadata_pages=metadata_pages)


def check_runs(memory: PhysicalMemory, start_pfn: np.ndarray, end_pfn: np.ndarray, field: str,
               locate: Callable[[int], int], where: str = "phys", *, strict: bool = True) -> None:
    """KHOFormatError unless every non-empty ``[start, end)`` pfn run (int64) lies inside
    one RAM bank and, when ``strict``, outside scratch, sorted and disjoint.  ``locate(i)``
    says where run ``i`` was read (a phys, or an offset in a property with
    ``where="offset"``) for the error.  O(n log segments) numpy work."""
    shift = memory.page_shift

    def fail(mask: np.ndarray, message: str) -> None:
        i = int(np.argmax(mask))
        addr, length = int(start_pfn[i]) << shift, int(end_pfn[i] - start_pfn[i]) << shift
        raise KHOFormatError(field, f"range {addr:#x}+{length:#x}: {message}", locate(i), where=where)

    if not strict:
        addr = start_pfn.astype(np.uint64) << np.uint64(shift)
        outside = ~memory.in_ram_array(addr, (end_pfn - start_pfn).astype(np.uint64) << np.uint64(shift))
        if outside.any():
            fail(outside, "outside RAM or across a RAM bank boundary")
        return
    inside = intervals.within(*intervals.usable(memory), start_pfn, end_pfn)
    if not inside.all():
        addr = start_pfn.astype(np.uint64) << np.uint64(shift)
        length = (end_pfn - start_pfn).astype(np.uint64) << np.uint64(shift)
        for mask, message in (
            (~memory.in_ram_array(addr, length), "outside RAM"),
            (memory.overlaps_scratch_array(addr, length), "meets a scratch area"),
            (~inside, "crosses a RAM bank boundary"),
        ):
            if mask.any():
                fail(mask, message)
    backwards = start_pfn[1:] < end_pfn[:-1]
    if backwards.any():
        fail(np.concatenate([[False], backwards]), "overlaps or precedes the range before it")


@register
class Ranges(Encoding):
    """Merged ``{addr, len}`` ranges in the root FDT property ``mem``; loses folio orders."""

    name = "ranges"
    compatible = "kho-ranges"
    keeps_orders = False

    def encode(self, tracker: Tracker, allocator: PageAllocator) -> RangesEncodedMap:
        """O(units) numpy work; writes no page."""
        memory = tracker.memory
        check_page_size(self.name, self.page_size, memory)
        phys, order = tracker.units_array()
        start, end = merge_units(memory, phys, order)
        table = np.empty(start.size, dtype=RANGE)
        table["addr"] = start.astype(np.uint64) << np.uint64(memory.page_shift)
        table["len"] = (end - start).astype(np.uint64) << np.uint64(memory.page_shift)
        props = {MEM_PROPERTY: table.tobytes()}
        return RangesEncodedMap(self.name, self.compatible, props, np.empty(0, np.uint64), self.page_size,
                                nr_ranges=int(start.size), fdt_min_bytes=fdt_min_bytes(self.compatible, props))

    def decode(self, memory: PhysicalMemory, props: Mapping[str, bytes], *, strict: bool = True) -> DecodedMap:
        """Validate the ranges, then split them greedily.  O(ranges log ranges + units) numpy work.

        Both modes: a whole number of 16-byte entries, each page-aligned, not wrapping, inside
        one RAM bank.  ``strict`` adds: no empty range, sorted, disjoint, outside scratch.
        ``strict=False`` reads the property as early KHO's kernel did (one memblock_reserve
        per range): empty ranges are skipped, order and overlaps do not matter (the union is
        split), scratch is not checked."""
        check_page_size(self.name, self.page_size, memory)
        raw = props.get(MEM_PROPERTY)
        if raw is None:
            raise KHOFormatError(f"fdt.{MEM_PROPERTY}", "property missing")
        if len(raw) % RANGE.itemsize:
            raise KHOFormatError(f"fdt.{MEM_PROPERTY}", f"{len(raw)} bytes is not a whole number of {RANGE.itemsize}-byte ranges")
        table = np.frombuffer(bytes(raw), dtype=RANGE)
        addr, length = table["addr"].astype(np.uint64), table["len"].astype(np.uint64)
        field = f"fdt.{MEM_PROPERTY}"
        if not strict:
            keep = length != 0
            offsets = np.flatnonzero(keep) * RANGE.itemsize
            addr, length = addr[keep], length[keep]
        else:
            offsets = np.arange(addr.size) * RANGE.itemsize
        for mask, message in (
            (length == 0, "empty"),
            (((addr | length) & np.uint64(memory.page_size - 1)) != 0, "not page-aligned"),
            (addr > ~length, "wraps around the address space"),
        ):
            if mask.any():
                i = int(np.argmax(mask))
                raise KHOFormatError(field, f"range {int(addr[i]):#x}+{int(length[i]):#x}: {message}", int(offsets[i]), where="offset")
        start = (addr >> np.uint64(memory.page_shift)).view(np.int64)
        end = start + (length >> np.uint64(memory.page_shift)).view(np.int64)
        check_runs(memory, start, end, field, lambda i: int(offsets[i]), "offset", strict=strict)
        return decode_runs(memory, start, end, np.empty(0, np.uint64), strict=strict)
