"""kho's host-side index of preserved pages: one counter per RAM page.

Not part of any modelled kernel memory: a tracker keeps it beside its kernel structures so
that "is this page preserved?" and the strict double-preservation check are O(1) per page
instead of a search through every order.  ``counts[bank][pfn - first pfn of bank]`` is the
number of preserved units covering that page (uint8: a page is covered at most once in
strict mode; kernel-compatible mode keeps overlapping units of different orders).

The checks both trackers make on a unit before preserving it (aligned, inside one RAM
bank, outside the scratch areas) are here too, as they end in a position in the index:
:meth:`PageCover.check_units` for a batch (made by
:func:`kho.currentkernel.batches.unit_arrays`), :meth:`PageCover.locate_unit` for one unit.  The RAM banks are
:func:`kho.memory.intervals.banks`.

Units: ``phys`` in bytes, ``pfn`` page frame numbers, ``order`` log2 of pages.  Memory: one
byte per RAM page (16 MiB for 64 GiB of 4 KiB pages).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

import numpy as np

from kho.errors import KHOError
from kho.memory import intervals
from kho.memory.physical import PhysicalMemory


class PageCover:
    """Per-page counts of the preserved units covering each RAM page.  See the module docstring."""

    def __init__(self, memory: PhysicalMemory):
        self.memory = memory
        self._first, self._end = intervals.banks(memory)
        #: First and end pfn of every RAM bank, as lists for scalar lookups.
        self.first_pfn, self.end_pfn = self._first.tolist(), self._end.tolist()
        #: The counts as bytearrays, for scalar reads and writes at Python speed (single
        #: preserve_folio calls); ``counts`` are numpy views of the same bytes.
        self._raw = [bytearray(e - s) for s, e in zip(self.first_pfn, self.end_pfn)]
        self.counts = [np.frombuffer(raw, dtype=np.uint8) for raw in self._raw]
        self._single = len(self._raw) == 1
        #: True when the machine has one RAM bank.
        self.single_bank = self._single
        self.last_ascending = False
        self._page_size, self._page_shift = memory.page_size, memory.page_shift
        #: The scratch areas' bounds (bytes) as lists, for :meth:`locate_unit`; refreshed
        #: whenever ``memory.scratch`` is another tuple.
        self._scratch: tuple = ()
        self._scratch_start: list[int] = []
        self._scratch_end: list[int] = []

    # -- one unit -------------------------------------------------------------------------
    def bank_offset(self, pfn: int, nr: int) -> tuple[int, int] | None:
        """``(bank index, offset in bank)`` of pfns ``[pfn, pfn + nr)``, or None when they
        are not all in one bank.  O(log banks)."""
        if self._single:
            first = self.first_pfn[0]
            return None if pfn < first or pfn + nr > self.end_pfn[0] else (0, pfn - first)
        i = bisect_right(self.first_pfn, pfn) - 1
        if i < 0 or pfn + nr > self.end_pfn[i]:
            return None
        return i, pfn - self.first_pfn[i]

    def covered(self, bank: int, off: int, nr: int) -> bool:
        """True when a page of ``nr`` pages at ``off`` in ``bank`` is covered.  O(nr)."""
        return self._raw[bank][off] != 0 if nr == 1 else bool(self.counts[bank][off:off + nr].any())

    def locate_unit(self, phys: int, order: int) -> tuple[int, int]:
        """``(bank index, offset in bank)`` of the unit of ``2**order`` pages at byte
        ``phys`` (an order the tracker accepts); EINVAL unless it is aligned to its size,
        inside one RAM bank and outside the scratch areas.  O(log banks + areas)."""
        size = self._page_size << order
        if phys < 0 or phys & (size - 1):
            raise KHOError("EINVAL", f"{phys:#x} is not aligned to a unit of order {order} ({size} bytes)")
        pfn = phys >> self._page_shift
        if self._single and self.first_pfn[0] <= pfn and pfn + (1 << order) <= self.end_pfn[0]:
            where = 0, pfn - self.first_pfn[0]
        else:
            where = self.bank_offset(pfn, 1 << order)
        if where is None:
            raise KHOError("EINVAL", f"unit {phys:#x} order {order} is outside RAM")
        if self.memory.scratch is not self._scratch:  # the areas changed: refresh the bounds
            self._scratch = self.memory.scratch
            self._scratch_start, self._scratch_end = [a.addr for a in self._scratch], [a.end for a in self._scratch]
        i = bisect_left(self._scratch_start, phys + size) - 1
        if i >= 0 and self._scratch_end[i] > phys:
            raise KHOError("EINVAL", f"unit {phys:#x} order {order} overlaps a scratch area")
        return where

    def claim(self, bank: int, off: int, nr: int) -> bool:
        """Count ``nr`` pages at ``off`` in ``bank`` as covered once more when none of them
        is covered yet and return True; False, changing nothing, when one is.  O(nr)."""
        if nr == 1:
            raw = self._raw[bank]
            if raw[off]:
                return False
            raw[off] = 1
            return True
        counts = self.counts[bank][off:off + nr]
        if counts.any():
            return False
        counts += 1
        return True

    def add(self, bank: int, off: int, nr: int, delta: int) -> None:
        """Add ``delta`` (+1 or -1) to the counts of ``nr`` pages at ``off`` in ``bank``.  O(nr)."""
        if nr == 1:
            self._raw[bank][off] += delta
        elif delta > 0:
            self.counts[bank][off:off + nr] += delta
        else:
            self.counts[bank][off:off + nr] -= -delta

    # -- batches ------------------------------------------------------------------------
    def check_units(self, phys: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`locate_unit` for a batch from :func:`unit_arrays` whose orders the tracker
        has checked: EINVAL (naming the first bad unit) unless every unit is aligned, in
        RAM and outside the scratch areas.  Returns ``(phys uint64, order uint8, bank
        index int64)``, one per unit.  O(n log (banks + areas))."""
        shift = self.memory.page_shift
        if orders.ndim == 0:  # one order for the whole batch: scalar sizes
            order = int(orders)
            orders = np.full(phys.size, order, dtype=np.uint8)
            sizes = np.uint64(1 << (order + shift))
        else:
            orders = orders.astype(np.uint8)
            sizes = np.left_shift(np.uint64(1), orders.astype(np.uint64) + np.uint64(shift))
        low = np.uint64(int(np.bitwise_or.reduce(phys)) if phys.size else 0) & (sizes - np.uint64(1))
        misaligned = (phys & (sizes - np.uint64(1))) != 0 if sizes.ndim or low else low  # one OR suffices when aligned
        if misaligned.any():
            i = int(np.argmax(misaligned))
            raise KHOError("EINVAL", f"{int(phys[i]):#x} is not aligned to a unit of order {int(orders[i])}")
        uniform = sizes.ndim == 0 or (sizes.size and int(orders.min()) == int(orders.max()))
        #: Whether the batch check_units last accepted ascends strictly with one order, inside
        #: one bank (its units are then disjoint: :meth:`mark_unique_bits` may mark them).
        self.last_ascending = bool(uniform) and self._sorted_inside(phys, int(sizes) if sizes.ndim == 0 else int(sizes[0]))
        if self.last_ascending:
            return phys, orders, self.bank_array(phys)
        outside = ~self.memory.in_ram_array(phys, sizes)
        if outside.any():
            i = int(np.argmax(outside))
            raise KHOError("EINVAL", f"unit {int(phys[i]):#x} order {int(orders[i])} is outside RAM")
        if self.memory.scratch:
            in_scratch = self.memory.overlaps_scratch_array(phys, sizes)
            if in_scratch.any():
                i = int(np.argmax(in_scratch))
                raise KHOError("EINVAL", f"unit {int(phys[i]):#x} order {int(orders[i])} overlaps a scratch area")
        return phys, orders, self.bank_array(phys)

    def _sorted_inside(self, phys: np.ndarray, size: int) -> bool:
        """True when the units of ``size`` bytes at ``phys`` (aligned) ascend strictly and lie
        in one bank and outside every scratch area: a few binary searches instead of one per
        unit.  False says nothing (the caller checks unit by unit).  O(n) for the order check."""
        if not phys.size or (phys.size > 1 and not (phys[1:] > phys[:-1]).all()):
            return False
        first, last = int(phys[0]), int(phys[-1]) + size
        where = self.bank_offset(first >> self._page_shift, (last - first) >> self._page_shift)
        if where is None:
            return False
        for area in self.memory.scratch:  # the first unit ending after the area's start
            i = int(np.searchsorted(phys, np.uint64(max(area.addr - size + 1, 0))))
            if i < phys.size and int(phys[i]) < area.end:
                return False
        return True

    def bank_array(self, phys: np.ndarray) -> np.ndarray:
        """Bank index of each (validated, in-RAM) uint64 address (int64).  O(n log banks)."""
        if len(self.counts) == 1:
            return np.zeros(phys.size, dtype=np.int64)
        return intervals.locate(self._first, self._end, phys >> np.uint64(self.memory.page_shift))

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

    def mark_unique_bits(self, order: int, rows: list[tuple[np.ndarray, np.ndarray]], bits_log2: int) -> None:
        """Strict mode, :meth:`mark_unique` for disjoint units of one ``order`` on a machine with
        one RAM bank (:attr:`single_bank`), given as packed bitmaps: ``rows`` of ``(bitmap indexes, packed bits uint8[n, 2**bits_log2
        / 8])``, bit ``b`` of bitmap ``i`` the unit number ``(i << bits_log2) + b``.  EEXIST at
        the lowest page already covered, changing nothing; else the pages' counts become 1.
        Sequential passes over the bitmaps' page spans instead of a gather and a scatter per
        page: O(bitmap bits << order)."""
        counts, first = self.counts[0], self.first_pfn[0]
        span = (1 << bits_log2) << order
        spans = []
        for index, bits in rows:
            for i, row in zip(index.tolist(), bits):
                lo = ((i << bits_log2) << order) - first
                a, b = max(lo, 0), min(lo + span, counts.size)
                units = np.unpackbits(row, bitorder="little").view(bool)
                pages = (units if order == 0 else np.repeat(units, 1 << order))[a - lo:b - lo]
                hit = np.logical_and(counts[a:b].view(bool), pages)
                if hit.any():
                    page = first + a + int(np.argmax(hit))
                    raise KHOError("EEXIST", f"page {page << self._page_shift:#x} is already preserved")
                spans.append((a, b, pages))
        for a, b, pages in spans:
            np.bitwise_or(counts[a:b], pages.view(np.uint8), out=counts[a:b])

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
        bank = intervals.locate(self._first, self._end, pfn).reshape(pfn.shape)
        for b in np.unique(bank[bank >= 0]).tolist():
            sel = np.flatnonzero(bank == b)
            out.flat[sel] = self.counts[b][(pfn.flat[sel] - self._first[b]).astype(np.int64)] != 0
        return out
