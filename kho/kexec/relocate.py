"""The reboot-time relocation: follow the entry list and copy every source page to its
destination in :class:`~kho.memory.physical.PhysicalMemory`.

Modes (:data:`RELOCATION_MODES`):

* ``mmu-off`` — before Linux 5.16: MMU and D-cache off, physical addresses;
* ``mmu-on`` — Linux 5.16+: every access (indirection pages, sources, destinations) goes
  through the transitional linear-map copy, and the relocation code runs from its
  identity mapping; both are checked by walking the tables in memory;
* ``reserved`` — a ``kexeckernel=`` region: the segments were loaded in place, nothing
  is copied.

Before copying, :func:`relocate` checks the kernel's invariants (a source page is its own
destination or no destination; indirection, control and table pages are no destination;
the control page still holds the relocation code).  Around the copy it compares every
page of memory before and after: any page written outside the destinations is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kho.errors import KHOError
from kho.kexec.kimage import CONTROL_CODE, KImage
from kho.kexec.transpgd import TransPgd
from kho.memory import intervals
from kho.memory.physical import PhysicalMemory

RELOCATION_MODES = ("mmu-off", "mmu-on", "reserved")


@dataclass(frozen=True)
class RelocationResult:
    """What a relocation did: pages copied (``bytes_copied`` bytes), indirection pages
    followed, table pages read (mmu-on), pages written (all inside the destinations)."""

    mode: str
    pages_copied: int
    bytes_copied: int
    indirection_pages: int
    tables_read: int
    pages_written: int


def check_mode(mode: str) -> str:
    if mode not in RELOCATION_MODES:
        raise KHOError("EINVAL", f"unknown relocation mode {mode!r} (one of {', '.join(RELOCATION_MODES)})")
    return mode


def _snapshot(memory: PhysicalMemory):
    return dict(memory.stored_pages()), set(memory.generated_runs())


def _seeds_at(runs: set, pfn: np.ndarray) -> list:
    """The generated-content seed of each pfn under ``runs`` (``(start, end, seed)``), or None."""
    runs = sorted(runs)
    starts = np.array([r[0] for r in runs], dtype=np.int64)
    ends = np.array([r[1] for r in runs], dtype=np.int64)
    return [runs[j][2] if j >= 0 else None for j in intervals.locate(starts, ends, pfn).tolist()]


def _written_pages(memory: PhysicalMemory, before) -> np.ndarray:
    """pfns whose stored page object or generated seed differs from ``before``.  O(stored pages)."""
    stored_before, runs_before = before
    stored_after = dict(memory.stored_pages())
    changed = [pfn for pfn in stored_before.keys() | stored_after.keys() if stored_before.get(pfn) is not stored_after.get(pfn)]
    runs_after = set(memory.generated_runs())
    moved = runs_before ^ runs_after
    if moved:
        cand = intervals.points(*intervals.normalize(np.array([r[0] for r in moved], np.int64), [r[1] for r in moved]))
        for pfn, sb, sa in zip(cand.tolist(), _seeds_at(runs_before, cand), _seeds_at(runs_after, cand)):
            if sb != sa:
                changed.append(pfn)
    return np.unique(np.array(changed, dtype=np.int64))


def _check_invariants(kimage: KImage, walk, trans: TransPgd | None) -> None:
    shift = kimage.memory.page_shift
    dests = kimage.destinations
    src_pfn = (walk.src >> np.uint64(shift)).astype(np.int64)
    foreign = dests.contains(src_pfn) & (walk.src != walk.dst)
    if foreign.any():
        i = int(np.argmax(foreign))
        raise KHOError("EINVAL", f"kexec invariant broken: source page {int(walk.src[i]):#x} is another page's destination")
    others = [("indirection", walk.indirection), ("control", np.array([kimage.control_page], dtype=np.uint64))]
    if trans is not None:
        others.append(("page-table", trans.pages))
    for what, pages in others:
        hit = dests.contains((pages >> np.uint64(shift)).astype(np.int64))
        if hit.any():
            raise KHOError("EINVAL", f"kexec invariant broken: {what} page {int(pages[np.argmax(hit)]):#x} is a destination")
    if walk.nr_copies != kimage.nr_pages:
        raise KHOError("EINVAL", f"entry list copies {walk.nr_copies} pages, the segments have {kimage.nr_pages}")


def relocate(kimage: KImage, mode: str, trans: TransPgd | None = None) -> RelocationResult:
    """Run the relocation of ``kimage`` in ``mode`` (``trans`` required for ``mmu-on``).

    Raises KHOError(EINVAL) when an invariant is broken, a table does not map an access
    (TranslationFault), or a page outside the destinations was written.  O(pages).
    """
    check_mode(mode)
    memory = kimage.memory
    ps = memory.page_size
    code = memory.read(kimage.control_page, len(CONTROL_CODE))
    if code != CONTROL_CODE:
        raise KHOError("EINVAL", f"the relocation code page {kimage.control_page:#x} was overwritten")
    if mode == "reserved" or kimage.in_place:
        if not (mode == "reserved" and kimage.in_place):
            raise KHOError("EINVAL", f"relocation mode {mode} does not match an image loaded {'in place' if kimage.in_place else 'for copying'}")
        return RelocationResult(mode, 0, 0, 0, 0, 0)
    if mode == "mmu-on" and trans is None:
        raise KHOError("EINVAL", "mmu-on relocation needs transitional page tables")
    walk = kimage.walk()
    _check_invariants(kimage, walk, trans if mode == "mmu-on" else None)
    tables_read = 0
    if mode == "mmu-on":
        # The code runs from its identity map; everything else through the linear-map copy.
        ident = trans.idmap_walker()
        if int(ident.translate(np.array([kimage.control_page], dtype=np.uint64))[0]) != kimage.control_page:
            raise KHOError("EINVAL", "the identity map does not map the relocation code to itself")
        linear = trans.linear_walker()
        for what, pa in (("indirection", walk.indirection), ("source", walk.src), ("destination", walk.dst)):
            got = linear.translate(trans.linear_va(pa))
            if (got != pa).any():
                i = int(np.argmax(got != pa))
                raise KHOError("EINVAL", f"the linear-map copy maps {what} page {int(pa[i]):#x} to {int(got[i]):#x}")
        tables_read = ident.tables_read + linear.tables_read
    before = _snapshot(memory)
    for src, dst in zip(walk.src.tolist(), walk.dst.tolist()):
        memory.write(dst, memory.read(src, ps))
    written = _written_pages(memory, before)
    outside = ~kimage.destinations.contains(written)
    if outside.any():
        raise KHOError("EINVAL", f"relocation wrote page {int(written[np.argmax(outside)]) << memory.page_shift:#x} outside the destinations")
    return RelocationResult(mode, walk.nr_copies, walk.nr_copies * ps, int(walk.indirection.size), tables_read, int(written.size))
