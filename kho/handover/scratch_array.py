"""The scratch-area array handed to the next kernel: ``struct kho_scratch`` entries.

The kernel writes one entry per area, 16 bytes each (:data:`~kho.abi.kexec_handover.KHO_SCRATCH_DTYPE`,
little-endian), in its own order: index 0 lowmem, 1 global, then one per NUMA node with
memory (``kho_scratch_cnt = nodes + 2``), whatever their addresses.  An area whose size
came out as zero (a scaled global area when all the kernel's memory is low) is written as
an empty entry, which the next kernel's ``memblock_add`` of nothing ignores.  The boot DTB's
``/chosen/linux,kho-scratch`` (arm64) or x86 ``kho_data`` says where the array is.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kho.abi.kexec_handover import KHO_SCRATCH_DTYPE
from kho.errors import KHOFormatError
from kho.memory.physical import PhysicalMemory, ScratchArea

#: Most entries a scratch-area array can hold: lowmem, global, and one per NUMA node
#: (MAX_NUMNODES = 1 << NODES_SHIFT, at most 1024 on arm64).  A longer claimed array is
#: refused before anything is read.
MAX_SCRATCH_AREAS = 2 + 1024


def scratch_kind(position: int) -> str:
    """The kind of the area at ``position`` in the kernel's array: lowmem, global, then node<N>."""
    return ("lowmem", "global")[position] if position < 2 else f"node{position - 2}"


def kernel_order(areas: Sequence[ScratchArea]) -> list[ScratchArea]:
    """``areas`` in the kernel's array order: lowmem, global, node0, node1, ..., then any other kind."""
    def rank(area: ScratchArea) -> tuple[int, int]:
        if area.kind == "lowmem":
            return 0, 0
        if area.kind == "global":
            return 1, 0
        if area.kind.startswith("node") and area.kind[4:].isdigit():
            return 2, int(area.kind[4:])
        return 3, area.addr
    return sorted(areas, key=rank)


def pack_scratch_array(areas: Sequence[ScratchArea]) -> bytes:
    """``struct kho_scratch`` entries for ``areas`` in the kernel's order (:func:`kernel_order`),
    16 bytes each; a missing lowmem or global area is an empty entry at its index.  O(areas log areas)."""
    ordered = kernel_order(areas)
    fixed = [next(((a.addr, a.size) for a in ordered if a.kind == kind), (0, 0)) for kind in ("lowmem", "global")]
    rest = [(a.addr, a.size) for a in ordered if a.kind not in ("lowmem", "global")]
    return np.array(fixed + rest, dtype=np.uint64).astype("<u8").tobytes()


def write_scratch_array(memory: PhysicalMemory, phys: int, areas: Sequence[ScratchArea]) -> int:
    """Write the array (kernel order) at ``phys``; returns its size in bytes (``len(areas) * 16``)."""
    data = pack_scratch_array(areas)
    memory.write(phys, data)
    return len(data)


def read_scratch_array(memory: PhysicalMemory, phys: int, size: int, *, strict: bool = True) -> list[ScratchArea]:
    """Read and check the array.  Kinds are taken from ``memory.scratch`` where an area
    matches, else named by position (the kernel writes lowmem, global, then one per node).

    Both modes: at least one and at most :data:`MAX_SCRATCH_AREAS` entries, at least one
    non-empty area (the next kernel's early allocations need one), the array and every
    non-empty area inside one RAM bank; empty entries are skipped (``memblock_add`` of
    nothing).  ``strict`` adds: ``size`` a whole number of entries, every area page-aligned
    and disjoint from the others (the array itself may lie in one: kexec loads it as a
    segment, into scratch).  ``strict=False`` reads ``size // 16`` entries as the kernel does
    (a partial tail is ignored), taking misaligned or overlapping areas as they are.
    O(entries log entries)."""
    item = KHO_SCRATCH_DTYPE.itemsize
    count = size // item
    if count == 0 or (strict and size % item):
        raise KHOFormatError("scratch.size", f"{size} bytes is not a whole, non-zero number of {item}-byte entries", phys)
    if count > MAX_SCRATCH_AREAS:
        raise KHOFormatError("scratch.size", f"{count} entries, more than the {MAX_SCRATCH_AREAS} a kernel can write", phys)
    size = count * item
    if not memory.in_ram(phys, size):
        raise KHOFormatError("scratch.phys", f"{size} bytes outside RAM", phys)
    table = np.frombuffer(memory.read(phys, size), dtype=KHO_SCRATCH_DTYPE)
    known = {(a.addr, a.size): a.kind for a in memory.scratch}
    areas = []
    for i, (addr, length) in enumerate(zip(table["addr"].tolist(), table["size"].tolist())):
        at = phys + i * item
        if length == 0:
            continue
        if strict and (not memory.geometry.is_aligned(addr) or not memory.geometry.is_aligned(length)):
            raise KHOFormatError("scratch.area", f"area {addr:#x}+{length:#x} is not page-aligned", at)
        if not memory.in_ram(addr, length):
            raise KHOFormatError("scratch.area", f"area {addr:#x}+{length:#x} is not inside one RAM bank", at)
        areas.append(ScratchArea(addr, length, known.get((addr, length), scratch_kind(i))))
    if not areas:
        raise KHOFormatError("scratch.size", f"{count} entries, none of them a non-empty area", phys)
    if not strict:
        return areas
    ordered = sorted(areas, key=lambda a: a.addr)
    for left, right in zip(ordered, ordered[1:]):
        if left.end > right.addr:
            raise KHOFormatError("scratch.area", f"areas at {left.addr:#x} and {right.addr:#x} overlap", phys)
    return areas


def usable_areas(areas: Sequence[ScratchArea], page_size: int) -> tuple[list[ScratchArea], list[str]]:
    """What a lenient next kernel can use of the areas :func:`read_scratch_array` accepted
    with ``strict=False``, and a log line for each one it could not take as given: each area
    trimmed to the whole pages inside it (memblock allocates whole pages), an area left with
    none dropped, an area overlapping one before it (by address) cut to the part after it.
    The result is page-aligned, disjoint and in address order, as
    :meth:`~kho.memory.physical.PhysicalMemory.set_scratch` needs.  O(areas log areas)."""
    kept: list[ScratchArea] = []
    notes: list[str] = []
    for area in sorted(areas, key=lambda a: a.addr):
        start = -(-area.addr // page_size) * page_size
        end = area.end // page_size * page_size
        if kept and start < kept[-1].end:
            start = kept[-1].end
        if end <= start:
            notes.append(f"ignoring scratch area {area.addr:#x}+{area.size:#x} ({area.kind}): "
                         f"no whole page of its own")
            continue
        if (start, end) != (area.addr, area.end):
            notes.append(f"scratch area {area.addr:#x}+{area.size:#x} ({area.kind}) used as {start:#x}+{end - start:#x}: "
                         f"whole pages, none shared with another area")
        kept.append(ScratchArea(start, end - start, area.kind))
    return kept, notes
