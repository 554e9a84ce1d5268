"""The next kernel's memory map: what it keeps per page (``struct page``) that KHO uses.

Two numpy arrays indexed by page over all RAM banks (bank after bank, holes skipped):

* ``info`` — ``page->private`` as KHO writes it on the head page of every preserved
  unit: :data:`KHO_PAGE_INFO_DTYPE` ``{u32 order; u32 magic}`` (``union kho_page_info``,
  little-endian: the order is the low 32 bits of ``private``), magic 'KHOP'.
* ``state`` — who owns the page: free (in the buddy free lists), allocated (handed
  out by the allocator, or restored from KHO and now the caller's), reserved (memblock
  reservations: the kernel's own memory, the scratch array), preserved (a KHO unit not
  restored yet).

Units: pfns, orders; 9 bytes of host memory per page.
"""

from __future__ import annotations

import numpy as np

from kho.abi.kexec_handover import KHO_PAGE_INFO_DTYPE, KHO_PAGE_MAGIC
from kho.errors import KHOError
from kho.memory import intervals
from kho.memory.physical import PhysicalMemory

#: Page states (values of :attr:`MemMap.state`); :meth:`MemMap.set_free` relies on FREE being 0.
FREE, ALLOCATED, RESERVED, PRESERVED = 0, 1, 2, 3


class MemMap:
    """Per-page ``info`` and ``state`` arrays of a machine.  See the module docstring."""

    def __init__(self, memory: PhysicalMemory):
        self.memory = memory
        self.bank_first, self.bank_end = intervals.banks(memory)
        sizes = (self.bank_end - self.bank_first).astype(np.int64)
        self.bank_base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.nr_pages = int(sizes.sum())
        # Written out now, as memmap_init does, not left to first touch.
        self.info = np.empty(self.nr_pages, dtype=KHO_PAGE_INFO_DTYPE)
        self.info.view(np.uint64).fill(0)
        self.state = np.full(self.nr_pages, RESERVED, dtype=np.uint8)

    # -- indexing -------------------------------------------------------------------------
    def index(self, pfn) -> np.ndarray:
        """Array index of each pfn; KHOError(EINVAL) if one is outside RAM.  O(n log banks)."""
        pfn = intervals.as_u64(pfn)
        if self.bank_first.size == 1:
            if pfn.size and (pfn.min() < self.bank_first[0] or pfn.max() >= self.bank_end[0]):
                bad = pfn[(pfn < self.bank_first[0]) | (pfn >= self.bank_end[0])][0]
                raise KHOError("EINVAL", f"pfn {int(bad):#x} is outside RAM")
            return (pfn - self.bank_first[0]).astype(np.int64)
        bank = intervals.locate(self.bank_first, self.bank_end, pfn)
        if (bank < 0).any():
            bad = int(pfn[np.argmax(bank < 0)])
            raise KHOError("EINVAL", f"pfn {bad:#x} is outside RAM")
        return (pfn - self.bank_first[bank]).astype(np.int64) + self.bank_base[bank]

    def index_range(self, pfn: int, nr_pages: int) -> slice:
        """The array slice of pages ``[pfn, pfn + nr_pages)``; EINVAL unless inside one bank."""
        first = int(self.index([pfn])[0])
        bank = int(intervals.locate(self.bank_first, self.bank_end, [pfn])[0])
        if pfn + nr_pages > int(self.bank_end[bank]):
            raise KHOError("EINVAL", f"pages {pfn:#x}+{nr_pages} cross the end of a RAM bank")
        return slice(first, first + nr_pages)

    # -- bulk updates -----------------------------------------------------------------------
    def ranges_mask(self, start_pfn, end_pfn) -> np.ndarray:
        """A bool per page: True inside the pfn ranges.  Ranges must be disjoint (they may
        touch) and inside RAM, each within one bank.  O(pages) numpy work."""
        s, e = intervals.as_u64(start_pfn), intervals.as_u64(end_pfn)
        keep = e > s
        if not keep.all():
            s, e = s[keep], e[keep]
        toggle = np.zeros(self.nr_pages + 1, dtype=np.int8)
        if s.size:
            lo = self.index(s)
            toggle[lo] = 1
            toggle[lo + (e - s).astype(np.int64)] -= 1  # a range ending where another starts nets 0
        return np.cumsum(toggle[:-1], dtype=np.int8).view(bool)

    def mark_preserved(self, pfn, order) -> None:
        """What KHO does to each preserved unit (disjoint ``(pfn, order)``): every page's
        state becomes preserved, the head's ``info`` order + magic.  O(preserved pages)."""
        idx = self.index(pfn)
        order = np.asarray(order, dtype=np.uint8).reshape(-1)
        present = np.flatnonzero(np.bincount(order, minlength=1))
        info = self.info.view(np.uint64)  # one scalar store per head: no structured temporaries
        head = np.zeros(1, dtype=KHO_PAGE_INFO_DTYPE)
        for o in present.tolist():
            heads = idx if present.size == 1 else idx[order == o]
            head["order"], head["magic"] = o, KHO_PAGE_MAGIC
            info[heads] = head.view(np.uint64)[0]
            pages = heads if o == 0 else (heads[:, None] + np.arange(1 << o, dtype=np.int64)).reshape(-1)
            self.state[pages] = PRESERVED

    def set_free(self, free: np.ndarray) -> None:
        """State free for every page flagged in the bool mask ``free``.  A multiply, as the
        free state is 0: several times faster than a masked assignment."""
        np.multiply(self.state, ~free, out=self.state)

    def count(self, state: int) -> int:
        """Pages in ``state``."""
        return int(np.count_nonzero(self.state == state))
