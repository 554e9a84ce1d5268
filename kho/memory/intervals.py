"""Sets of integers as sorted, disjoint half-open intervals ``[start[i], end[i])``.

The one interval module of kho.  Preserved units, free runs, memblock regions, RAM
banks, scratch areas, kexec destinations and page-table ids are all sets of pfns (or
bytes) that run to millions of intervals, so every operation here works on a pair of
1-D numpy arrays ``(start, end)`` and never loops in Python over the intervals.  The
unit (bytes or pfns) is the caller's.

Conventions, for every function:

* An **interval set** is sorted by start, made of non-empty intervals that do not
  overlap (``end[i] <= start[i + 1]``).  Touching intervals (``end[i] == start[i + 1]``)
  are allowed: they keep boundaries apart that matter to the caller (two RAM banks, two
  scratch areas).  A **normalized** set has no touching intervals either
  (:func:`normalize`).
* Arrays are int64 or uint64 and keep their dtype: the result has the dtype of the
  first interval argument, and the other arguments are converted to it.  Anything that
  is not such an array (a list, a scalar) becomes uint64.  Values are never negative.
* Complexity is stated in numpy work: ``n`` and ``m`` are the two sets' sizes, ``k``
  the size of the result.

:class:`IntervalSet` holds one set for code that passes sets around (the kexec load);
the functions are what it calls.  The machine's own sets (RAM banks, scratch areas,
RAM cut at scratch boundaries, RAM minus scratch) come from :func:`banks`,
:func:`scratch`, :func:`ram_segments` and :func:`usable`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kho.memory.physical import PhysicalMemory

_INTEGER_DTYPES = (np.dtype(np.int64), np.dtype(np.uint64))


def as_u64(values) -> np.ndarray:
    """``values`` as a 1-D uint64 array (no copy when it already is one).  O(n)."""
    return np.asarray(values, dtype=np.uint64).reshape(-1)


def _array(values, like: np.ndarray | None = None) -> np.ndarray:
    """``values`` as a 1-D array of ``like``'s dtype; without ``like``, an int64 or uint64
    array keeps its dtype and anything else becomes uint64.  O(n), no copy when possible."""
    if like is not None:
        return np.asarray(values, dtype=like.dtype).reshape(-1)
    if isinstance(values, np.ndarray) and values.dtype in _INTEGER_DTYPES:
        return values.reshape(-1)
    return as_u64(values)


def _pair(start, end) -> tuple[np.ndarray, np.ndarray]:
    s = _array(start)
    return s, _array(end, s)


def _empty(like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return like[:0], like[:0]


# -- building sets ---------------------------------------------------------------------------
def normalize(start, end, *, merge_touching: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The union of intervals given in any order, overlaps allowed, as an interval set.

    Empty intervals are dropped and overlapping ones merged; touching ones are merged too
    unless ``merge_touching`` is False (to keep, say, adjacent scratch areas apart).
    O(n) when the input is sorted by start, O(n log n) otherwise.
    """
    s, e = _pair(start, end)
    keep = e > s
    if not keep.all():
        s, e = s[keep], e[keep]
    if s.size == 0:
        return s, e
    if s.size > 1 and (s[1:] < s[:-1]).any():
        order = np.argsort(s, kind="stable")
        s, e = s[order], e[order]
    run_end = np.maximum.accumulate(e)
    new = np.empty(s.size, dtype=bool)
    new[0] = True
    (np.greater if merge_touching else np.greater_equal)(s[1:], run_end[:-1], out=new[1:])
    first = np.flatnonzero(new)
    last = np.empty_like(first)
    last[:-1] = first[1:] - 1
    last[-1] = s.size - 1
    return s[first], run_end[last]


def merge_adjacent(start, end, barriers=()) -> tuple[np.ndarray, np.ndarray]:
    """An interval set with touching intervals joined, except where they touch at one of
    ``barriers`` (sorted points, e.g. the first pfn of every RAM bank).  O(n log b)."""
    s, e = _pair(start, end)
    if not s.size:
        return s, e
    joins = s[1:] == e[:-1]
    if not joins.any():
        return s, e
    wall = _array(barriers, s)
    if wall.size:
        at = s[1:]
        joins &= wall[np.minimum(np.searchsorted(wall, at), wall.size - 1)] != at
    keep = np.flatnonzero(~joins)
    firsts = np.concatenate([[0], keep + 1])
    lasts = np.concatenate([keep, [s.size - 1]])
    return s[firsts], e[lasts]


def of_units(start, order) -> tuple[np.ndarray, np.ndarray]:
    """The intervals ``[start, start + 2**order)`` of units (pfns and orders), unsorted
    as given.  O(n); a single order is applied as a scalar."""
    s = _array(start)
    order = np.asarray(order).reshape(-1)
    if order.size and (order == order[0]).all():
        return s, s + s.dtype.type(1 << int(order[0]))
    return s, s + np.left_shift(1, order.astype(s.dtype))


# -- set algebra -----------------------------------------------------------------------------
def _pieces(a_s, a_e, lo, cnt, inner_start, inner_end):
    """Shared expansion of :func:`subtract` and :func:`split_at`.

    Interval ``i`` of A becomes ``cnt[i] + 1`` candidate pieces; piece ``k`` starts at
    ``a_s[i]`` (k = 0) or ``inner_end[lo[i] + k - 1]`` and ends at ``a_e[i]`` (k = cnt[i])
    or ``inner_start[lo[i] + k]``.  Empty pieces are dropped.  Returns the pieces' starts,
    ends and owning interval ``i``.  O(pieces).
    """
    rep = cnt + 1
    owner = np.repeat(np.arange(a_s.size), rep)
    k = np.arange(owner.size) - np.repeat(np.cumsum(rep) - rep, rep)
    j = lo[owner] + k
    ps = np.where(k == 0, a_s[owner], inner_end[np.maximum(j - 1, 0)])
    pe = np.where(k == cnt[owner], a_e[owner], inner_start[np.minimum(j, inner_start.size - 1)])
    keep = pe > ps
    return ps[keep], pe[keep], owner[keep]


def _replace(s, e, hit, pieces):
    """``(s, e)`` with each interval flagged in ``hit`` replaced by its pieces, in order.  O(n)."""
    ps, pe, owner = pieces
    hit_idx = np.flatnonzero(hit)
    pos = hit_idx[owner] - owner  # index in the array without the replaced intervals
    return np.insert(s[~hit], pos, ps), np.insert(e[~hit], pos, pe)


def intersect(a_start, a_end, b_start, b_end) -> tuple[np.ndarray, np.ndarray]:
    """A and B, as pieces of A clipped to B; both interval sets, and so is the result.
    O(m log n + k): cheap when B is small."""
    a_s, a_e = _pair(a_start, a_end)
    b_s, b_e = _array(b_start, a_s), _array(b_end, a_s)
    if a_s.size == 0 or b_s.size == 0:
        return _empty(a_s)
    lo = np.searchsorted(a_e, b_s, side="right")  # first A ending after each B start
    hi = np.searchsorted(a_s, b_e, side="left")  # first A starting at or after each B end
    cnt = np.maximum(hi - lo, 0).astype(np.int64)
    owner = np.repeat(np.arange(b_s.size), cnt)
    j = np.repeat(lo, cnt) + np.arange(owner.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    ps, pe = np.maximum(a_s[j], b_s[owner]), np.minimum(a_e[j], b_e[owner])
    keep = pe > ps
    return ps[keep], pe[keep]


def subtract(a_start, a_end, b_start, b_end) -> tuple[np.ndarray, np.ndarray]:
    """A minus B, both interval sets.  A's own boundaries are kept: the pieces of two
    touching intervals of A stay apart, and nothing is merged.
    O(min(n, m) log max(n, m) + k)."""
    a_s, a_e = _pair(a_start, a_end)
    b_s, b_e = _array(b_start, a_s), _array(b_end, a_s)
    if a_s.size == 0 or b_s.size == 0:
        return a_s, a_e
    if b_s.size > a_s.size:  # A meets B's gaps
        ends = np.array([0, np.iinfo(a_s.dtype).max], dtype=a_s.dtype)
        gap_s = np.concatenate([ends[:1], b_e])
        gap_e = np.concatenate([b_s, ends[1:]])
        keep = gap_e > gap_s
        return intersect(gap_s[keep], gap_e[keep], a_s, a_e)
    lo = np.searchsorted(b_e, a_s, side="right")  # first B ending after a_s
    hi = np.searchsorted(b_s, a_e, side="left")  # first B starting at or after a_e
    cnt = (hi - lo).astype(np.int64)
    hit = cnt > 0
    if not hit.any():
        return a_s, a_e
    return _replace(a_s, a_e, hit, _pieces(a_s[hit], a_e[hit], lo[hit], cnt[hit], b_s, b_e))


def split_at(start, end, points) -> tuple[np.ndarray, np.ndarray]:
    """An interval set split at every one of ``points`` (sorted, unique) strictly inside
    an interval.  O(n log p + k)."""
    s, e = _pair(start, end)
    p = _array(points, s)
    if s.size == 0 or p.size == 0:
        return s, e
    lo = np.searchsorted(p, s, side="right")
    hi = np.searchsorted(p, e, side="left")
    cnt = (hi - lo).astype(np.int64)
    hit = cnt > 0
    if not hit.any():
        return s, e
    return _replace(s, e, hit, _pieces(s[hit], e[hit], lo[hit], cnt[hit], p, p))


def gaps(start, end) -> tuple[np.ndarray, np.ndarray]:
    """The non-empty gaps between consecutive intervals of a set.  O(n)."""
    s, e = _pair(start, end)
    hole = e[:-1] < s[1:]
    return e[:-1][hole], s[1:][hole]


# -- queries ---------------------------------------------------------------------------------
def locate(start, end, points) -> np.ndarray:
    """Index (int64) of the interval holding each point, -1 for a point in none.
    O(p log n)."""
    s, e = _pair(start, end)
    p = _array(points, s)
    i = np.searchsorted(s, p, side="right").astype(np.int64) - 1
    if not s.size:
        return i
    return np.where(e[np.maximum(i, 0)] > p, i, -1)


def contains(start, end, points) -> np.ndarray:
    """Bool per point: inside some interval of the set.  O(p log n)."""
    return locate(start, end, points) >= 0


def within(start, end, lo, hi) -> np.ndarray:
    """Bool per non-empty span ``[lo, hi)``: inside one interval of the set (a span across
    two touching intervals is not).  O(p log n)."""
    s, e = _pair(start, end)
    lo, hi = _array(lo, s), _array(hi, s)
    i = np.searchsorted(s, lo, side="right") - 1
    if not s.size:
        return np.zeros(lo.shape, dtype=bool)
    return (i >= 0) & (hi <= e[np.maximum(i, 0)])


def overlaps(start, end, lo, hi) -> np.ndarray:
    """Bool per non-empty span ``[lo, hi)``: shares a point with the set.  O(p log n)."""
    s, e = _pair(start, end)
    lo, hi = _array(lo, s), _array(hi, s)
    i = np.searchsorted(s, hi, side="left") - 1
    if not s.size:
        return np.zeros(lo.shape, dtype=bool)
    return (i >= 0) & (e[np.maximum(i, 0)] > lo)


def size(start, end) -> int:
    """Points in the set (the sum of the lengths).  O(n)."""
    s, e = _pair(start, end)
    return int((e - s).sum())


def points(start, end) -> np.ndarray:
    """Every point of the set, ascending, in the set's dtype.  O(size)."""
    s, e = _pair(start, end)
    lengths = (e - s).astype(np.int64)
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(s, lengths) + offsets.astype(s.dtype)


# -- the machine's sets ----------------------------------------------------------------------
def banks(memory: PhysicalMemory, dtype=np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """The RAM banks as pfn intervals (touching banks kept apart).  O(banks)."""
    shift = memory.page_shift
    return (np.array([b.start >> shift for b in memory.banks], dtype=dtype),
            np.array([b.end >> shift for b in memory.banks], dtype=dtype))


def scratch(memory: PhysicalMemory, dtype=np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """The scratch areas as pfn intervals (touching areas kept apart).  O(areas)."""
    shift = memory.page_shift
    return (np.array([a.addr >> shift for a in memory.scratch], dtype=dtype),
            np.array([a.end >> shift for a in memory.scratch], dtype=dtype))


def ram_segments(memory: PhysicalMemory, dtype=np.uint64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAM cut at every bank and scratch-area boundary: pfn intervals ``(start, end)`` and
    a bool per interval, True for the pieces inside a scratch area.  Buddies never merge
    across these boundaries.  O((banks + areas) log areas)."""
    area_s, area_e = scratch(memory, dtype)
    s, e = split_at(*banks(memory, dtype), np.unique(np.concatenate([area_s, area_e])))
    return s, e, contains(area_s, area_e, s)


def usable(memory: PhysicalMemory, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """RAM minus the scratch areas, as pfn intervals: where preserved memory may lie.
    Pieces of two banks never merge.  O((banks + areas) log areas)."""
    return subtract(*banks(memory, dtype), *scratch(memory, dtype))


@dataclass(frozen=True)
class IntervalSet:
    """One interval set ``[start[i], end[i])`` (see the module docstring), for code that
    passes sets around.  Immutable: every operation returns a new set."""

    start: np.ndarray
    end: np.ndarray

    @classmethod
    def of(cls, start, end, *, merge_touching: bool = True) -> "IntervalSet":
        """The union of intervals in any order (:func:`normalize`).  O(n log n)."""
        return cls(*normalize(start, end, merge_touching=merge_touching))

    def __len__(self) -> int:
        return int(self.start.size)

    @property
    def size(self) -> int:
        """Points in the set.  O(n)."""
        return size(self.start, self.end)

    def subtract(self, other: "IntervalSet") -> "IntervalSet":
        """:func:`subtract`: this set's own boundaries are kept."""
        return IntervalSet(*subtract(self.start, self.end, other.start, other.end))

    def contains(self, pts) -> np.ndarray:
        """:func:`contains`."""
        return contains(self.start, self.end, pts)

    def within(self, lo, hi) -> np.ndarray:
        """:func:`within`."""
        return within(self.start, self.end, lo, hi)

    def overlaps(self, lo, hi) -> np.ndarray:
        """:func:`overlaps`."""
        return overlaps(self.start, self.end, lo, hi)
