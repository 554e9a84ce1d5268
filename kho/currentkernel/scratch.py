"""KHO scratch areas: the ``kho_scratch=`` parameter and where the kernel places them.

Scratch areas are contiguous regions that never hold a preserved page: the kexec
segments are loaded there and the next kernel's early allocations come only from there.
The kernel reserves, top-down with memblock, one *lowmem* area below
``ARCH_LOW_ADDRESS_LIMIT``, one *global* area anywhere and one area per NUMA node, each
rounded up to ``CMA_MIN_ALIGNMENT_BYTES`` (a pageblock: 2 MiB with 4 KiB pages).

Sizes come from ``kho_scratch=``: either ``N%`` of the memory the kernel itself has
reserved in memblock (default 200%), or three explicit sizes ``lowmem,global,pernode``
with memparse suffixes.  The model's "kernel reserved" memory is the kernel image at
the start of the first bank plus the memory map (``struct page`` arrays, 64 bytes per
page) at the top of each node, which is what dominates ``memblock_reserved_kern_size``
on a real machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from kho.errors import KHOError
from kho.memory.physical import PhysicalMemory, ScratchArea
from kho.sizes import memparse

#: The default scale when ``kho_scratch=`` is not given (percent).
DEFAULT_SCRATCH_SCALE = 200
#: Size of ``struct page`` on a 64-bit kernel (bytes); the memory map costs this per page.
STRUCT_PAGE_BYTES = 64
#: Default size of the running kernel's own image and early allocations (bytes).
DEFAULT_KERNEL_IMAGE = 32 << 20
#: ``ARCH_LOW_ADDRESS_LIMIT + 1`` for arm64 with RAM starting low (ZONE_DMA32 limit).
LOWMEM_LIMIT = 4 << 30
#: pageblock_order for each page size (min(MAX_PAGE_ORDER, PMD order)).
PAGEBLOCK_ORDER_BY_PAGE_SIZE = {4096: 9, 16384: 11, 65536: 13}


@dataclass(frozen=True)
class ScratchSpec:
    """A parsed ``kho_scratch=`` value: ``scale`` percent, or three explicit sizes (bytes)."""

    scale: int = DEFAULT_SCRATCH_SCALE
    lowmem: int = 0
    global_: int = 0
    pernode: int = 0

    @classmethod
    def parse(cls, text: str) -> "ScratchSpec":
        """Parse with the kernel's rules (kho_parse_scratch_size); KHOError(EINVAL) on error.

        ``N%``: N a decimal unsigned 32-bit integer, at most 10 characters before ``%``.
        ``L,G,P``: three memparse sizes separated by commas, whole string consumed,
        not all zero.
        """
        if not text:
            raise KHOError("EINVAL", "kho_scratch= is empty")
        if text.endswith("%"):
            digits = text[:-1]
            if len(text) > 11:
                raise KHOError("EINVAL", f"kho_scratch={text}: scale too long")
            body = digits[1:] if digits.startswith("+") else digits
            if not body.isdigit() or not body.isascii() or int(body) > 0xFFFFFFFF:
                raise KHOError("EINVAL", f"kho_scratch={text}: scale must be a decimal unsigned int")
            return cls(scale=int(body))
        sizes, rest = [], text
        for i in range(3):
            if i:
                if not rest.startswith(","):
                    raise KHOError("EINVAL", f"kho_scratch={text}: expected lowmem,global,pernode")
                rest = rest[1:]
            value, used = memparse(rest)
            if not used:
                raise KHOError("EINVAL", f"kho_scratch={text}: size {i + 1} is not a number")
            sizes.append(value)
            rest = rest[used:]
        if rest:
            raise KHOError("EINVAL", f"kho_scratch={text}: trailing characters {rest!r}")
        if not sum(sizes):
            raise KHOError("EINVAL", f"kho_scratch={text}: all sizes are zero")
        return cls(scale=0, lowmem=sizes[0], global_=sizes[1], pernode=sizes[2])


@dataclass(frozen=True)
class KernelRegion:
    """Memory the running kernel reserved for itself: ``[phys, phys+size)`` bytes on ``node``."""

    phys: int
    size: int
    node: int
    label: str


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def kernel_regions(memory: PhysicalMemory, image_size: int = DEFAULT_KERNEL_IMAGE) -> list[KernelRegion]:
    """The running kernel's reserved regions: its image at the start of the first bank and
    each node's memory map (``STRUCT_PAGE_BYTES`` per page, page-rounded) at the top of the
    node's highest bank."""
    ps = memory.page_size
    first = memory.banks[0]
    image = _round_up(image_size, ps)
    if image >= first.size:
        raise KHOError("ENOMEM", f"kernel image of {image_size} bytes does not fit in the first bank")
    regions = [KernelRegion(first.start, image, first.node, "kernel image")]
    for node in sorted({b.node for b in memory.banks}):
        banks = [b for b in memory.banks if b.node == node]
        pages = sum(b.size for b in banks) // ps
        memmap = _round_up(pages * STRUCT_PAGE_BYTES, ps)
        top = banks[-1]
        start = top.end - memmap
        if start < top.start or (top is first and start < first.start + image):
            raise KHOError("ENOMEM", f"memory map of node {node} does not fit in its top bank")
        regions.append(KernelRegion(start, memmap, node, f"memmap node{node}"))
    return regions


def _free_ranges(memory: PhysicalMemory, taken: list[tuple[int, int]], lo: int, hi: int, node: int | None):
    """Free ``(start, end)`` byte ranges of RAM within ``[lo, hi)`` not in ``taken``, highest first."""
    out = []
    for bank in memory.banks:
        if node is not None and bank.node != node:
            continue
        start, end = max(bank.start, lo), min(bank.end, hi)
        cuts = sorted((s, e) for s, e in taken if s < end and e > start)
        pos = start
        for s, e in cuts:
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
        if pos < end:
            out.append((pos, end))
    return sorted(out, reverse=True)


def _alloc_top_down(memory, taken, size, align, lo, hi, node, kind) -> ScratchArea:
    for start, end in _free_ranges(memory, taken, lo, hi, node):
        addr = (end - size) // align * align
        if addr >= start:
            taken.append((addr, addr + size))
            return ScratchArea(addr, size, kind)
    where = "" if node is None else f" on node {node}"
    raise KHOError("ENOMEM", f"no room for the {kind} scratch area of {size} bytes{where}")


def place_scratch(memory: PhysicalMemory, spec: ScratchSpec, regions: list[KernelRegion]) -> list[ScratchArea]:
    """Size and place the scratch areas as kho_reserve_scratch does, record them in
    ``memory`` and return them (lowmem, global, then one per node).

    Scaled sizes (and explicit per-node sizes) are rounded up to CMA_MIN_ALIGNMENT_BYTES;
    explicit lowmem and global sizes only to a page, as the kernel uses them as given.  Each
    area is allocated top-down aligned to CMA_MIN_ALIGNMENT_BYTES, avoiding the kernel's regions and the areas already placed.
    """
    align = memory.page_size << PAGEBLOCK_ORDER_BY_PAGE_SIZE[memory.page_size]
    low_hi = LOWMEM_LIMIT if memory.banks[0].start < LOWMEM_LIMIT else memory.banks[0].end
    nodes = sorted({b.node for b in memory.banks})
    if spec.scale:
        low_reserved = sum(max(0, min(r.phys + r.size, low_hi) - r.phys) for r in regions)
        total_reserved = sum(r.size for r in regions)
        lowmem = _round_up(low_reserved * spec.scale // 100, align)
        global_ = _round_up(max(0, total_reserved * spec.scale // 100 - lowmem), align)
        pernode = {n: _round_up(sum(r.size for r in regions if r.node == n) * spec.scale // 100, align) for n in nodes}
    else:
        # As the kernel does: explicit lowmem and global sizes are used as given (the
        # allocation is still aligned); only the per-node size is rounded up.
        lowmem = _round_up(spec.lowmem, memory.page_size)
        global_ = _round_up(spec.global_, memory.page_size)
        pernode = {n: _round_up(spec.pernode, align) for n in nodes}
    taken = [(r.phys, r.phys + r.size) for r in regions]
    areas = []
    if lowmem:
        areas.append(_alloc_top_down(memory, taken, lowmem, align, 0, low_hi, None, "lowmem"))
    if global_:
        areas.append(_alloc_top_down(memory, taken, global_, align, 0, 1 << 64, None, "global"))
    for n in nodes:
        if pernode[n]:
            areas.append(_alloc_top_down(memory, taken, pernode[n], align, 0, 1 << 64, n, f"node{n}"))
    memory.set_scratch(areas)
    return areas
