"""kho's host-side index of preserved pages: one counter per RAM page.

Not part of any modelled kernel memory: a tracker keeps it beside its kernel structures so
that "is this page preserved?" and the strict double-preservation check are O(1) per page
instead of a search through every order.  ``counts[bank][pfn - first pfn of bank]`` is the
number of preserved units covering that page (uint8: a page is covered at most once in
strict mode; kernel-compatible mode keeps overlapping units of different orders).

Units: ``phys`` in bytes, ``pfn`` page frame numbers, ``order`` log2 of pages.  Memory: one
byte per RAM page (16 MiB for 64 GiB of 4 KiB pages).
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np

from kho.errors import KHOError
from kho.memory.physical import PhysicalMemory


class PageCover:
    """Per-page counts of the preserved units covering each RAM page.  See the module docstring."""

    def __init__(self, memory: PhysicalMemory):
        self.memory = memory
        shift = memory.page_shift
        self.first_pfn = [b.start >> shift for b in memory.banks]
        self.end_pfn = [b.end >> shift for b in memory.banks]
        self._firsts = np.array(self.first_pfn, dtype=np.uint64)
        self.counts = [np.zeros(e - s, dtype=np.uint8) for s, e in zip(self.first_pfn, self.end_pfn)]

    # -- one unit -------------------------------------------------------------------------
    def bank_offset(self, pfn: int, nr: int) -> tuple[int, int] | None:
        """``(bank index, offset in bank)`` of pfns ``[pfn, pfn + nr)``, or None when they
        are not all in one bank.  O(log banks)."""
        i = bisect_right(self.first_pfn, pfn) - 1
        if i < 0 or pfn + nr > self.end_pfn[i]:
            return None
        return i, pfn - self.first_pfn[i]

    def covered(self, bank: int, off: int, nr: int) -> bool:
        """True when a page of ``nr`` pages at ``off`` in ``bank`` is covered.  O(nr)."""
        counts = self.counts[bank]
        return bool(counts[off]) if nr == 1 else bool(counts[off:off + nr].any())

    def add(self, bank: int, off: int, nr: int, delta: int) -> None:
        """Add ``delta`` (+1 or -1) to the counts of ``nr`` pages at ``off`` in ``bank``.  O(nr)."""
        where = off if nr == 1 else slice(off, off + nr)
        if delta > 0:
            self.counts[bank][where] += delta
        else:
            self.counts[bank][where] -= -delta

    # -- batches ------------------------------------------------------------------------
    def bank_array(self, phys: np.ndarray) -> np.ndarray:
        """Bank index of each (validated, in-RAM) uint64 address (int64).  O(n log banks)."""
        if len(self.counts) == 1:
            return np.zeros(phys.size, dtype=np.int64)
        return np.searchsorted(self._firsts, phys >> np.uint64(self.memory.page_shift), side="right").astype(np.int64) - 1

    def pages_of(self, phys: np.ndarray, orders: np.ndarray, bank: np.ndarray) -> dict[int, np.ndarray]:
        """Offsets of every page of the units, per bank ``{bank: int64 offsets}``.

        O(pages of the units) memory and work, bounded by RAM: units are validated first.
        """
        shift = self.memory.page_shift
        out = {}
        for b in np.flatnonzero(np.bincount(bank)).tolist():
            sel = slice(None) if len(self.counts) == 1 else bank == b
            pfn = (phys[sel].view(np.int64) >> shift) - self.first_pfn[b]
            ords = orders[sel]
            if not ords.size or ords.max() == 0:
                out[b] = pfn
                continue
            parts = []
            for order in np.unique(ords).tolist():
                p = pfn[ords == order]
                parts.append((p[:, None] + np.arange(1 << order, dtype=np.int64)).ravel())
            out[b] = np.concatenate(parts)
        return out

    def mark_unique(self, pages: dict[int, np.ndarray]) -> None:
        """Strict mode: EEXIST unless no page is covered yet and none is named twice; then
        set them all to 1.  All or nothing.  O(pages + bank pages) (one count per bank)."""
        for b, offs in pages.items():
            if self.counts[b][offs].any():
                hit = offs[np.argmax(self.counts[b][offs] != 0)] + self.first_pfn[b]
                raise KHOError("EEXIST", f"page {hit << self.memory.page_shift:#x} is already preserved")
        done = []
        for b, offs in pages.items():
            counts = self.counts[b]
            before = np.count_nonzero(counts)
            counts[offs] = 1
            done.append((b, offs))
            if np.count_nonzero(counts) - before != offs.size:
                self.unmark_unique(dict(done))
                raise KHOError("EEXIST", "the batch preserves some page twice")

    def unmark_unique(self, pages: dict[int, np.ndarray]) -> None:
        """Set the pages' counts back to 0: undoes :meth:`mark_unique`, or removes units that
        alone covered their pages (strict mode).  O(pages)."""
        for b, offs in pages.items():
            self.counts[b][offs] = 0

    def add_pages(self, pages: dict[int, np.ndarray], delta: int) -> None:
        """Add ``delta`` (+1 or -1) to every listed page, a page listed twice twice.  O(pages)."""
        for b, offs in pages.items():
            if delta > 0:
                np.add.at(self.counts[b], offs, delta)
            else:
                np.subtract.at(self.counts[b], offs, -delta)

    # -- queries ------------------------------------------------------------------------
    def is_preserved(self, phys: int) -> bool:
        """True when the page holding byte ``phys`` is covered.  O(log banks)."""
        where = self.bank_offset(phys >> self.memory.page_shift, 1)
        return where is not None and bool(self.counts[where[0]][where[1]])

    def is_preserved_array(self, phys: np.ndarray) -> np.ndarray:
        """Vectorized :meth:`is_preserved` (bool array, False outside RAM).  O(n log banks)."""
        pfn = np.asarray(phys, dtype=np.uint64) >> np.uint64(self.memory.page_shift)
        out = np.zeros(pfn.shape, dtype=bool)
        bank = np.searchsorted(self._firsts, pfn, side="right").astype(np.int64) - 1
        for b in np.unique(bank[bank >= 0]).tolist():
            sel = np.flatnonzero(bank == b)
            off = (pfn[sel] - self._firsts[b]).astype(np.int64)
            inside = off < self.counts[b].size
            out[sel[inside]] = self.counts[b][off[inside]] != 0
        return out
