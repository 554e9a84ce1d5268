"""What the two preservation trackers share, whatever keeps their bits.

The 6.16 :class:`~kho.currentkernel.tracker.Tracker` (per-order bitmaps in XArrays) and
the 7.x :class:`~kho.currentkernel.radix_tracker.RadixTracker` (the live KHO radix tree)
answer the same questions the same way: a :class:`~kho.currentkernel.cover.PageCover`
says which pages are preserved, a page range is preserved as the units
:meth:`TrackerBase.split` cuts it into, and kernel-compatible mode drops the units of a
batch that are already set.  Each tracker supplies its bits: :meth:`TrackerBase.split`,
``preserve_many``, ``unpreserve_many``, ``units_array``, ``_test_bit`` and
``_orders_present``.

Units: ``phys`` in bytes, ``pfn`` page frame numbers, ``order`` log2 of pages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable

import numpy as np

from kho.currentkernel.batches import new_units
from kho.currentkernel.cover import PageCover
from kho.errors import KHOError
from kho.memory import intervals
from kho.memory.physical import PhysicalMemory


class TrackerBase(ABC):
    """A preservation tracker over ``memory``: counts, page-cover queries and the range
    entry points.  ``strict``: refuse (EEXIST) a unit covering a preserved page; False is
    the kernel's way."""

    #: Bitmap bits scattered per numpy pass when setting or clearing bits in bulk.
    _DENSE_BITS = 1 << 28

    def __init__(self, memory: PhysicalMemory, strict: bool):
        self.memory = memory
        self.strict = strict
        self._page_shift = memory.page_shift
        self._page_size = memory.page_size
        self._nr_units = 0
        self._nr_pages = 0
        self._cover = PageCover(memory)

    # -- what each tracker supplies -------------------------------------------------------
    @abstractmethod
    def split(self, phys: int, nr_pages: int) -> tuple[np.ndarray, np.ndarray]:
        """The units ``(phys uint64, order)`` a page range is preserved as."""

    @abstractmethod
    def preserve_many(self, phys, orders=0) -> None:
        """Preserve a batch of units, all or nothing."""

    @abstractmethod
    def unpreserve_many(self, phys, orders=0) -> None:
        """Unpreserve a batch of exact units, all or nothing."""

    @abstractmethod
    def units_array(self) -> tuple[np.ndarray, np.ndarray]:
        """All preserved units as ``(phys uint64, order uint8)`` sorted by address."""

    @abstractmethod
    def _locate_unit(self, phys: int, order: int) -> tuple[int, int]:
        """Check one unit (its order, then :meth:`~kho.currentkernel.cover.PageCover.locate_unit`)
        and return ``(bank index, pfn offset in bank)``."""

    @abstractmethod
    def _test_bit(self, phys: int, order: int) -> bool:
        """True when the unit ``(phys, order)`` itself is preserved."""

    @abstractmethod
    def _orders_present(self) -> Iterable[int]:
        """The orders that may hold preserved units, ascending."""

    def _check_mutable(self) -> None:
        """EBUSY once the preserved memory may no longer change; never, unless overridden."""

    # -- sizes ----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of preserved units."""
        return self._nr_units

    @property
    def nr_pages(self) -> int:
        """Number of preserved pages (sum of ``2**order`` over units)."""
        return self._nr_pages

    # -- ranges ---------------------------------------------------------------------------
    def _page_range(self, phys: int, nr_pages: int) -> tuple[int, int]:
        """The pfns ``[first, end)`` of ``nr_pages`` pages from byte ``phys``; EINVAL unless
        ``phys`` is page-aligned, ``nr_pages`` positive and every page inside RAM (what
        :meth:`split` checks first, before making any unit).  O(banks)."""
        if phys < 0 or phys & (self._page_size - 1):
            raise KHOError("EINVAL", f"{phys:#x} is not page-aligned")
        if nr_pages <= 0:
            raise KHOError("EINVAL", f"a range needs at least one page, not {nr_pages}")
        first = phys >> self._page_shift
        starts, ends = intervals.banks(self.memory, np.int64)
        inside = np.clip(np.minimum(ends, first + nr_pages) - np.maximum(starts, first), 0, None).sum()
        if inside != nr_pages:
            raise KHOError("EINVAL", f"pages {first:#x}+{nr_pages:#x} are not all inside RAM")
        return first, first + nr_pages

    def preserve_pages(self, phys: int, nr_pages: int) -> None:
        """Preserve ``nr_pages`` pages from ``phys`` as :meth:`split` cuts them (kho_preserve_pages)."""
        self._check_mutable()
        self.preserve_many(*self.split(phys, nr_pages))

    def unpreserve_pages(self, phys: int, nr_pages: int) -> None:
        """Undo :meth:`preserve_pages` of the same range (the same split)."""
        self._check_mutable()
        self.unpreserve_many(*self.split(phys, nr_pages))

    def preserve_phys(self, phys: int, size: int) -> None:
        """Preserve ``size`` bytes from ``phys``; both must be page-aligned (kho_preserve_phys)."""
        self._check_mutable()
        if size & (self._page_size - 1):
            raise KHOError("EINVAL", f"size {size:#x} is not page-aligned")
        self.preserve_pages(phys, size >> self._page_shift)

    # -- one unit, batches ------------------------------------------------------------------
    def _claim_unit(self, phys: int, order: int) -> tuple[int, int] | None:
        """A unit about to be preserved, checked and counted in the page cover: ``(bank
        index, pfn offset in bank)``, or None (nothing counted) in kernel-compatible mode
        when that exact unit is preserved already (a no-op).  Strict mode: EEXIST when it
        covers a preserved page.  The caller undoes the count if it then fails.  O(2**order)."""
        bank, off = self._locate_unit(phys, order)
        nr = 1 << order
        if self._cover.claim(bank, off, nr):
            return bank, off
        if self.strict:
            what = "is already preserved" if order == 0 else "overlaps memory that is already preserved"
            raise KHOError("EEXIST", f"{phys:#x} order {order} {what}")
        if self._test_bit(phys, order):
            return None
        self._cover.add(bank, off, nr, 1)
        return bank, off

    def _drop_already_set(self, phys: np.ndarray, orders: np.ndarray, bank: np.ndarray):
        """Kernel-compatible mode: drop units named twice in the batch or whose bit is set
        (:func:`~kho.currentkernel.batches.new_units`)."""
        keep = new_units(phys, orders, self._test_bit)
        return phys[keep], orders[keep], bank[keep]

    # -- queries --------------------------------------------------------------------------
    def is_preserved(self, phys: int) -> bool:
        """True when the page holding byte ``phys`` is covered by a preserved unit.  O(log banks)."""
        return self._cover.is_preserved(phys)

    def is_preserved_array(self, phys: np.ndarray) -> np.ndarray:
        """Vectorized :meth:`is_preserved` (bool array).  O(n log banks)."""
        return self._cover.is_preserved_array(phys)

    def unit_at(self, phys: int) -> tuple[int, int] | None:
        """The preserved unit ``(phys, order)`` covering byte ``phys`` (lowest order first), or None."""
        if not self.is_preserved(phys):
            return None
        for order in self._orders_present():
            head = phys & ~((self._page_size << order) - 1)
            if self._test_bit(head, order):
                return head, order
        return None

    def units(self) -> list[tuple[int, int]]:
        """All preserved units as sorted ``(phys, order)`` pairs."""
        phys, orders = self.units_array()
        return list(zip(phys.tolist(), orders.tolist()))
