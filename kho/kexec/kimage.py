"""The kexec image: segments, their checks and placement, source pages and the entry list.

A *segment* is ``buf`` (bytes to load, ``bufsz = len(buf)``) destined for
``[mem, mem + memsz)`` (physical bytes, page-aligned, the tail past ``bufsz`` zeroed).
:func:`check_segments` applies the kernel's ``sanity_check_segment_list`` rules with its
error codes, then the KHO rule that destinations lie inside the scratch areas (or the
``kexeckernel=`` region) and off every page that must survive the reboot.

:func:`load` does what ``kimage_load_normal_segment`` and friends do: one source page
per destination page, allocated from the running kernel's allocator under the kernel's
invariant (a source page is its own destination or no destination at all; indirection
and control pages are never destinations), the entry list written in indirection pages
of :class:`~kho.memory.physical.PhysicalMemory` (:mod:`kho.kexec.entries`).  ``in_place=True``
models a segment loaded straight into a reserved region: no source pages, ``head`` is
``IND_DONE``.

The allocator is anything with ``alloc_many(count, order)`` and ``free_pages(phys, order)``
(the first kernel's :class:`~kho.currentkernel.pagealloc.PageAllocator` or a next kernel's buddy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kho.errors import KHOError
from kho.kexec import entries as ent
from kho.memory import intervals
from kho.memory.intervals import IntervalSet
from kho.memory.physical import PhysicalMemory

#: Most segments one image may have (include/linux/kexec.h).
KEXEC_SEGMENT_MAX = 16
#: What the model writes into the control page in place of arm64_relocate_new_kernel's code;
#: the relocation checks it is intact before running it.
CONTROL_CODE = b"kho model: arm64_relocate_new_kernel\n"


@dataclass(frozen=True)
class Segment:
    """``buf`` loaded at ``[mem, mem + memsz)``; ``name`` for messages (kernel, initrd, dtb, ...)."""

    buf: bytes
    mem: int
    memsz: int
    name: str = "segment"

    @property
    def bufsz(self) -> int:
        return len(self.buf)

    @property
    def end(self) -> int:
        return self.mem + self.memsz


def check_segments(memory: PhysicalMemory, segments, *, allowed: IntervalSet | None = None,
                   busy: IntervalSet | None = None) -> None:
    """Raise KHOError unless ``segments`` pass the kernel's checks, in the kernel's order.

    1. more than KEXEC_SEGMENT_MAX segments: EINVAL;
    2. each segment: negative or wrapping range, unaligned start or end, or outside RAM
       (the kernel's KEXEC_DESTINATION_MEMORY_LIMIT; the model requires RAM): EADDRNOTAVAIL;
    3. two segments overlap: EINVAL;  4. ``bufsz > memsz``: EINVAL;
    5. one segment or all together above half of RAM's pages: EINVAL;
    then KHO: a segment not inside one interval of ``allowed`` (scratch), or on a page of
    ``busy`` (preserved memory, KHO metadata): EADDRNOTAVAIL.  O(segments²).
    """
    ps, shift = memory.page_size, memory.page_shift
    if len(segments) > KEXEC_SEGMENT_MAX:
        raise KHOError("EINVAL", f"{len(segments)} segments: at most {KEXEC_SEGMENT_MAX}")
    for s in segments:
        if s.mem < 0 or s.memsz < 0:
            raise KHOError("EADDRNOTAVAIL", f"{s.name} segment {s.mem:#x}+{s.memsz:#x} is not a valid range")
        if s.mem & (ps - 1) or s.end & (ps - 1):
            raise KHOError("EADDRNOTAVAIL", f"{s.name} segment {s.mem:#x}-{s.end:#x} is not page-aligned")
        if s.memsz and not memory.in_ram(s.mem, s.memsz):
            raise KHOError("EADDRNOTAVAIL", f"{s.name} segment {s.mem:#x}-{s.end:#x} is outside RAM")
    for i, s in enumerate(segments):
        for t in segments[:i]:
            if s.end > t.mem and s.mem < t.end:
                raise KHOError("EINVAL", f"{s.name} segment {s.mem:#x}-{s.end:#x} overlaps {t.name} segment {t.mem:#x}-{t.end:#x}")
    for s in segments:
        if s.bufsz > s.memsz:
            raise KHOError("EINVAL", f"{s.name} segment: bufsz {s.bufsz} > memsz {s.memsz}")
    half = memory.nr_pages // 2
    total = 0
    for s in segments:
        pages = (s.memsz + ps - 1) >> shift
        if pages > half:
            raise KHOError("EINVAL", f"{s.name} segment of {pages} pages is more than half of RAM ({half} pages)")
        total += pages
    if total > half:
        raise KHOError("EINVAL", f"segments total {total} pages, more than half of RAM ({half} pages)")
    for s in segments:
        if not s.memsz:
            continue
        first, last = [s.mem >> shift], [s.end >> shift]
        if allowed is not None and not allowed.within(first, last)[0]:
            raise KHOError("EADDRNOTAVAIL", f"{s.name} segment {s.mem:#x}-{s.end:#x} is not inside a scratch area")
        if busy is not None and busy.overlaps(first, last)[0]:
            raise KHOError("EADDRNOTAVAIL", f"{s.name} segment {s.mem:#x}-{s.end:#x} would overwrite preserved memory or KHO metadata")


@dataclass(frozen=True)
class SegmentRequest:
    """A segment to place: ``data`` padded to ``memsz`` (page-rounded), start aligned to ``align`` bytes."""

    name: str
    data: bytes
    memsz: int = 0
    align: int = 0


def scratch_pages(memory: PhysicalMemory) -> IntervalSet:
    """The scratch areas of ``memory`` as pfn intervals, adjacent areas kept apart (a segment
    must fit inside one area, as kexec_walk_kho_scratch looks for holes area by area)."""
    return IntervalSet(*intervals.scratch(memory))


def place_segments(memory: PhysicalMemory, requests, allowed: IntervalSet, busy: IntervalSet | None = None) -> list[Segment]:
    """Choose destinations as ``kexec_locate_mem_hole`` does under KHO: lowest fit, in order,
    inside ``allowed`` (the scratch areas) and off ``busy``.  EADDRNOTAVAIL when one does not
    fit.  O(requests × free extents)."""
    ps, shift = memory.page_size, memory.page_shift
    free = allowed if busy is None else allowed.subtract(busy)
    out = []
    for req in requests:
        memsz = max(req.memsz, len(req.data), 1)
        pages = (memsz + ps - 1) >> shift
        align_pages = max(1, (req.align or ps) >> shift)
        found = None
        for lo, hi in zip(free.start.tolist(), free.end.tolist()):
            start = -(-lo // align_pages) * align_pages
            if start + pages <= hi:
                found = start
                break
        if found is None:
            largest = int((free.end - free.start).max()) << shift if len(free) else 0
            raise KHOError("EADDRNOTAVAIL", f"the {req.name} segment ({pages << shift} bytes) does not fit in the scratch areas "
                                            f"(largest free extent {largest} bytes)")
        out.append(Segment(req.data, found << shift, pages << shift, req.name))
        free = free.subtract(IntervalSet.of([found], [found + pages]))
    return out


def destination_ranges(segments, page_shift: int) -> IntervalSet:
    """The destination pages of ``segments``."""
    return IntervalSet.of([s.mem >> page_shift for s in segments], [s.end >> page_shift for s in segments])


def alloc_safe_pages(allocator, count: int, avoid: IntervalSet, page_shift: int) -> np.ndarray:
    """``count`` order-0 pages none of which is in ``avoid`` (kimage_alloc_normal_control_pages'
    rule): pages that land in ``avoid`` are set aside and freed at the end.  All or nothing.
    Returns phys (uint64, ascending).  O(count) allocations."""
    got, aside = [], []
    have = 0
    try:
        while have < count:
            pool = np.asarray(allocator.alloc_many(count - have, 0), dtype=np.uint64)
            hit = avoid.contains(pool >> np.uint64(page_shift))
            aside.append(pool[hit])
            got.append(pool[~hit])
            have += int(np.count_nonzero(~hit))
    except KHOError:
        for part in got:
            _free_all(allocator, part)
        raise
    finally:
        for part in aside:
            _free_all(allocator, part)
    return np.sort(np.concatenate(got)) if got else np.empty(0, np.uint64)


def _free_all(allocator, phys: np.ndarray) -> None:
    for p in np.asarray(phys, dtype=np.uint64).tolist():
        allocator.free_pages(p, 0)


@dataclass
class KImage:
    """A loaded kexec image (``struct kimage`` as far as relocation needs it).

    ``head``: first entry (see :mod:`kho.kexec.entries`); ``start``: entry point (phys of
    the first segment, the kernel); ``control_page``: phys of the page holding the
    relocation code; ``indirection_pages`` and ``source_pages`` (phys, list order);
    ``in_place``: segments already at their destinations (``head`` is IND_DONE).
    """

    memory: PhysicalMemory
    segments: tuple[Segment, ...]
    head: int
    start: int
    control_page: int
    indirection_pages: np.ndarray
    source_pages: np.ndarray
    in_place: bool

    @property
    def destinations(self) -> IntervalSet:
        return destination_ranges(self.segments, self.memory.page_shift)

    @property
    def nr_pages(self) -> int:
        """Destination pages over all segments."""
        return self.destinations.size

    def walk(self) -> ent.EntryWalk:
        """Follow the entry list in memory (:func:`kho.kexec.entries.walk_list`)."""
        return ent.walk_list(self.memory, self.head)

    def pages_used(self) -> int:
        """Pages the load took from the allocator (control, indirection and source pages)."""
        return 1 + int(self.indirection_pages.size) + int(self.source_pages.size)

    def unload(self, allocator) -> None:
        """Give back every page the load took (kimage_free)."""
        _free_all(allocator, np.r_[np.uint64(self.control_page), self.indirection_pages, self.source_pages])


def load(memory: PhysicalMemory, allocator, segments, *, in_place: bool = False,
         allowed: IntervalSet | None = None, busy: IntervalSet | None = None) -> KImage:
    """Check ``segments``, take the control page, and either write the segments in place or
    allocate source pages, fill them and write the entry list.  All or nothing: on error
    nothing stays allocated and memory is not written.  O(pages) (numpy + one write a page).
    """
    segments = tuple(segments)
    if not segments:
        raise KHOError("EINVAL", "a kexec image needs at least one segment")
    check_segments(memory, segments, allowed=allowed, busy=busy)
    ps, shift = memory.page_size, memory.page_shift
    dests = destination_ranges(segments, shift)
    control = alloc_safe_pages(allocator, 1, dests, shift)
    dest_pages = [np.arange(s.mem, s.end, ps, dtype=np.uint64) for s in segments]
    all_dest = np.concatenate(dest_pages) if dest_pages else np.empty(0, np.uint64)
    sources = np.empty(0, np.uint64)
    indirection = np.empty(0, np.uint64)
    if not in_place:
        nr_entries = int(all_dest.size) + len(segments)
        nr_ind = ent.nr_indirection_pages(nr_entries, ps)
        try:
            pool = np.asarray(allocator.alloc_many(int(all_dest.size) + nr_ind, 0), dtype=np.uint64)
        except KHOError:
            _free_all(allocator, control)
            raise
        # A page that is some destination serves as that destination's own source; every
        # other page is no destination at all, so it may be any source or an indirection page.
        is_dest = dests.contains(pool >> np.uint64(shift))
        own = pool[is_dest]
        other = pool[~is_dest]
        own_mask = np.isin(all_dest, own)
        sources = all_dest.copy()
        n_other = int(np.count_nonzero(~own_mask))
        sources[~own_mask] = other[:n_other]
        indirection = other[n_other:]
    memory.write(int(control[0]), CONTROL_CODE)
    pos = 0
    for seg, dpages in zip(segments, dest_pages):
        data = seg.buf + bytes(dpages.size * ps - seg.bufsz)
        if in_place:
            memory.write(seg.mem, data)
        else:
            for i, src in enumerate(sources[pos:pos + dpages.size].tolist()):
                memory.write(src, data[i * ps:(i + 1) * ps])
        pos += dpages.size
    if in_place:
        head = ent.IND_DONE
    else:
        parts, pos = [], 0
        for seg, dpages in zip(segments, dest_pages):
            parts.append(ent.segment_entries(seg.mem, sources[pos:pos + dpages.size]))
            pos += dpages.size
        head = ent.write_list(memory, np.concatenate(parts), indirection)
    return KImage(memory, segments, head, segments[0].mem, int(control[0]), indirection, sources, in_place)
