"""The ``memblock`` sub-node: ``reserve_mem=`` regions (``include/linux/kho/abi/memblock.h``).

Writer (``mm/memblock.c``, ``prepare_kho_fdt``): a page, an FDT written into it with
libfdt's sequential-write API (:class:`~kho.devicetree.fdt_sw.SequentialFdt`, buffer one
page), the page preserved as one page, then every region preserved with
``preserve_pages`` (the kernel's uncapped split, so an aligned region can become a unit
above MAX_PAGE_ORDER when the tracker allows it).  ``blob-size`` is the FDT's
``totalsize``.

Reader (``reserve_mem_kho_revive``): the root must be compatible with ``memblock-v1``; a
region is revived when its node is compatible with ``reserve-mem-v1`` and has 8-byte
``start`` and ``size``.  Lenient skips the nodes the kernel would not revive (it boots on
and allocates those regions afresh); strict refuses them and also wants exactly those
compatibles, valid node names of at most 15 characters, page-aligned non-empty regions
inside RAM that do not overlap, and a blob of at most one page.  O(blob bytes + regions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kho.abi.memblock import (
    MEMBLOCK_KHO_FDT,
    MEMBLOCK_KHO_NODE_COMPATIBLE,
    RESERVE_MEM_KHO_NODE_COMPATIBLE,
    RESERVE_MEM_NAME_SIZE,
    RESERVE_MEM_SIZE_PROP,
    RESERVE_MEM_START_PROP,
    RESERVE_MEM_U64,
)
from kho.devicetree.fdt_sw import SequentialFdt
from kho.devicetree.flat import (
    NODE_NAME,
    kernel_string_list,
    parse_fdt,
    prop_bytes,
    string_list,
)
from kho.devicetree.layout import COMPATIBLE_PROP, FDT_HEADER
from kho.errors import KHOError, KHOFormatError
from kho.subsystems.common import Blob, FieldsJson, Range, RangeKind, in_ram, read_checked


@dataclass(frozen=True)
class ReservedRegion(FieldsJson):
    """A ``reserve_mem`` region: its name, start and size (bytes)."""

    name: str
    start: int
    size: int


@dataclass(frozen=True)
class Memblock:
    """A decoded ``memblock`` sub-node: its blob and the regions the next kernel revives."""

    phys: int
    size: int
    regions: tuple[ReservedRegion, ...]

    def referenced_ranges(self, page_size: int) -> list[Range]:
        """The FDT blob and every non-empty region (contents); ``page_size`` unused (every
        reader takes it)."""
        return ([Range(self.phys, self.size, f"{MEMBLOCK_KHO_FDT} FDT")]
                + [Range(r.start, r.size, f"reserve_mem {r.name}", RangeKind.CONTENTS) for r in self.regions if r.size])

    def to_json(self) -> dict:
        return {"compatible": MEMBLOCK_KHO_NODE_COMPATIBLE, "regions": [r.to_json() for r in self.regions]}


def memblock_fdt(regions: Sequence[ReservedRegion], page_size: int) -> SequentialFdt:
    """The FDT ``prepare_kho_fdt`` writes for ``regions``, in a one-page buffer."""
    fdt = SequentialFdt(page_size)
    fdt.finish_reservemap()
    fdt.begin_node("")
    fdt.property_string(COMPATIBLE_PROP, MEMBLOCK_KHO_NODE_COMPATIBLE)
    for region in regions:
        fdt.begin_node(region.name)
        fdt.property_string(COMPATIBLE_PROP, RESERVE_MEM_KHO_NODE_COMPATIBLE)
        fdt.property(RESERVE_MEM_START_PROP, RESERVE_MEM_U64.pack(region.start))
        fdt.property(RESERVE_MEM_SIZE_PROP, RESERVE_MEM_U64.pack(region.size))
        fdt.end_node()
    fdt.end_node()
    fdt.finish()
    return fdt


def write_memblock(memory, allocator, tracker, regions: Sequence[ReservedRegion | tuple[str, int, int]]) -> Blob:
    """Write and preserve the ``memblock`` sub-node for ``regions`` (already reserved by the
    caller) and preserve the regions.  EINVAL for a bad name (1 to 15 characters a node
    name allows), a duplicate name, or a region that is empty or not page-aligned.  All or
    nothing.  O(regions + page)."""
    regions = [r if isinstance(r, ReservedRegion) else ReservedRegion(*r) for r in regions]
    ps = memory.page_size
    names = set()
    for r in regions:
        if not NODE_NAME.fullmatch(r.name) or len(r.name) >= RESERVE_MEM_NAME_SIZE or r.name in names:
            raise KHOError("EINVAL", f"reserve_mem name {r.name!r} is invalid or repeated")
        if r.size <= 0 or r.start % ps or r.size % ps:
            raise KHOError("EINVAL", f"reserve_mem {r.name} {r.start:#x}+{r.size:#x} is empty or not page-aligned")
        names.add(r.name)
    fdt = memblock_fdt(regions, ps)
    phys = allocator.alloc_pages(0)
    done: list[ReservedRegion] = []
    try:
        memory.write(phys, bytes(fdt.buffer))
        tracker.preserve_pages(phys, 1)
        try:
            for r in regions:
                tracker.preserve_pages(r.start, r.size // ps)
                done.append(r)
        except KHOError:
            for r in done:
                tracker.unpreserve_pages(r.start, r.size // ps)
            tracker.unpreserve_pages(phys, 1)
            raise
    except KHOError:
        allocator.free_pages(phys, 0)
        raise
    return Blob(MEMBLOCK_KHO_FDT, phys, fdt.totalsize)


def _u64_prop(node, name: str, field: str, at: int, strict: bool) -> int | None:
    value = prop_bytes(node.get_property(name))
    if value is None or len(value) != RESERVE_MEM_U64.size:
        if strict:
            raise KHOFormatError(field, f"missing or not {RESERVE_MEM_U64.size} bytes", at)
        return None
    return RESERVE_MEM_U64.unpack(value)[0]


def _compatible(node, wanted: str, field: str, at: int, strict: bool) -> bool:
    value = prop_bytes(node.get_property(COMPATIBLE_PROP))
    if strict:
        if value is None or string_list(value) != [wanted]:
            raise KHOFormatError(field, f"is not {wanted!r}", at)
        return True
    return value is not None and wanted in kernel_string_list(value)


def read_memblock(memory, phys: int, size: int, *, strict: bool = True) -> Memblock:
    """Decode the ``memblock`` blob of ``size`` bytes at ``phys`` (see the module docstring)."""
    field = MEMBLOCK_KHO_FDT
    ps = memory.page_size
    if size < FDT_HEADER.size or (strict and (size > ps or phys % ps)):
        raise KHOFormatError(f"{field}.blob-size", f"{size} bytes at {phys:#x}: not one page-aligned FDT of at most a page", phys)
    tree = parse_fdt(read_checked(memory, phys, size, field), field, strict=strict)
    if not _compatible(tree.root, MEMBLOCK_KHO_NODE_COMPATIBLE, f"{field}.compatible", phys, strict):
        raise KHOFormatError(f"{field}.compatible", f"the root is not compatible with {MEMBLOCK_KHO_NODE_COMPATIBLE!r}", phys)
    regions: list[ReservedRegion] = []
    for node in tree.root.nodes:
        where = f"{field}/{node.name}"
        if strict and len(node.name) >= RESERVE_MEM_NAME_SIZE:
            raise KHOFormatError(f"{where}.name", f"longer than {RESERVE_MEM_NAME_SIZE - 1} characters", phys)
        if not _compatible(node, RESERVE_MEM_KHO_NODE_COMPATIBLE, f"{where}.compatible", phys, strict):
            continue
        start = _u64_prop(node, RESERVE_MEM_START_PROP, f"{where}.start", phys, strict)
        length = _u64_prop(node, RESERVE_MEM_SIZE_PROP, f"{where}.size", phys, strict)
        if start is None or length is None:
            continue
        if strict:
            if not length or start % ps or length % ps or not in_ram(memory, start, length):
                raise KHOFormatError(f"{where}.start", f"{start:#x}+{length:#x} is empty, misaligned or outside RAM", phys)
            for other in regions:
                if start < other.start + other.size and other.start < start + length:
                    raise KHOFormatError(f"{where}.start", f"overlaps region {other.name}", phys)
        regions.append(ReservedRegion(node.name, start, length))
    return Memblock(phys, size, tuple(regions))
