"""Sets of pages as sorted, disjoint ``[start, end)`` pfn intervals (numpy arrays).

Used to describe what a kexec load must not touch (preserved units, KHO metadata pages)
and what it may use (scratch areas, a ``kexeckernel=`` region), and to answer
"does this range or page hit the set?" in O(log n).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PageRanges:
    """Sorted disjoint pfn intervals ``[start[i], end[i])`` (int64 arrays)."""

    start: np.ndarray
    end: np.ndarray

    @classmethod
    def empty(cls) -> "PageRanges":
        return cls(np.empty(0, np.int64), np.empty(0, np.int64))

    @classmethod
    def from_intervals(cls, start, end, merge_touching: bool = True) -> "PageRanges":
        """Union of possibly overlapping intervals; touching ones are merged unless
        ``merge_touching`` is False (to keep, say, adjacent scratch areas apart).  O(n log n)."""
        start = np.asarray(start, dtype=np.int64).reshape(-1)
        end = np.asarray(end, dtype=np.int64).reshape(-1)
        keep = end > start
        start, end = start[keep], end[keep]
        if not start.size:
            return cls.empty()
        order = np.argsort(start, kind="stable")
        start, end = start[order], end[order]
        reach = np.maximum.accumulate(end)
        new = np.r_[True, (start[1:] > reach[:-1]) if merge_touching else (start[1:] >= reach[:-1])]
        group = np.cumsum(new) - 1
        out_start = start[new]
        out_end = np.zeros(out_start.size, dtype=np.int64)
        np.maximum.at(out_end, group, end)
        return cls(out_start, out_end)

    @classmethod
    def from_units(cls, phys, orders, page_shift: int) -> "PageRanges":
        """The pages of units ``(phys bytes, order)``."""
        pfn = np.asarray(phys, dtype=np.uint64).astype(np.int64) >> page_shift
        return cls.from_intervals(pfn, pfn + np.left_shift(1, np.asarray(orders, dtype=np.int64)))

    @classmethod
    def from_pages(cls, phys, page_shift: int) -> "PageRanges":
        """The pages at ``phys`` (bytes)."""
        pfn = np.asarray(phys, dtype=np.uint64).astype(np.int64) >> page_shift
        return cls.from_intervals(pfn, pfn + 1)

    def union(self, other: "PageRanges") -> "PageRanges":
        return PageRanges.from_intervals(np.r_[self.start, other.start], np.r_[self.end, other.end])

    def __len__(self) -> int:
        return int(self.start.size)

    @property
    def nr_pages(self) -> int:
        return int((self.end - self.start).sum())

    def overlaps(self, first: int, last: int) -> bool:
        """True when some pfn of ``[first, last)`` is in the set.  O(log n)."""
        i = int(np.searchsorted(self.start, last, side="left")) - 1
        return i >= 0 and int(self.end[i]) > first

    def contains(self, pfn) -> np.ndarray:
        """Bool array: which ``pfn`` are in the set.  O(n log m)."""
        pfn = np.asarray(pfn, dtype=np.int64)
        i = np.searchsorted(self.start, pfn, side="right") - 1
        return (i >= 0) & (self.end[np.maximum(i, 0)] > pfn) if self.start.size else np.zeros(pfn.shape, bool)

    def subtract(self, other: "PageRanges") -> "PageRanges":
        """The pfns of ``self`` not in ``other``; ``self``'s own interval boundaries are kept.  O((n + m) log)."""
        if not len(other) or not len(self):
            return self
        points = np.unique(np.r_[self.start, self.end, other.start, other.end])
        lo, hi = points[:-1], points[1:]
        keep = self.contains(lo) & ~other.contains(lo)
        return PageRanges.from_intervals(lo[keep], hi[keep], merge_touching=False)

    def pages(self) -> np.ndarray:
        """Every pfn of the set (int64, ascending).  O(pages)."""
        if not len(self):
            return np.empty(0, np.int64)
        lengths = self.end - self.start
        offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return np.repeat(self.start, lengths) + offsets
