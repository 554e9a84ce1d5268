"""The boot DTB's ``/chosen`` KHO properties (the arm64 handoff).

``/chosen/linux,kho-fdt`` and ``/chosen/linux,kho-scratch`` each hold one ``<address
size>`` pair in big-endian cells sized by the root's ``#address-cells`` / ``#size-cells``
(2 + 2 on arm64, so 16 bytes).  The FDT size written is its allocation (one page); the
scratch size is ``count * 16`` bytes of ``struct kho_scratch`` entries, little-endian.
The next kernel rejects a property whose length is not exactly one pair.  The array itself
is :mod:`kho.handover.scratch_array`'s.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import fdt
import numpy as np

from kho.abi.kexec_handover import KHO_CHOSEN_FDT_PROP_NAME, KHO_CHOSEN_SCRATCH_PROP_NAME
from kho.devicetree.fdt_rw import ReadWriteFdt
from kho.devicetree.fdt_sw import SequentialFdt
from kho.devicetree.flat import parse_fdt, prop_bytes
from kho.devicetree.layout import BOOT_ADDRESS_CELLS, BOOT_SIZE_CELLS, DEFAULT_ADDRESS_CELLS, DEFAULT_SIZE_CELLS
from kho.errors import KHOError, KHOFormatError

#: Root ``compatible`` and ``model`` of the minimal boot DTB kho writes (QEMU's generic arm64 board).
BOOT_COMPATIBLE = "linux,dummy-virt"
BOOT_MODEL = "kho modelled machine"
#: The running kernel's DTB buffer kho builds first (bytes), and the room kexec adds to edit it.
BOOT_DTB_BUFFER = 4096
BOOT_DTB_SLACK = 4096
#: ``RNG_SEED_SIZE``: bytes of ``/chosen/rng-seed``.
RNG_SEED_SIZE = 128
#: Largest cell count accepted for an address or a size in strict mode (two cells = 64 bits).
MAX_CELLS = 2
#: Root cell counts the kernel assumes when the root has none (OF_ROOT_NODE_*_CELLS_DEFAULT
#: outside SPARC), used by the kernel-compatible reader; the strict reader uses the
#: Devicetree Specification's defaults (2 and 1).
KERNEL_DEFAULT_ADDRESS_CELLS = 1
KERNEL_DEFAULT_SIZE_CELLS = 1


@dataclass(frozen=True)
class ChosenKHO:
    """What ``/chosen`` says: the KHO FDT and the scratch array, ``phys`` and ``size`` in bytes.

    The one declaration of these four: a finalized handover
    (:class:`kho.handover.outgoing.Handover`) and a loaded image
    (:class:`kho.handover.imagefile.LoadedImage`) are ChosenKHOs with more fields."""

    fdt_phys: int
    fdt_size: int
    scratch_phys: int
    scratch_size: int


def _cells(value: int, count: int) -> list[int]:
    return [(value >> (32 * (count - 1 - i))) & 0xFFFFFFFF for i in range(count)]


def _base_dtb(bootargs: str | None) -> tuple[bytes, bytearray]:
    """The running kernel's own DTB as kho models it (``fdt_sw``): root ``compatible``,
    ``model``, ``#address-cells = <2>``, ``#size-cells = <2>`` and a ``/chosen`` holding the
    command line.  (blob, buffer)."""
    sw = SequentialFdt(BOOT_DTB_BUFFER)
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", BOOT_COMPATIBLE)
    sw.property_string("model", BOOT_MODEL)
    sw.property("#address-cells", struct.pack(">I", BOOT_ADDRESS_CELLS))
    sw.property("#size-cells", struct.pack(">I", BOOT_SIZE_CELLS))
    sw.begin_node("chosen")
    if bootargs is not None:
        sw.property_string("bootargs", bootargs)
    sw.end_node()
    sw.end_node()
    return sw.finish(), sw.buffer


def _addrrange(phys: int, size: int) -> bytes:
    """``fdt_appendprop_addrrange`` in the root's cells: big-endian address then size."""
    return b"".join(struct.pack(">I", c) for c in _cells(phys, BOOT_ADDRESS_CELLS) + _cells(size, BOOT_SIZE_CELLS))


def build_boot_dtb(fdt_phys: int, fdt_size: int, scratch_phys: int, scratch_size: int, *,
                   initrd: tuple[int, int] | None = None, bootargs: str | None = None, seed: int = 0) -> bytes:
    """The DTB an arm64 kexec_file_load builds for the next kernel (``of_kexec_alloc_and_setup_fdt``):
    the running kernel's DTB (:func:`_base_dtb`) edited in place with libfdt, so properties
    appear newest first, as on a real 7.3 kernel: ``linux,booted-from-kexec`` (empty),
    ``rng-seed`` (128 bytes), ``kaslr-seed`` (u64), ``linux,kho-scratch`` and ``linux,kho-fdt``
    (``<addr size>`` in the root's 2 + 2 cells), ``linux,initrd-end`` and ``linux,initrd-start``
    with a ``/memreserve/`` for the initrd when ``initrd = (phys, size)``, then ``bootargs``.
    The seeds are drawn from ``seed`` (the kernel's are random).  Packed (``fdt_pack``).
    EINVAL for a value that does not fit its cells.  O(DTB bytes) per edit."""
    for value, what in ((fdt_phys, "fdt address"), (fdt_size, "fdt size"), (scratch_phys, "scratch address"),
                        (scratch_size, "scratch size"), *(zip(initrd or (), ("initrd address", "initrd size")))):
        if not (isinstance(value, int) and 0 <= value < 1 << 64):
            raise KHOError("EINVAL", f"{what} {value!r} does not fit in two cells")
    blob, buffer = _base_dtb(bootargs)
    rw = ReadWriteFdt(blob, len(blob) + BOOT_DTB_SLACK, buffer)
    chosen = rw.subnode_offset(0, "chosen")
    if initrd is not None:
        start, size = initrd
        rw.setprop(chosen, "linux,initrd-start", struct.pack(">Q", start))
        rw.setprop(chosen, "linux,initrd-end", struct.pack(">Q", start + size))
        rw.add_mem_rsv(start, size)
        chosen = rw.subnode_offset(0, "chosen")
    rw.setprop(chosen, KHO_CHOSEN_FDT_PROP_NAME, _addrrange(fdt_phys, fdt_size))
    rw.setprop(chosen, KHO_CHOSEN_SCRATCH_PROP_NAME, _addrrange(scratch_phys, scratch_size))
    rng = np.random.default_rng(seed)
    rw.setprop(chosen, "kaslr-seed", rng.bytes(8))
    rw.setprop(chosen, "rng-seed", rng.bytes(RNG_SEED_SIZE))
    rw.setprop(chosen, "linux,booted-from-kexec", b"")
    rw.pack()
    return rw.blob()


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
