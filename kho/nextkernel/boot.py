"""Booting the next kernel on the memory a KHO kexec left behind.

The sequence, as Linux does it (``kho_populate``, ``kho_memory_init``,
``memblock_free_all``), each stage timed:

1. ``handover``: read ``/chosen`` (``linux,kho-fdt``, ``linux,kho-scratch``) from the
   boot DTB; check the KHO FDT in the kernel's order — header, compatible, 8 non-zero
   bytes of ``preserved-memory-map`` — and read the scratch-area array.  Any failure:
   ``disabling KHO revival: <reason>``, and the kernel boots on without preserved memory.
2. ``memblock``: add the scratch areas and mark them KHO_SCRATCH, reserve the scratch
   array, switch memblock to scratch-only, add the RAM banks; reserve the kernel image
   (where kexec loaded it, inside scratch) and allocate the memory map
   (``struct page`` arrays, 64 bytes a page, per node) top-down — from scratch only.
3. ``deserialize``: the preserved units, by the chosen ``path``:
   ``memblock`` — decode the map (the encoding named by the FDT's compatible) and make
   one ``memblock_reserve`` + ``memblock_reserved_mark_noinit`` per unit;
   ``instructions`` — walk the instruction stream, which lists the free runs directly:
   no memblock range at all.  Each preserved head page gets ``private`` = order + magic.
   A malformed map disables revival (nothing is reserved: the decoders check it all first).
4. ``free_lists``: free memory to the buddy allocator with the kernel's greedy split —
   ``memblock`` path: memory minus reserved regions; ``instructions`` path: the stream's
   free runs plus the scratch areas minus the few memblock reservations.  Both give the
   same free lists.

Model choices: a kernel reading the instruction path checks for the instruction stream's
compatible; one on the memblock path accepts any registered encoding's.  When the map
itself is rejected the scratch setup stays, as in the kernel (only ``kho_in`` is
cleared).  Without a handover the machine's scratch areas are still kept as CMA (the
kernel would reserve fresh ones).  Buddies never merge across a bank or scratch-area
boundary (:mod:`kho.nextkernel.freelist`).

Units: ``phys`` and sizes in bytes, pfns for free ranges, seconds for timings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from kho.currentkernel.scratch import DEFAULT_KERNEL_IMAGE, STRUCT_PAGE_BYTES
from kho.devicetree import KHOFdt, parse_chosen
from kho.encodings import encoding_for_compatible, get_encoding, known_compatibles
from kho.encodings.instructions import walk
from kho.errors import KHOError, KHOFormatError
from kho.files import check_host_memory
from kho.handover.scratch_array import read_scratch_array, usable_areas
from kho.handover.x86_boot_params import read_handoff
from kho.memory import intervals
from kho.memory.physical import PhysicalMemory
from kho.nextkernel.buddy import BuddyAllocator
from kho.nextkernel.freelist import NORMAL, SCRATCH, Segments, build_free_areas
from kho.nextkernel.memblock import Memblock, MemblockFlag
from kho.nextkernel.memmap import ALLOCATED, PRESERVED, RESERVED, MemMap
from kho.nextkernel.restore import IncomingKHO

PATHS = ("memblock", "instructions")
#: The registry name of the encoding the instruction path reads.
INSTRUCTIONS_ENCODING = "instructions"
#: Alignment of the kernel image (arm64 loads it on a 2 MiB boundary).
KERNEL_IMAGE_ALIGN = 2 << 20
#: Host bytes the model of the next kernel holds per page of RAM (memory map, free-page
#: masks, free lists); a RAM size the host cannot hold this for is refused with ENOMEM.
HOST_BYTES_PER_PAGE = 10


@dataclass
class NextKernel:
    """A booted next kernel: its memblock, memory map, buddy allocator and KHO input.

    ``messages`` holds what the kernel would log (e.g. ``disabling KHO revival: ...``);
    ``timings`` the wall-clock seconds of each stage, ``cpu_timings`` the process CPU
    seconds (steadier on a busy host); ``image`` the kernel image's ``(phys, size)``.
    """

    memory: PhysicalMemory
    path: str
    memblock: Memblock
    memmap: MemMap
    allocator: BuddyAllocator
    kho: IncomingKHO
    image: tuple[int, int]
    messages: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    cpu_timings: dict[str, float] = field(default_factory=dict)

    @property
    def revived(self) -> bool:
        return self.kho.revived

    def retrieve_subtree(self, name: str) -> int:
        return self.kho.retrieve_subtree(name)

    def restore_folio(self, phys: int) -> int:
        return self.kho.restore_folio(phys)

    def restore_pages(self, phys: int, nr_pages: int) -> None:
        self.kho.restore_pages(phys, nr_pages)

    def leaked(self) -> tuple[np.ndarray, np.ndarray]:
        return self.kho.leaked()

    def report(self) -> dict:
        """Counts for people and JSON: pages by state, free blocks per order and class,
        preserved / leaked units, memblock figures, timings."""
        mm, alloc = self.memmap, self.allocator
        leaked_phys, leaked_order = self.leaked()
        return {
            "path": self.path,
            "revived": self.revived,
            "messages": list(self.messages),
            "page_size": self.memory.page_size,
            "ram_pages": mm.nr_pages,
            "free_pages": alloc.nr_free_pages,
            "free_scratch_pages": alloc.nr_free_scratch_pages,
            "free_blocks": {kind: alloc.areas[kind].counts() for kind in (NORMAL, SCRATCH)},
            "reserved_pages": mm.count(RESERVED),
            "allocated_pages": mm.count(ALLOCATED),
            "preserved_units": int(self.kho.unit_phys.size),
            "preserved_pages": self.kho.nr_preserved_pages(),
            "leaked_units": int(leaked_phys.size),
            "leaked_pages": int(np.sum(np.left_shift(np.int64(1), leaked_order.astype(np.int64)))),
            "memblock_reserve_calls": self.memblock.reserve_calls,
            "memblock_reserved_regions": len(self.memblock.reserved),
            "memblock_reserved_bytes": self.memblock.reserved.total_size,
            "memblock_reserved_array_bytes": self.memblock.reserved.array_bytes,
            "kernel_image": {"phys": self.image[0], "size": self.image[1]},
            "timings_s": dict(self.timings),
            "cpu_s": dict(self.cpu_timings),
        }


class _Stages:
    """Stage timer: wall-clock and process CPU seconds of each stage."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._last = time.perf_counter(), time.process_time()

    def done(self, name: str) -> None:
        now = time.perf_counter(), time.process_time()
        self.timings[name] = now[0] - self._last[0]
        self.cpu[name] = now[1] - self._last[1]
        self._last = now


def _chosen(boot_dtb: bytes):
    """``/chosen``'s KHO pointers, or None when it has no valid ``linux,kho-*`` properties
    (the kernel then boots without KHO and says nothing).  A DTB the kernel could not parse
    at all raises KHOFormatError."""
    try:
        return parse_chosen(boot_dtb)
    except KHOFormatError as err:
        if err.field.startswith("chosen."):
            return None
        raise


def _read_handover(memory: PhysicalMemory, chosen, path: str, strict: bool):
    """Stage 1: the checked KHO FDT and the scratch areas, or KHOError with the reason to
    disable revival.  The FDT read is bounded: at most a MAX_PAGE_ORDER block (the largest
    KHO FDT kho writes; the kernel's is one page), whatever size ``/chosen`` claims."""
    limit = memory.page_size << memory.geometry.max_order
    if chosen.fdt_size > limit:
        raise KHOError("EINVAL", f"KHO FDT of {chosen.fdt_size:#x} bytes is larger than {limit:#x}")
    try:
        blob = memory.read(chosen.fdt_phys, chosen.fdt_size)
    except KHOError:
        raise KHOError("EINVAL", f"failed to memremap FDT ({chosen.fdt_phys:#x}+{chosen.fdt_size:#x})") from None
    expected = get_encoding(INSTRUCTIONS_ENCODING, memory.page_size).compatible if path == "instructions" else None
    fdt = KHOFdt.from_dtb(blob, expected, page_size=memory.page_size, strict=strict, readable=known_compatibles())
    areas = read_scratch_array(memory, chosen.scratch_phys, chosen.scratch_size, strict=strict)
    return fdt, areas


def _disable(messages: list[str], reason: str) -> None:
    messages.append(f"disabling KHO revival: {reason}")


def _receive(memory: PhysicalMemory, boot_dtb: bytes | None, boot_params: int | None, path: str, strict: bool,
             messages: list[str]):
    """Stage 1, handover: ``(chosen, fdt, areas)``, or None when there is no usable handover
    (the reason logged in ``messages``).  arm64 reads ``/chosen`` of ``boot_dtb``; x86_64 the
    ``setup_data`` chain of the ``boot_params`` at phys ``boot_params``."""
    if boot_params is not None:
        try:
            chosen = read_handoff(memory, boot_params)
        except KHOFormatError as err:
            _disable(messages, str(err))
            return None
        where = "setup_data"
    else:
        chosen, where = _chosen(boot_dtb), "/chosen"
    if chosen is None:
        messages.append(f"no KHO handover in {where}")
        return None
    try:
        fdt, areas = _read_handover(memory, chosen, path, strict)
    except KHOError as err:
        _disable(messages, err.message)
        return None
    areas, notes = usable_areas(areas, memory.page_size)  # strict areas pass unchanged
    messages.extend(notes)
    if not areas:
        _disable(messages, "no scratch area has a whole page")
        return None
    return chosen, fdt, areas


def _early_memblock(memory: PhysicalMemory, handover, kernel_image: int, image_phys: int | None
                    ) -> tuple[Memblock, int, int]:
    """Stage 2, memblock and early allocations: the scratch areas received (the only memory
    memblock may allocate from while KHO is revived), the RAM banks, the kernel image and
    the memory map.  Returns ``(memblock, image phys, image bytes)``."""
    ps, shift = memory.page_size, memory.page_shift
    mb = Memblock(ps)
    if handover:
        chosen, _, areas = handover
        for area in areas:
            mb.add_node(area.addr, area.size, memory.bank_of(area.addr).node)
            mb.mark_kho_scratch(area.addr, area.size)
        mb.reserve(chosen.scratch_phys, chosen.scratch_size)
        mb.set_kho_scratch_only()
        if set(areas) != set(memory.scratch):
            memory.set_scratch(areas)  # the next kernel's kho_scratch is what it received
    for bank in memory.banks:
        mb.add_node(bank.start, bank.size, bank.node)
    image_size = -(-kernel_image // ps) * ps
    if image_phys is None:
        image_phys = mb.phys_alloc(image_size, KERNEL_IMAGE_ALIGN)
    else:
        memory.check_range(image_phys, image_size, "kernel image")
        mb.reserve(image_phys, image_size)
    for node in sorted({b.node for b in memory.banks}):
        pages = sum(b.size for b in memory.banks if b.node == node) >> shift
        mb.phys_alloc(-(-pages * STRUCT_PAGE_BYTES // ps) * ps, ps, nid=node)
    if memory.banks[0].start == 0:
        # Phys 0 is NULL in every KHO structure (chunk and vmalloc lists, radix tables), so the
        # page there is never handed out, as x86 reserves its first page (arm64 RAM seldom
        # starts at 0).  A preserved unit there still reaches its owner: restore is unaffected.
        mb.reserve(0, ps)
    return mb, image_phys, image_size


def _deserialize(memory: PhysicalMemory, mb: Memblock, memmap: MemMap, fdt: KHOFdt, path: str,
                 encoding_options: dict | None, strict: bool, messages: list[str]):
    """Stage 3, deserialize: decode the map (memblock path) or walk the stream (instructions
    path), reserve and mark the preserved units.  Returns ``(unit_phys, unit_order, walked,
    fdt)``: ``walked`` True when the stream was walked (False on the memblock path or after
    an error), ``fdt`` None when the map was refused (the reason logged in ``messages``)."""
    ps = memory.page_size
    unit_phys, unit_order = np.empty(0, np.uint64), np.empty(0, np.uint8)
    walked = False
    try:  # decoders and the walker check the units: sorted, disjoint, in RAM, outside scratch
        if path == "memblock":
            decoded = encoding_for_compatible(fdt.compatible)(ps, **(encoding_options or {})).decode(memory, fdt.props, strict=strict)
            unit_phys, unit_order = decoded.phys, decoded.order
        else:
            stream = walk(memory, fdt.props, strict=strict)
            unit_phys, unit_order, unit_pfn = stream.unit_phys, stream.unit_order, stream.unit_pfn
            walked = True
    except KHOError as err:
        _disable(messages, f"preserved memory map: {err.message}")
        fdt = None
    if path == "memblock" and unit_phys.size:
        mb.reserve_noinit_many(unit_phys, np.left_shift(np.uint64(ps), unit_order.astype(np.uint64)))
    memmap.mark_preserved(unit_pfn.view(np.uint64) if walked else unit_phys >> np.uint64(memory.page_shift), unit_order)
    mb.clear_kho_scratch_only()
    return unit_phys, unit_order, walked, fdt


def _free_mask_of_reserved(memory: PhysicalMemory, mb: Memblock, memmap: MemMap) -> np.ndarray | None:
    """Memory minus memblock's reservations in whole pages, from the reserved regions alone:
    the page mask of the regions rounded out to pages, inverted.  The same mask as
    ``for_each_free_mem_range`` rounded in when memblock's memory is exactly the RAM banks
    and nothing is NOMAP (as :func:`_early_memblock` leaves it); None otherwise, and when a
    region reaches outside the banks.  O(regions + pages) numpy work, no sort: millions of
    reserved units cost one toggle each instead of an interval subtraction."""
    mem = mb.memory.regions
    if (mem["flags"] & MemblockFlag.NOMAP).any():
        return None
    page = np.uint64(memory.page_size)
    bank_s, bank_e = intervals.banks(memory)  # pfns
    mem_s, mem_e = intervals.normalize(mem["base"] // page, (mem["base"] + mem["size"]) // page, merge_touching=False)
    if intervals.size(mem_s, mem_e) != memory.nr_pages or not intervals.within(bank_s, bank_e, mem_s, mem_e).all():
        return None
    regions = mb.reserved.regions
    first = regions["base"] // page
    last = (regions["base"] + regions["size"] + page - np.uint64(1)) // page
    if first.size > 1 and (first[1:] < last[:-1]).any():  # two regions sharing a page
        first, last = intervals.normalize(first, last)
    if first.size and not (bank_s.size == 1 and first[0] >= bank_s[0] and last[-1] <= bank_e[0]):
        inside = intervals.within(bank_s, bank_e, first, last)
        if not inside.all():
            return None
    free = memmap.ranges_mask(first, last)
    return np.logical_not(free, out=free)


def _free_pages(memory: PhysicalMemory, mb: Memblock, memmap: MemMap, segments: Segments, walked: bool) -> np.ndarray:
    """Stage 4, free lists: the page mask of free memory.  On the memblock path (not
    ``walked``), memory minus memblock's reservations in whole pages; after a stream walk,
    the stream's free runs plus the scratch areas minus memblock's few reservations (cut at
    segment boundaries).  The free runs are every usable page no unit covers, so with the
    scratch areas they are every page not marked preserved: one pass over ``memmap.state``."""
    page = np.uint64(memory.page_size)
    if not walked:
        free = _free_mask_of_reserved(memory, mb, memmap)
        if free is not None:
            return free
        start, end, _ = mb.free_ranges()
        return memmap.ranges_mask((start + page - np.uint64(1)) // page, end // page)
    free = memmap.state != PRESERVED
    res_s, res_e = mb.reserved.coverage()
    res_s, res_e = intervals.split_at(res_s // page, (res_e + page - np.uint64(1)) // page, segments.boundaries())
    for first, last in zip(res_s.tolist(), res_e.tolist()):
        free[memmap.index_range(first, last - first)] = False
    return free


def boot(memory: PhysicalMemory, boot_dtb: bytes | None, path: str = "memblock", *, boot_params: int | None = None,
         encoding_options: dict | None = None, kernel_image: int = DEFAULT_KERNEL_IMAGE, image_phys: int | None = None,
         seed: int = 0, strict: bool = True) -> NextKernel:
    """Boot the next kernel on ``memory`` with ``boot_dtb`` (arm64: the handover in its
    ``/chosen``) or, on x86_64, ``boot_params``: the phys of the zero page whose
    ``setup_data`` chain holds the handover (``boot_dtb`` None).  See the module docstring.

    ``encoding_options``: the options the map was written with (e.g. kho-v1's bitmap size:
    a kernel knows its own), from the handover image.  ``kernel_image``: bytes of the next
    kernel's image, at ``image_phys`` (default: placed top-down in memblock, from scratch
    when KHO is revived).  ``seed``: the buddy allocator's random allocations.  ``strict``:
    False decodes the handover as leniently as Linux does (spec/hardening.md).

    Raises KHOError only when the kernel could not boot at all (an unreadable boot DTB,
    no room for its image or memory map; ENOMEM, before anything is allocated, when the
    host has not :data:`HOST_BYTES_PER_PAGE` bytes a page available); a bad handover is
    logged and ignored (lenient: scratch areas not page-aligned are trimmed and logged).
    O(pages + units) numpy work and about 10 bytes of host memory per page.
    """
    if path not in PATHS:
        raise KHOError("EINVAL", f"unknown deserialization path {path!r} (one of {', '.join(PATHS)})")
    check_host_memory(memory.nr_pages * HOST_BYTES_PER_PAGE,
                      f"the next kernel's per-page state for {memory.nr_pages:,} pages")
    stages, messages = _Stages(), []
    if (boot_dtb is None) == (boot_params is None):
        raise KHOError("EINVAL", "the next kernel boots with a DTB (arm64) or boot_params (x86_64), one of them")
    handover = _receive(memory, boot_dtb, boot_params, path, strict, messages)
    stages.done("handover")
    mb, image_phys, image_size = _early_memblock(memory, handover, kernel_image, image_phys)
    memmap = MemMap(memory)
    segments = Segments.from_memory(memory)
    stages.done("memblock")
    unit_phys, unit_order = np.empty(0, np.uint64), np.empty(0, np.uint8)
    walked, fdt = False, None
    if handover:
        _, fdt, _ = handover
        unit_phys, unit_order, walked, fdt = _deserialize(memory, mb, memmap, fdt, path, encoding_options, strict, messages)
    stages.done("deserialize")
    free = _free_pages(memory, mb, memmap, segments, walked)
    memmap.set_free(free)
    allocator = BuddyAllocator(memory, memmap, segments, build_free_areas(free, memmap, segments, memory.geometry.max_order), seed)
    stages.done("free_lists")

    kho = IncomingKHO(memory, memmap, fdt, unit_phys, unit_order)
    return NextKernel(memory, path, mb, memmap, allocator, kho, (image_phys, image_size), messages, stages.timings,
                      stages.cpu)
