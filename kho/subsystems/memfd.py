"""A preserved memfd (``mm/memfd_luo.c``, ``include/linux/kho/abi/memfd.h``): the ``data``
of a LUO file whose compatible is ``memfd-v2`` (Linux 7.3) or ``memfd-v1``.

Writer (``memfd_luo_preserve``): a zeroed preserved page for ``struct memfd_luo_ser``;
every page of the file gets a folio (holes too, as ``memfd_pin_folios`` fills them), each
preserved with ``preserve_folio`` and recorded as ``pfn | (DIRTY | UPTODATE) << 52`` and
its page index, in a ``vcalloc``'ed array preserved with ``kho_preserve_vmalloc``; ``seals``
must be among ``MEMFD_LUO_ALL_SEALS``, ``flags`` is 0.  An empty file has no folios and a
zero ``kho_vmalloc``.

Reader (``memfd_luo_retrieve``): both modes refuse unknown seals (the kernel's EOPNOTSUPP),
more records than the vmalloc area holds (the kernel would read past it), a folio outside
RAM, and what :func:`~kho.subsystems.vmalloc.read_vmalloc` refuses; records with pfn 0 are
skipped as the kernel skips them.  Strict also wants ``flags`` 0, ``nr_folios`` 0 exactly
when ``size`` is 0 (and then a zero descriptor), no pfn-0 record, record flags among
DIRTY|UPTODATE, page indices inside the file and no index or folio twice.
O(folios + vmalloc chunks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kho.abi.kexec_handover import KHO_VMALLOC_DTYPE
from kho.abi.memfd import (
    MEMFD_LUO_ALL_SEALS,
    MEMFD_LUO_FH_COMPATIBLE,
    MEMFD_LUO_FOLIO_DIRTY,
    MEMFD_LUO_FOLIO_SER_DTYPE,
    MEMFD_LUO_FOLIO_UPTODATE,
    MEMFD_LUO_PFN_BITS,
    MEMFD_LUO_SER_DTYPES,
)
from kho.errors import KHOError, KHOFormatError
from kho.subsystems.common import FieldsJson, Range, RangeKind, alloc_preserve, check_pointer, in_ram
from kho.subsystems.vmalloc import (
    VmallocArea,
    read_vmalloc,
    release_vmalloc,
    restore_vmalloc,
    vmalloc,
)

_PFN_MASK = (1 << MEMFD_LUO_PFN_BITS) - 1
_KNOWN_FOLIO_FLAGS = MEMFD_LUO_FOLIO_DIRTY | MEMFD_LUO_FOLIO_UPTODATE
#: ``memfd_pin_folios`` takes an ``unsigned int`` count: the most pages a preserved memfd has.
MEMFD_MAX_PAGES = 0xFFFFFFFF


@dataclass(frozen=True)
class MemfdFolio(FieldsJson):
    """One ``struct memfd_luo_folio_ser``: the folio's phys, its page index in the file, its flags."""

    phys: int
    index: int
    flags: int


@dataclass(frozen=True)
class Memfd:
    """A decoded ``struct memfd_luo_ser`` at ``phys`` (``pos`` and ``size`` in bytes)."""

    compatible: str
    phys: int
    pos: int
    size: int
    seals: int
    flags: int
    nr_folios: int
    folios: tuple[MemfdFolio, ...]
    vmalloc: VmallocArea | None

    def referenced_ranges(self, page_size: int) -> list[Range]:
        """The struct, the vmalloc area and each folio's head page (the map knows its order)."""
        out = [Range(self.phys, MEMFD_LUO_SER_DTYPES[self.compatible].itemsize, f"{self.compatible} memfd_luo_ser")]
        if self.vmalloc is not None:
            out += self.vmalloc.referenced_ranges(page_size)
        return out + [Range(f.phys, page_size, "memfd folio", RangeKind.CONTENTS) for f in self.folios]

    def contents(self, memory, order_of: Callable[[int], int] = lambda phys: 0) -> bytes:
        """The file's ``size`` bytes rebuilt from its folios (``order_of(phys)`` gives a
        folio's order, 0 by default); holes read as zeros.  KHOFormatError when the folios
        cannot cover ``size``, so the result is bounded by the folios' real bytes.  O(size)."""
        ps = memory.page_size
        covered = sum(ps << order_of(f.phys) for f in self.folios)
        if self.size > covered:
            raise KHOFormatError("memfd.size", f"{self.size} bytes but the folios hold {covered}", self.phys)
        out = bytearray(self.size)
        for folio in self.folios:
            start = folio.index * ps
            if start < self.size:
                n = min(ps << order_of(folio.phys), self.size - start)
                out[start:start + n] = memory.read(folio.phys, n)
        return bytes(out)

    def to_json(self) -> dict:
        return {"compatible": self.compatible, "pos": self.pos, "size": self.size, "seals": self.seals,
                "flags": self.flags, "nr_folios": self.nr_folios, "folios": [f.to_json() for f in self.folios]}


def _pack_ser(dtype: np.dtype, pos: int, size: int, seals: int, nr_folios: int, area: VmallocArea | None) -> bytes:
    ser = np.zeros(1, dtype=dtype)
    ser["pos"], ser["size"], ser["nr_folios"] = pos, size, nr_folios
    if "seals" in dtype.names:
        ser["seals"] = seals
    if area is not None:
        ser["folios"] = np.frombuffer(area.descriptor(), dtype=KHO_VMALLOC_DTYPE)[0]
    return ser.tobytes()


def preserve_memfd(memory, allocator, tracker, contents: bytes = b"", *, size: int | None = None, pos: int = 0,
                   seals: int = 0, compatible: str = MEMFD_LUO_FH_COMPATIBLE) -> int:
    """``memfd_luo_preserve`` of a memfd of ``size`` bytes (default ``len(contents)``)
    holding ``contents`` (the rest zeros): one order-0 folio a page.  Returns the phys
    of the ``struct memfd_luo_ser`` (the LUO file's ``data``).  EINVAL for unknown seals
    (the kernel's EOPNOTSUPP), seals in memfd-v1 or an unknown compatible; E2BIG above
    :data:`MEMFD_MAX_PAGES` pages (the kernel's EFBIG).  Everything allocated is freed and
    unpreserved on failure.  O(size)."""
    dtype = MEMFD_LUO_SER_DTYPES.get(compatible)
    size = len(contents) if size is None else size
    if dtype is None or size < len(contents) or pos < 0:
        raise KHOError("EINVAL", f"cannot preserve a {compatible!r} memfd of {size} bytes at position {pos}")
    if seals & ~MEMFD_LUO_ALL_SEALS or (seals and "seals" not in dtype.names):
        raise KHOError("EINVAL", f"seals {seals:#x} cannot be preserved as {compatible}")
    ps = memory.page_size
    nr_pages = -(-size // ps)
    if nr_pages > MEMFD_MAX_PAGES:
        raise KHOError("E2BIG", f"a memfd of {nr_pages} pages is too large to preserve")
    ser_phys = alloc_preserve(memory, allocator, tracker, dtype.itemsize)
    folios: list[int] = []
    preserved: list[int] = []
    records = np.zeros(nr_pages, dtype=MEMFD_LUO_FOLIO_SER_DTYPE)
    area = None
    try:
        for index in range(nr_pages):
            folios.append(allocator.alloc_pages(0))
            memory.write(folios[-1], contents[index * ps:(index + 1) * ps].ljust(ps, b"\0"))
        for index, phys in enumerate(folios):
            tracker.preserve_folio(phys, 0)
            preserved.append(phys)
            records[index] = ((phys // ps) | (_KNOWN_FOLIO_FLAGS << MEMFD_LUO_PFN_BITS), index)
        if nr_pages:
            area = vmalloc(memory, allocator, tracker, records.tobytes())
        memory.write(ser_phys, _pack_ser(dtype, pos, size, seals, nr_pages, area))
    except KHOError:
        if area is not None:
            release_vmalloc(allocator, tracker, area)
        for phys in preserved:
            tracker.unpreserve_folio(phys, 0)
        for phys in folios:
            allocator.free_pages(phys, 0)
        tracker.unpreserve_folio(ser_phys, 0)
        allocator.free_pages(ser_phys, 0)
        raise
    return ser_phys


def read_memfd(memory, phys: int, compatible: str = MEMFD_LUO_FH_COMPATIBLE, *, strict: bool = True) -> Memfd:
    """Decode the ``struct memfd_luo_ser`` of ``compatible`` at ``phys`` and its folio array."""
    dtype = MEMFD_LUO_SER_DTYPES.get(compatible)
    field = "memfd"
    if dtype is None:
        raise KHOFormatError(f"{field}.compatible", f"{compatible!r} is not a memfd compatible", phys)
    ps = memory.page_size
    check_pointer(memory, phys, dtype.itemsize, field, ps if strict else 8)
    ser = np.frombuffer(memory.read(phys, dtype.itemsize), dtype=dtype)[0]
    seals = int(ser["seals"]) if "seals" in dtype.names else 0
    flags = int(ser["flags"]) if "flags" in dtype.names else 0
    size, nr_folios = int(ser["size"]), int(ser["nr_folios"])
    desc_offset = dtype.fields["folios"][1]
    if seals & ~MEMFD_LUO_ALL_SEALS:
        raise KHOFormatError(f"{field}.seals", f"unknown seals {seals:#x}", phys + dtype.fields["seals"][1])
    if strict:
        if flags:
            raise KHOFormatError(f"{field}.flags", f"unused flags {flags:#x} are not 0", phys + dtype.fields["flags"][1])
        if (size == 0) != (nr_folios == 0) or (not nr_folios and ser["folios"].tobytes() != bytes(KHO_VMALLOC_DTYPE.itemsize)):
            raise KHOFormatError(f"{field}.nr_folios", f"{nr_folios} folios for {size} bytes", phys + dtype.fields["nr_folios"][1])
    if not nr_folios:
        return Memfd(compatible, phys, int(ser["pos"]), size, seals, flags, 0, (), None)
    area = read_vmalloc(memory, ser["folios"].tobytes(), strict=strict, field=f"{field}.folios", location=phys + desc_offset)
    need = nr_folios * MEMFD_LUO_FOLIO_SER_DTYPE.itemsize
    if need > area.total_pages * ps:
        raise KHOFormatError(f"{field}.nr_folios", f"{nr_folios} records do not fit the {area.total_pages}-page array",
                             phys + dtype.fields["nr_folios"][1])
    records = np.frombuffer(area.read(memory, need), dtype=MEMFD_LUO_FOLIO_SER_DTYPE)
    file_pages = -(-size // ps)
    folios: list[MemfdFolio] = []
    seen_index, seen_phys = set(), set()
    for i, (pfn_flags, index) in enumerate(zip(records["pfn_flags"].tolist(), records["index"].tolist())):
        pfn, folio_flags = pfn_flags & _PFN_MASK, pfn_flags >> MEMFD_LUO_PFN_BITS
        where = f"{field}.folios[{i}]"
        if not pfn:
            if strict:
                raise KHOFormatError(where, "pfn 0", phys + desc_offset)
            continue
        folio = pfn * ps
        if not in_ram(memory, folio, ps):
            raise KHOFormatError(where, f"folio {folio:#x} is not in RAM", folio)
        if strict and (folio_flags & ~_KNOWN_FOLIO_FLAGS or index >= file_pages or index in seen_index or folio in seen_phys):
            raise KHOFormatError(where, f"flags {folio_flags:#x}, index {index} of a {file_pages}-page file, or repeated", folio)
        seen_index.add(index)
        seen_phys.add(folio)
        folios.append(MemfdFolio(folio, index, folio_flags))
    return Memfd(compatible, phys, int(ser["pos"]), size, seals, flags, nr_folios, tuple(folios), area)


def restore_memfd(kernel, memory, memfd: Memfd) -> bytes:
    """``memfd_luo_retrieve`` after :func:`read_memfd`, through the next ``kernel``
    (``restore_folio``, ``restore_pages``): the folio array restored, every folio restored
    (its order as the kernel reports it), the struct's page restored last
    (``kho_restore_free``); returns the file's ``size`` bytes (:meth:`Memfd.contents`).
    The kernel's restore errors propagate.  O(size + folios)."""
    if memfd.vmalloc is not None:
        restore_vmalloc(kernel, memfd.vmalloc)
    orders = {folio.phys: kernel.restore_folio(folio.phys) for folio in memfd.folios}
    contents = memfd.contents(memory, orders.__getitem__)
    kernel.restore_folio(memfd.phys)
    return contents
