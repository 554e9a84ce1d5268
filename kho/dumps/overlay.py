"""A copy-on-write overlay over a read-only dump: what the next kernel writes stays in host memory.

:class:`OverlayMemory` is a :class:`~kho.memory.physical.PhysicalMemory` with the dump's banks
and scratch areas whose reads come from the dump except the pages written (or filled,
discarded) through it: those are kept, whole pages, in the overlay, as the base class keeps
its stored pages.  The dump file is never written.  Host memory: one page per page written.
"""

from __future__ import annotations

from kho.memory.physical import PhysicalMemory


class OverlayMemory(PhysicalMemory):
    """``base`` (a read-only memory, e.g. :class:`~kho.dumps.memory.DumpMemory`) under a
    copy-on-write layer of whole pages."""

    def __init__(self, base: PhysicalMemory):
        super().__init__(base.banks, base.page_size)
        self.base = base
        self.set_scratch(base.scratch)

    def _touched(self, first: int, last: int) -> bool:
        """Whether the overlay holds any of pfns ``[first, last)``.  O(log pages written)."""
        return next(iter(self._pages.irange(first, last - 1)), None) is not None or \
            next(self._generated_overlapping(first, last), None) is not None

    def read(self, phys: int, size: int) -> bytes:
        """``size`` bytes at ``phys`` (inside one bank): the overlay's pages over the dump's.
        O(size) plus the dump's read of the pages the overlay does not hold."""
        offset = phys & (self.page_size - 1)
        if 0 < size and offset + size <= self.page_size and phys >= 0:
            page = self._pages.get(phys >> self.page_shift)
            if page is not None:
                return page[offset:offset + size]
        self.check_range(phys, size, "read")
        if size == 0:
            return b""
        first, last = self._page_range(phys, size)
        if not self._touched(first, last):
            return self.base.read(phys, size)
        shift = self.page_shift
        buf = self._overlay_pages(bytearray(self.base.read(first << shift, (last - first) << shift)), first, last)
        offset = phys - (first << shift)
        return bytes(buf[offset:offset + size])

    def discard(self, phys: int, size: int) -> None:
        """Whole pages ``[phys, phys + size)`` read as zeros from now on (one shared zero
        page per pfn in the overlay).  O(pages)."""
        self._check_page_range(phys, size)
        first, last = self._page_range(phys, size)
        self._split_generated(first, last)
        zero = bytes(self.page_size)
        for pfn in range(first, last):
            self._pages[pfn] = zero

    def fill_pattern(self, phys: int, size: int, seed: int) -> None:
        """Whole pages ``[phys, phys + size)`` read as ``seed``'s generated content (see
        :mod:`kho.memory.contents`).  O(log pages written + pages dropped)."""
        self._check_page_range(phys, size)
        first, last = self._page_range(phys, size)
        self._split_generated(first, last)
        for pfn in list(self._pages.irange(first, last - 1)):
            del self._pages[pfn]
        self._generated[first] = (last, seed)
