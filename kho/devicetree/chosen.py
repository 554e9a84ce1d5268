"""The boot DTB's ``/chosen`` KHO properties and the scratch-area array they point at.

``/chosen/linux,kho-fdt`` and ``/chosen/linux,kho-scratch`` each hold one ``<address
size>`` pair in big-endian cells sized by the root's ``#address-cells`` / ``#size-cells``
(2 + 2 on arm64, so 16 bytes).  The FDT size written is its allocation (one page); the
scratch size is ``count * 16`` bytes of ``struct kho_scratch`` entries, little-endian.
The next kernel rejects a property whose length is not exactly one pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import fdt
import numpy as np

from kho.abi.kexec_handover import KHO_CHOSEN_FDT_PROP_NAME, KHO_CHOSEN_SCRATCH_PROP_NAME, KHO_SCRATCH_DTYPE
from kho.devicetree.flat import new_tree, parse_fdt, prop_bytes, to_dtb
from kho.devicetree.layout import BOOT_ADDRESS_CELLS, BOOT_SIZE_CELLS, DEFAULT_ADDRESS_CELLS, DEFAULT_SIZE_CELLS
from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory, ScratchArea

#: Root ``compatible`` and ``model`` of the minimal boot DTB kho writes (QEMU's generic arm64 board).
BOOT_COMPATIBLE = "linux,dummy-virt"
BOOT_MODEL = "kho modelled machine"
#: Largest cell count accepted for an address or a size in strict mode (two cells = 64 bits).
MAX_CELLS = 2
#: Root cell counts the kernel assumes when the root has none (OF_ROOT_NODE_*_CELLS_DEFAULT
#: outside SPARC), used by the kernel-compatible reader; the strict reader uses the
#: Devicetree Specification's defaults (2 and 1).
KERNEL_DEFAULT_ADDRESS_CELLS = 1
KERNEL_DEFAULT_SIZE_CELLS = 1
#: Most entries a scratch-area array can hold: lowmem, global, and one per NUMA node
#: (MAX_NUMNODES = 1 << NODES_SHIFT, at most 1024 on arm64).  A longer claimed array is
#: refused before anything is read.
MAX_SCRATCH_AREAS = 2 + 1024


@dataclass(frozen=True)
class ChosenKHO:
    """What ``/chosen`` says: the KHO FDT and the scratch array, ``phys`` and ``size`` in bytes."""

    fdt_phys: int
    fdt_size: int
    scratch_phys: int
    scratch_size: int


def _cells(value: int, count: int) -> list[int]:
    return [(value >> (32 * (count - 1 - i))) & 0xFFFFFFFF for i in range(count)]


def build_boot_dtb(fdt_phys: int, fdt_size: int, scratch_phys: int, scratch_size: int) -> bytes:
    """A minimal boot DTB: root ``#address-cells = <2>``, ``#size-cells = <2>``, compatible,
    model, and ``/chosen`` with ``linux,kho-fdt`` and ``linux,kho-scratch``."""
    for value, what in ((fdt_phys, "fdt address"), (fdt_size, "fdt size"), (scratch_phys, "scratch address"), (scratch_size, "scratch size")):
        if not (isinstance(value, int) and 0 <= value < 1 << 64):
            raise KHOError("EINVAL", f"{what} {value!r} does not fit in two cells")
    tree = new_tree()
    root = tree.root
    root.append(fdt.PropStrings("compatible", BOOT_COMPATIBLE))
    root.append(fdt.PropStrings("model", BOOT_MODEL))
    root.append(fdt.PropWords("#address-cells", BOOT_ADDRESS_CELLS))
    root.append(fdt.PropWords("#size-cells", BOOT_SIZE_CELLS))
    chosen = fdt.Node("chosen")
    chosen.append(fdt.PropWords(KHO_CHOSEN_FDT_PROP_NAME, *_cells(fdt_phys, BOOT_ADDRESS_CELLS), *_cells(fdt_size, BOOT_SIZE_CELLS)))
    chosen.append(fdt.PropWords(KHO_CHOSEN_SCRATCH_PROP_NAME, *_cells(scratch_phys, BOOT_ADDRESS_CELLS), *_cells(scratch_size, BOOT_SIZE_CELLS)))
    root.append(chosen)
    return to_dtb(tree)


def _root_cells(root: fdt.Node, name: str, default: int, strict: bool) -> int:
    """A root cell count: 1..MAX_CELLS when ``strict``, any positive count otherwise (the
    kernel's ``of_read_number`` keeps the low 64 bits of a longer number)."""
    value = prop_bytes(root.get_property(name))
    if value is None:
        return default
    if len(value) != 4:
        raise KHOFormatError(f"dtb.{name}", f"property is {len(value)} bytes, not 4")
    cells = int.from_bytes(value, "big")
    if cells < 1 or (strict and cells > MAX_CELLS):
        raise KHOFormatError(f"dtb.{name}", f"{cells} cells (kho reads 1 or {MAX_CELLS})")
    return cells


def _pair(chosen: fdt.Node, name: str, address_cells: int, size_cells: int) -> tuple[int, int]:
    """The ``<address size>`` pair of property ``name``, each the low 64 bits of its cells."""
    value = prop_bytes(chosen.get_property(name))
    if value is None:
        raise KHOFormatError(f"chosen.{name}", "property missing")
    want = 4 * (address_cells + size_cells)
    if len(value) != want:
        raise KHOFormatError(f"chosen.{name}", f"property is {len(value)} bytes, not one <address size> pair of {want}")
    split = 4 * address_cells
    low64 = (1 << 64) - 1
    return int.from_bytes(value[:split], "big") & low64, int.from_bytes(value[split:], "big") & low64


def parse_chosen(dtb: bytes, *, strict: bool = True) -> ChosenKHO:
    """Read ``/chosen``'s KHO properties from a boot DTB (KHOFormatError when missing or malformed).

    ``strict=False`` reads as the kernel does: the blob through libfdt's lookups (see
    :func:`~kho.devicetree.flat.parse_fdt`), the kernel's default cell counts (1 and 1)
    when the root has none, and any cell count (the low 64 bits of each number kept).
    Both modes require each property to be exactly one pair (the kernel ignores the
    handover otherwise).  The kernel reads the size with ``#address-cells`` cells where
    the property holds ``#size-cells``; kho reads ``#size-cells`` cells in both modes (the
    same on arm64, 2 + 2)."""
    tree = parse_fdt(dtb, "dtb", strict=strict)
    root = tree.root
    defaults = (DEFAULT_ADDRESS_CELLS, DEFAULT_SIZE_CELLS) if strict else (KERNEL_DEFAULT_ADDRESS_CELLS, KERNEL_DEFAULT_SIZE_CELLS)
    address_cells = _root_cells(root, "#address-cells", defaults[0], strict)
    size_cells = _root_cells(root, "#size-cells", defaults[1], strict)
    chosen = root.get_subnode("chosen")
    if chosen is None:
        raise KHOFormatError("dtb.chosen", "the boot DTB has no /chosen node")
    fdt_phys, fdt_size = _pair(chosen, KHO_CHOSEN_FDT_PROP_NAME, address_cells, size_cells)
    scratch_phys, scratch_size = _pair(chosen, KHO_CHOSEN_SCRATCH_PROP_NAME, address_cells, size_cells)
    return ChosenKHO(fdt_phys, fdt_size, scratch_phys, scratch_size)


# -- the scratch-area array ------------------------------------------------------------------


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
    """``struct kho_scratch`` entries for ``areas`` in the kernel's order (:func:`kernel_order`), 16 bytes each."""
    areas = kernel_order(areas)
    table = np.zeros(len(areas), dtype=KHO_SCRATCH_DTYPE)
    table["addr"] = [a.addr for a in areas]
    table["size"] = [a.size for a in areas]
    return table.tobytes()


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
    non-empty area inside one RAM bank.  ``strict`` adds: ``size`` a whole number of
    entries, every area non-empty, page-aligned and disjoint from the others (the array
    itself may lie in one: kexec loads it as a segment, into scratch).  ``strict=False`` reads ``size // 16`` entries as the kernel does
    (a partial tail is ignored) and drops empty areas (``memblock_add`` of nothing), taking
    misaligned or overlapping areas as they are.  O(entries log entries)."""
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
        if strict and (length == 0 or not memory.geometry.is_aligned(addr) or not memory.geometry.is_aligned(length)):
            raise KHOFormatError("scratch.area", f"area {addr:#x}+{length:#x} is empty or not page-aligned", at)
        if length == 0:
            continue
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
