"""The next kernel's memory map: what it keeps per page (``struct page``) that KHO uses.

Two numpy arrays indexed by page over all RAM banks (bank after bank, holes skipped):

* ``info`` — ``page->private`` as KHO writes it on the head page of every preserved
  unit: :data:`KHO_PAGE_INFO` ``{u32 order; u32 magic}`` (``union kho_page_info``,
  little-endian: the order is the low 32 bits of ``private``), magic 'KHOP'.
* ``state`` — who owns the page: free (in the buddy free lists), allocated (handed
  out by the allocator, or restored from KHO and now the caller's), reserved (memblock
  reservations: the kernel's own memory, the scratch array), preserved (a KHO unit not
  restored yet).

Units: pfns, orders; 9 bytes of host memory per page.
"""

from __future__ import annotations

import numpy as np

from ..errors import KHOError
from ..memory import PhysicalMemory
from . import intervals

#: ``union kho_page_info``: ``page->private`` of a preserved head page.
KHO_PAGE_INFO = np.dtype([("order", "<u4"), ("magic", "<u4")])
#: The magic KHO writes next to the order: ASCII 'KHOP'.
KHO_PAGE_MAGIC = 0x4B484F50

#: Page states (values of :attr:`MemMap.state`).
FREE, ALLOCATED, RESERVED, PRESERVED = 0, 1, 2, 3
STATE_NAMES = {FREE: "free", ALLOCATED: "allocated", RESERVED: "reserved", PRESERVED: "preserved"}


class MemMap:
    """Per-page ``info`` and ``state`` arrays of a machine.  See the module docstring."""

    def __init__(self, memory: PhysicalMemory):
        self.memory = memory
        shift = memory.page_shift
        self.bank_first = np.array([b.start >> shift for b in memory.banks], dtype=np.uint64)
        self.bank_end = np.array([b.end >> shift for b in memory.banks], dtype=np.uint64)
        sizes = (self.bank_end - self.bank_first).astype(np.int64)
        self.bank_base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.nr_pages = int(sizes.sum())
        self.info = np.zeros(self.nr_pages, dtype=KHO_PAGE_INFO)
        self.state = np.full(self.nr_pages, RESERVED, dtype=np.uint8)

    # -- indexing -------------------------------------------------------------------------
    def index(self, pfn) -> np.ndarray:
        """Array index of each pfn; KHOError(EINVAL) if one is outside RAM.  O(n log banks)."""
        pfn = intervals.as_u64(pfn)
        bank = np.searchsorted(self.bank_first, pfn, side="right").astype(np.int64) - 1
        ok = (bank >= 0) & (pfn < self.bank_end[np.maximum(bank, 0)])
        if not ok.all():
            bad = int(pfn[np.argmax(~ok)])
            raise KHOError("EINVAL", f"pfn {bad:#x} is outside RAM")
        bank = np.maximum(bank, 0)
        return (pfn - self.bank_first[bank]).astype(np.int64) + self.bank_base[bank]

    def index_range(self, pfn: int, nr_pages: int) -> slice:
        """The array slice of pages ``[pfn, pfn + nr_pages)``; EINVAL unless inside one bank."""
        first = int(self.index([pfn])[0])
        bank = int(np.searchsorted(self.bank_first, np.uint64(pfn), side="right")) - 1
        if pfn + nr_pages > int(self.bank_end[bank]):
            raise KHOError("EINVAL", f"pages {pfn:#x}+{nr_pages} cross the end of a RAM bank")
        return slice(first, first + nr_pages)

    # -- bulk updates -----------------------------------------------------------------------
    def set_ranges(self, start_pfn, end_pfn, state: int) -> None:
        """Give every page of the pfn ranges ``state``.  Ranges may touch but not cross a
        bank end.  O(pages) numpy work."""
        s, e = intervals.normalize(start_pfn, end_pfn)
        if not s.size:
            return
        lo = self.index(s)
        hi = lo + (e - s).astype(np.int64)
        toggle = np.zeros(self.nr_pages + 1, dtype=np.int8)
        toggle[lo] = 1
        toggle[hi] -= 1
        self.state[np.cumsum(toggle[:-1], dtype=np.int8).view(bool)] = state

    def set_units(self, pfn, order, state: int) -> None:
        """Give every page of the units ``(pfn, order)`` ``state``."""
        pfn = intervals.as_u64(pfn)
        self.set_ranges(pfn, pfn + (np.uint64(1) << intervals.as_u64(order)), state)

    def mark_preserved(self, pfn, order) -> None:
        """What KHO does to each preserved unit: state preserved, head ``info`` = order + magic."""
        idx = self.index(pfn)
        self.set_units(pfn, order, PRESERVED)
        self.info["order"][idx] = order
        self.info["magic"][idx] = KHO_PAGE_MAGIC

    def count(self, state: int) -> int:
        """Pages in ``state``."""
        return int(np.count_nonzero(self.state == state))
