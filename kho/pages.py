"""Page geometry and the kernel's greedy split of a page range into buddy units.

Units used throughout kho: ``phys`` is a physical address in bytes, ``pfn`` a page
frame number (``phys >> page_shift``), ``order`` a power of two in pages (a unit of
order ``k`` is ``2**k`` pages, aligned to its own size), ``nr_pages`` a count of pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .errors import KHOError

#: Page sizes arm64 supports (bytes), with MAX_PAGE_ORDER for each granule
#: (arch/arm64/Kconfig ARCH_FORCE_MAX_ORDER defaults; inclusive since Linux 6.4).
MAX_PAGE_ORDER_BY_PAGE_SIZE = {4096: 10, 16384: 11, 65536: 13}


@dataclass(frozen=True)
class PageGeometry:
    """The page size of a modelled machine and the numbers that follow from it."""

    page_size: int = 4096

    def __post_init__(self):
        if self.page_size not in MAX_PAGE_ORDER_BY_PAGE_SIZE:
            sizes = ", ".join(str(s) for s in MAX_PAGE_ORDER_BY_PAGE_SIZE)
            raise KHOError("EINVAL", f"page size {self.page_size} not supported (one of {sizes})")

    @property
    def page_shift(self) -> int:
        """log2(page_size): 12, 14 or 16."""
        return self.page_size.bit_length() - 1

    @property
    def max_order(self) -> int:
        """MAX_PAGE_ORDER: the largest buddy order (10 for 4 KiB pages)."""
        return MAX_PAGE_ORDER_BY_PAGE_SIZE[self.page_size]

    def unit_bytes(self, order: int) -> int:
        """Bytes in a unit of ``order``."""
        return self.page_size << order

    def is_aligned(self, value: int) -> bool:
        """True when ``value`` (bytes) is a multiple of the page size."""
        return value & (self.page_size - 1) == 0


def ctz(value: int) -> int:
    """Count of trailing zero bits; 64 for 0, like the kernel's count_trailing_zeros on 64-bit."""
    if value == 0:
        return 64
    return (value & -value).bit_length() - 1


def greedy_split(pfn: int, nr_pages: int, max_order: int | None = None) -> Iterator[tuple[int, int]]:
    """Split ``nr_pages`` pages from ``pfn`` the way kho_preserve_pages does.

    Yields ``(pfn, order)`` with ``order = min(ctz(pfn), floor(log2(pages left)))``,
    capped at ``max_order`` when given (the kernel does not cap it, and then cannot
    restore units above MAX_PAGE_ORDER; kho caps it).  O(number of units).
    """
    end = pfn + nr_pages
    while pfn < end:
        order = min(ctz(pfn), (end - pfn).bit_length() - 1)
        if max_order is not None:
            order = min(order, max_order)
        yield pfn, order
        pfn += 1 << order


def greedy_split_array(start_pfn: np.ndarray, end_pfn: np.ndarray, max_order: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectorized :func:`greedy_split` of many disjoint ``[start, end)`` pfn ranges.

    Returns ``(pfn, order)`` arrays (uint64, uint8) in range order and, within a range,
    ascending address.  Cost O(units) numpy work in O(max_order + log(range)) rounds.
    """
    start = np.asarray(start_pfn, dtype=np.uint64).copy()
    end = np.asarray(end_pfn, dtype=np.uint64)
    range_id = np.arange(start.size, dtype=np.int64)
    out_pfn, out_order, out_range = [], [], []
    while start.size:
        left = end - start
        # floor(log2(left)) and ctz(start), capped at max_order.
        log_left = np.floor(np.log2(left.astype(np.float64))).astype(np.int64)
        # float log2 can round up just below a power of two: correct it exactly.
        too_big = (np.uint64(1) << log_left.astype(np.uint64)) > left
        log_left[too_big] -= 1
        low_bit = start & (~start + np.uint64(1))
        tz = np.where(start == 0, 64, np.log2(np.maximum(low_bit, 1).astype(np.float64))).astype(np.int64)
        order = np.minimum(np.minimum(tz, log_left), max_order)
        out_pfn.append(start.copy())
        out_order.append(order.astype(np.uint8))
        out_range.append(range_id)
        start = start + (np.uint64(1) << order.astype(np.uint64))
        more = start < end
        start, end, range_id = start[more], end[more], range_id[more]
    if not out_pfn:
        return np.empty(0, np.uint64), np.empty(0, np.uint8)
    pfn = np.concatenate(out_pfn)
    order = np.concatenate(out_order)
    rng = np.concatenate(out_range)
    sort = np.lexsort((pfn, rng))
    return pfn[sort], order[sort]
