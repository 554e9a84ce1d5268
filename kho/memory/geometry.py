"""Page geometry and the kernel's greedy split of a page range into buddy units.

Units used throughout kho: ``phys`` is a physical address in bytes, ``pfn`` a page
frame number (``phys >> page_shift``), ``order`` a power of two in pages (a unit of
order ``k`` is ``2**k`` pages, aligned to its own size), ``nr_pages`` a count of pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from kho.errors import KHOError

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


def _floor_log2(values: np.ndarray) -> np.ndarray:
    """floor(log2(v)) of positive int64 values below 2**53 (exact through float64)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64) - 1


def _split_pieces(start: np.ndarray, end: np.ndarray, max_order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy split of sorted, disjoint runs each shorter than ``2 * 2**max_order`` pages:
    ``(pfn int64, order uint8, units per run)``.  Single pages are placed directly; longer
    runs take one numpy round per unit of the longest (at most about ``2 * max_order``),
    each round writing its units at their final positions: O(units), no sort."""
    rounds: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    active = np.flatnonzero(end - start > 1)
    cur = start[active]
    counts = np.ones(start.size, dtype=np.int64)
    counts[active] = 0
    while active.size:
        low_bit = cur & -cur
        tz = np.where(cur == 0, max_order, _floor_log2(np.maximum(low_bit, 1)))
        order = np.minimum(np.minimum(tz, _floor_log2(end[active] - cur)), max_order)
        rounds.append((active, cur, order))
        counts[active] += 1
        cur = cur + np.left_shift(1, order)
        more = cur < end[active]
        active, cur = active[more], cur[more]
    offsets = np.cumsum(counts) - counts
    out_pfn = np.empty(int(counts.sum()), dtype=np.int64)
    out_order = np.zeros(out_pfn.size, dtype=np.uint8)
    out_pfn[offsets] = start  # single pages, and the first unit of every longer run (overwritten below)
    for r, (idx, pfn, order) in enumerate(rounds):
        pos = offsets[idx] + r
        out_pfn[pos] = pfn
        out_order[pos] = order
    return out_pfn, out_order, counts


def greedy_split_bound(start_pfn: np.ndarray, end_pfn: np.ndarray, max_order: int) -> int:
    """An upper bound on the units :func:`greedy_split_array` makes of ``[start, end)`` pfn
    runs, computed without making them: per run ``floor(pages / 2**max_order) + 2 * max_order``
    (its whole blocks, plus at most ``max_order`` units before the first block boundary and as
    many after the last).  O(runs)."""
    start = np.asarray(start_pfn, dtype=np.int64)
    pages = np.asarray(end_pfn, dtype=np.int64) - start
    return int((pages >> max_order).sum()) + 2 * max_order * int(start.size)


def greedy_split_array(start_pfn: np.ndarray, end_pfn: np.ndarray, max_order: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectorized :func:`greedy_split` of disjoint ``[start, end)`` pfn runs (any order).

    Each unit has ``order = min(ctz(pfn), floor(log2(pages left)), max_order)``, as
    kho_preserve_pages splits (capped at MAX_PAGE_ORDER).  Returns ``(pfn int64, order
    uint8)``, run by run in the given order, ascending within a run.  A run holding whole ``2**max_order``-page blocks is cut into
    its head (up to the first block boundary), its blocks and its tail: the greedy split of
    the head and the tail alone is the same as within the run, and every block is one unit
    of ``max_order``, laid out with one ``arange``; the short pieces go through
    :func:`_split_pieces`.  O(units) work, no sort, however long a run claims to be.
    """
    start = np.asarray(start_pfn, dtype=np.int64)
    end = np.asarray(end_pfn, dtype=np.int64)
    block = 1 << max_order
    aligned = (start + (block - 1)) & -block
    blocks = np.where(aligned < end, (end - aligned) >> max_order, 0)
    long = np.flatnonzero(blocks > 0)
    if not long.size:
        return _split_pieces(start, end, max_order)[:2]
    # Pieces in address order: a long run's head, blocks and tail; any other run whole.
    slots = np.ones(start.size, dtype=np.int64)
    slots[long] = 3
    first = np.cumsum(slots) - slots
    piece_start = np.empty(int(slots.sum()), dtype=np.int64)
    piece_end = np.empty_like(piece_start)
    is_body = np.zeros(piece_start.size, dtype=bool)
    whole = slots == 1
    piece_start[first[whole]], piece_end[first[whole]] = start[whole], end[whole]
    at, body_end = first[long], aligned[long] + (blocks[long] << max_order)
    piece_start[at], piece_end[at] = start[long], aligned[long]
    piece_start[at + 1], piece_end[at + 1], is_body[at + 1] = aligned[long], body_end, True
    piece_start[at + 2], piece_end[at + 2] = body_end, end[long]
    keep = piece_end > piece_start
    piece_start, piece_end, is_body = piece_start[keep], piece_end[keep], is_body[keep]
    body, short = np.flatnonzero(is_body), np.flatnonzero(~is_body)

    short_pfn, short_order, short_counts = _split_pieces(piece_start[short], piece_end[short], max_order)
    counts = np.empty(piece_start.size, dtype=np.int64)
    counts[short] = short_counts
    counts[body] = (piece_end[body] - piece_start[body]) >> max_order
    offsets = np.cumsum(counts) - counts
    out_pfn = np.empty(int(counts.sum()), dtype=np.int64)
    out_order = np.empty(out_pfn.size, dtype=np.uint8)
    for idx, n, pfn in ((short, short_counts, short_pfn), (body, counts[body], None)):
        within = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
        pos = np.repeat(offsets[idx], n) + within
        if pfn is None:  # blocks: one unit of max_order each
            out_pfn[pos] = np.repeat(piece_start[idx], n) + (within << max_order)
            out_order[pos] = max_order
        else:
            out_pfn[pos] = pfn
            out_order[pos] = short_order
    return out_pfn, out_order
