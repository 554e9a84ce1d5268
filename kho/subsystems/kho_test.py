"""The KHO self-test's ``kho_test`` sub-node exactly as ``lib/test_kho.c`` (Linux 7.3) writes it.

Writer (:func:`write_kho_test`, the module's ``kho_test_save``): folios of uniformly
random orders 0 .. MAX_PAGE_ORDER until ``max_mem`` bytes (a folio that would overshoot
takes ``get_order`` of what is left, minus one when that is not 0), each filled with
random bytes (generated content, :meth:`~kho.memory.physical.PhysicalMemory.fill_pattern`)
and chained through ``csum_partial`` (:mod:`~kho.subsystems.checksum`); then the FDT folio
(``get_order(nr_folios * 8 + PAGE_SIZE)``) preserved, the ``phys | order`` array
vmalloc'ed and preserved with ``kho_preserve_vmalloc``, every folio preserved, and the FDT
written with libfdt's sequential-write API into a buffer of ``nr_folios * 8 + PAGE_SIZE``
bytes.  ``blob-size`` is the FDT's ``totalsize``.

Reader (:func:`read_kho_test`, ``kho_test_restore``): both modes refuse a root that is not
compatible with ``kho-test-v1``, another magic, missing or wrongly sized ``nr_folios``,
``csum`` or ``folios_info``, more records than the vmalloc array holds, and folios outside
RAM; strict also wants the exact compatible, orders up to MAX_PAGE_ORDER, naturally
aligned folios that do not overlap.  :meth:`KhoTest.checksum` recomputes the checksum the
way the next kernel does.  O(folios) to read, O(folio bytes) to checksum.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from kho.abi.kexec_handover import KHO_VMALLOC_DTYPE
from kho.abi.test_kho import (
    KHO_TEST_COMPAT,
    KHO_TEST_CSUM_PROP,
    KHO_TEST_DATA_NODE,
    KHO_TEST_FDT,
    KHO_TEST_FOLIOS_INFO_PROP,
    KHO_TEST_MAGIC,
    KHO_TEST_MAGIC_PROP,
    KHO_TEST_NR_FOLIOS_PROP,
    KHO_TEST_RECORD_BYTES,
    KHO_TEST_U32_BYTES,
    kho_test_default_max_mem,
    kho_test_fdt_buffer_size,
)
from kho.devicetree.fdt_sw import SequentialFdt
from kho.devicetree.flat import kernel_string_list, parse_fdt, prop_bytes, string_list
from kho.devicetree.layout import COMPATIBLE_PROP, FDT_HEADER
from kho.errors import KHOError, KHOFormatError
from kho.subsystems.checksum import csum_memory
from kho.subsystems.common import Blob, Range, RangeKind, get_order, in_ram, read_checked
from kho.subsystems.vmalloc import (
    VmallocArea,
    read_vmalloc,
    release_vmalloc,
    restore_vmalloc,
    vmalloc,
)

_U32 = struct.Struct("<I")
assert _U32.size == KHO_TEST_U32_BYTES
_RECORDS_DTYPE = np.dtype("<u8")
assert _RECORDS_DTYPE.itemsize == KHO_TEST_RECORD_BYTES


@dataclass(frozen=True)
class KhoTest:
    """The self-test's hand-over: the FDT blob, its ``csum``, the ``folios_info`` vmalloc
    area and the folios ``(phys, order)`` in the order recorded."""

    phys: int
    size: int
    magic: int
    nr_folios: int
    csum: int
    folios_info: VmallocArea
    folios: tuple[tuple[int, int], ...]

    @property
    def blob(self) -> Blob:
        return Blob(KHO_TEST_FDT, self.phys, self.size)

    def checksum(self, memory, arch: str = "x86_64") -> int:
        """``csum_partial`` chained over the folios from 0, as ``kho_test_restore_data``."""
        csum = 0
        for phys, order in self.folios:
            csum = csum_memory(memory, phys, memory.page_size << order, csum, arch)
        return csum

    def referenced_ranges(self, page_size: int) -> list[Range]:
        return ([Range(self.phys, self.size, "kho_test FDT")] + self.folios_info.referenced_ranges(page_size)
                + [Range(p, page_size << o, "kho_test folio", RangeKind.CONTENTS) for p, o in self.folios])

    def to_json(self) -> dict:
        return {"compatible": KHO_TEST_COMPAT, "magic": self.magic, "nr_folios": self.nr_folios, "csum": self.csum,
                "folios_info": self.folios_info.to_json(),
                "folios": [{"phys": p, "order": o} for p, o in self.folios]}


def kho_test_fdt(nr_folios: int, folios_info: bytes, csum: int, page_size: int) -> SequentialFdt:
    """The FDT ``kho_test_prepare_fdt`` writes, in its ``nr_folios * 8 + PAGE_SIZE`` buffer."""
    fdt = SequentialFdt(kho_test_fdt_buffer_size(nr_folios, page_size))
    fdt.finish_reservemap()
    fdt.begin_node("")
    fdt.property(COMPATIBLE_PROP, KHO_TEST_COMPAT.encode() + b"\0")
    fdt.property(KHO_TEST_MAGIC_PROP, _U32.pack(KHO_TEST_MAGIC))
    fdt.begin_node(KHO_TEST_DATA_NODE)
    fdt.property(KHO_TEST_NR_FOLIOS_PROP, _U32.pack(nr_folios))
    fdt.property(KHO_TEST_FOLIOS_INFO_PROP, folios_info)
    fdt.property(KHO_TEST_CSUM_PROP, _U32.pack(csum))
    fdt.end_node()
    fdt.end_node()
    fdt.finish()
    return fdt


def _generate(memory, allocator, max_mem: int, rng: np.random.Generator, arch: str) -> tuple[list[tuple[int, int]], int]:
    """``kho_test_generate_data``: the folios and their chained checksum; all freed on ENOMEM."""
    ps = memory.page_size
    nr_orders = memory.geometry.max_order + 1
    folios: list[tuple[int, int]] = []
    csum, allocated = 0, 0
    try:
        while allocated < max_mem:
            order = int(rng.integers(0, nr_orders))
            if allocated + (ps << order) > max_mem:
                order = get_order(max_mem - allocated, ps)
                order -= 1 if order else 0
            phys = allocator.alloc_pages(order)
            folios.append((phys, order))
            memory.fill_pattern(phys, ps << order, int(rng.integers(1, 2**62)))
            csum = csum_memory(memory, phys, ps << order, csum, arch)
            allocated += ps << order
    except KHOError:
        for phys, order in folios:
            allocator.free_pages(phys, order)
        raise
    return folios, csum


def write_kho_test(memory, allocator, tracker, max_mem: int | None = None, seed: int = 0,
                   arch: str = "x86_64") -> KhoTest:
    """``kho_test_save`` with the module parameter ``max_mem`` (bytes, default two
    MAX_PAGE_ORDER blocks, page-aligned up) and ``csum_partial`` of ``arch``.  Returns what
    it handed over; its :attr:`KhoTest.blob` is the ``kho_test`` sub-node.  EINVAL for a
    non-positive ``max_mem``; an allocation or preservation failure undoes what was
    preserved and frees the folios, the array and the FDT.  O(max_mem) (the data is generated, the checksum reads it once)."""
    ps = memory.page_size
    if max_mem is None:
        max_mem = kho_test_default_max_mem(ps, memory.geometry.max_order)
    if max_mem <= 0:
        raise KHOError("EINVAL", f"max_mem {max_mem} is not positive")
    max_mem = -(-max_mem // ps) * ps
    rng = np.random.default_rng(seed)
    folios, csum = _generate(memory, allocator, max_mem, rng, arch)
    nr = len(folios)
    fdt_order = get_order(kho_test_fdt_buffer_size(nr, ps), ps)
    fdt_phys, preserved, area = None, [], None
    try:
        fdt_phys = allocator.alloc_pages(fdt_order)
        tracker.preserve_folio(fdt_phys, fdt_order)
        preserved.append((fdt_phys, fdt_order))
        records = np.array([p | o for p, o in folios], dtype=_RECORDS_DTYPE)
        area = vmalloc(memory, allocator, tracker, records.tobytes())
        for phys, order in folios:
            tracker.preserve_folio(phys, order)
            preserved.append((phys, order))
    except KHOError:
        for phys, order in preserved:
            tracker.unpreserve_folio(phys, order)
        if area is not None:
            release_vmalloc(allocator, tracker, area)
        for phys, order in folios + ([(fdt_phys, fdt_order)] if fdt_phys is not None else []):
            allocator.free_pages(phys, order)
        raise
    fdt = kho_test_fdt(nr, area.descriptor(), csum, ps)
    memory.write(fdt_phys, bytes(fdt.buffer))
    return KhoTest(fdt_phys, fdt.totalsize, KHO_TEST_MAGIC, nr, csum, area, tuple(folios))


def _u32_prop(node, name: str, strict: bool, at: int) -> int:
    value = prop_bytes(node.get_property(name)) if node is not None else None
    if value is None or len(value) != KHO_TEST_U32_BYTES:
        raise KHOFormatError(f"{KHO_TEST_FDT}.{name}", f"missing or not {KHO_TEST_U32_BYTES} bytes", at)
    return _U32.unpack(value)[0]


def read_kho_test(memory, phys: int, size: int, *, strict: bool = True) -> KhoTest:
    """Decode the ``kho_test`` blob of ``size`` bytes at ``phys`` (see the module docstring)."""
    field = KHO_TEST_FDT
    ps = memory.page_size
    if size < FDT_HEADER.size or (strict and phys % ps):
        raise KHOFormatError(f"{field}.blob-size", f"{size} bytes at {phys:#x} is not a page-aligned FDT", phys)
    tree = parse_fdt(read_checked(memory, phys, size, field), field, strict=strict)
    compat = prop_bytes(tree.root.get_property(COMPATIBLE_PROP))
    ok = compat is not None and ((string_list(compat) == [KHO_TEST_COMPAT]) if strict
                                 else KHO_TEST_COMPAT in kernel_string_list(compat))
    if not ok:
        raise KHOFormatError(f"{field}.compatible", f"the root is not compatible with {KHO_TEST_COMPAT!r}", phys)
    magic = _u32_prop(tree.root, KHO_TEST_MAGIC_PROP, strict, phys)
    if magic != KHO_TEST_MAGIC:
        raise KHOFormatError(f"{field}.magic", f"{magic:#x} is not {KHO_TEST_MAGIC:#x}", phys)
    data = next((n for n in tree.root.nodes if n.name == KHO_TEST_DATA_NODE), None)
    nr_folios = _u32_prop(data, KHO_TEST_NR_FOLIOS_PROP, strict, phys)
    csum = _u32_prop(data, KHO_TEST_CSUM_PROP, strict, phys)
    desc = prop_bytes(data.get_property(KHO_TEST_FOLIOS_INFO_PROP))
    if desc is None or len(desc) != KHO_VMALLOC_DTYPE.itemsize:
        raise KHOFormatError(f"{field}.{KHO_TEST_FOLIOS_INFO_PROP}", f"missing or not {KHO_VMALLOC_DTYPE.itemsize} bytes", phys)
    area = read_vmalloc(memory, desc, strict=strict, field=f"{field}.{KHO_TEST_FOLIOS_INFO_PROP}", location=phys)
    need = nr_folios * KHO_TEST_RECORD_BYTES
    if need > area.total_pages * ps:
        raise KHOFormatError(f"{field}.{KHO_TEST_NR_FOLIOS_PROP}", f"{nr_folios} records do not fit the "
                             f"{area.total_pages}-page folios_info", phys)
    records = np.frombuffer(area.read(memory, need), dtype=_RECORDS_DTYPE).tolist()
    max_order = memory.geometry.max_order if hasattr(memory, "geometry") else None
    shift = ps.bit_length() - 1
    folios = []
    for i, rec in enumerate(records):
        folio, order = rec & ~(ps - 1), rec & (ps - 1)
        where = f"{field}.folios_info[{i}]"
        if order + shift >= 64 or not in_ram(memory, folio, ps << order):
            raise KHOFormatError(where, f"folio {folio:#x} of order {order} is not in RAM", folio)
        if strict and ((max_order is not None and order > max_order) or folio % (ps << order)):
            raise KHOFormatError(where, f"order {order} above MAX_PAGE_ORDER or folio {folio:#x} misaligned", folio)
        folios.append((folio, order))
    if strict:
        ordered = sorted(folios)
        for (a, oa), (b, _) in pairwise(ordered):
            if a + (ps << oa) > b:
                raise KHOFormatError(f"{field}.folios_info", f"folios {a:#x} and {b:#x} overlap", b)
    return KhoTest(phys, size, magic, nr_folios, csum, area, tuple(folios))


def restore_kho_test(kernel, memory, test: KhoTest, arch: str = "x86_64") -> int:
    """``kho_test_restore_data`` after :func:`read_kho_test`: the ``folios_info`` area
    restored (:func:`~kho.subsystems.vmalloc.restore_vmalloc`), every folio restored with
    the next ``kernel``'s ``restore_folio`` and checksummed; returns the checksum.
    KHOError(EINVAL) when a folio comes back with another order or the checksum differs
    from ``csum`` (the kernel's "KHO restore failed"); the kernel's restore errors
    propagate.  O(folio bytes)."""
    restore_vmalloc(kernel, test.folios_info)
    csum = 0
    for phys, order in test.folios:
        got = kernel.restore_folio(phys)
        if got != order:
            raise KHOError("EINVAL", f"kho_test folio {phys:#x} restored with order {got}, recorded {order}")
        csum = csum_memory(memory, phys, memory.page_size << order, csum, arch)
    if csum != test.csum:
        raise KHOError("EINVAL", f"kho_test checksum {csum:#010x}, {test.csum:#010x} handed over")
    return csum
