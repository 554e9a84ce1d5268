"""Vectorized set operations on half-open integer intervals ``[start, end)``.

The next kernel handles millions of ranges (preserved units, free runs, memblock
regions); these helpers work on pairs of ``uint64`` numpy arrays and never loop in
Python over the intervals.  The unit (bytes or pfns) is whatever the caller uses.

"Normalized" intervals are sorted by start, non-empty, and neither overlap nor touch
(``end[i] < start[i + 1]``).
"""

from __future__ import annotations

import numpy as np

_EMPTY = np.empty(0, dtype=np.uint64)


def as_u64(values) -> np.ndarray:
    """``values`` as a 1-D uint64 array (no copy when it already is one)."""
    return np.asarray(values, dtype=np.uint64).reshape(-1)


def normalize(start, end) -> tuple[np.ndarray, np.ndarray]:
    """The union of intervals as normalized intervals.

    Empty intervals are dropped; overlapping or touching ones are merged.  O(n) when
    the input is sorted by start, O(n log n) otherwise.
    """
    s, e = as_u64(start), as_u64(end)
    keep = e > s
    if not keep.all():
        s, e = s[keep], e[keep]
    if s.size == 0:
        return _EMPTY, _EMPTY
    if s.size > 1 and (s[1:] < s[:-1]).any():
        order = np.argsort(s, kind="stable")
        s, e = s[order], e[order]
    run_end = np.maximum.accumulate(e)
    new = np.empty(s.size, dtype=bool)
    new[0] = True
    np.greater(s[1:], run_end[:-1], out=new[1:])
    first = np.flatnonzero(new)
    last = np.empty_like(first)
    last[:-1] = first[1:] - 1
    last[-1] = s.size - 1
    return s[first], run_end[last]


def _pieces(a_s, a_e, lo, cnt, inner_start, inner_end):
    """Shared expansion of :func:`subtract` and :func:`split_at`.

    Interval ``i`` of A becomes ``cnt[i] + 1`` candidate pieces; piece ``k`` starts at
    ``a_s[i]`` (k = 0) or ``inner_end[lo[i] + k - 1]`` and ends at ``a_e[i]`` (k = cnt[i])
    or ``inner_start[lo[i] + k]``.  Empty pieces are dropped.  Returns the pieces' starts,
    ends and owning interval ``i``.
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
    """A and B, as pieces of A clipped to B.  Both sorted and disjoint; the result is sorted
    and disjoint.  O(|B| log |A| + pieces): cheap when B is small."""
    a_s, a_e, b_s, b_e = as_u64(a_start), as_u64(a_end), as_u64(b_start), as_u64(b_end)
    if a_s.size == 0 or b_s.size == 0:
        return _EMPTY, _EMPTY
    lo = np.searchsorted(a_e, b_s, side="right")  # first A ending after each B start
    hi = np.searchsorted(a_s, b_e, side="left")  # first A starting at or after each B end
    cnt = np.maximum(hi - lo, 0).astype(np.int64)
    owner = np.repeat(np.arange(b_s.size), cnt)
    j = np.repeat(lo, cnt) + np.arange(owner.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    ps, pe = np.maximum(a_s[j], b_s[owner]), np.minimum(a_e[j], b_e[owner])
    keep = pe > ps
    return ps[keep], pe[keep]


def subtract(a_start, a_end, b_start, b_end) -> tuple[np.ndarray, np.ndarray]:
    """A minus B.  A must be sorted and disjoint, B normalized; the result is sorted and
    disjoint (touching pieces are not merged).  O(min(|A|, |B|) log max(|A|, |B|) + pieces)."""
    a_s, a_e, b_s, b_e = as_u64(a_start), as_u64(a_end), as_u64(b_start), as_u64(b_end)
    if a_s.size == 0 or b_s.size == 0:
        return a_s, a_e
    if b_s.size > a_s.size:  # A meets B's gaps
        top = np.uint64((1 << 64) - 1)
        gap_s = np.concatenate([[np.uint64(0)], b_e])
        gap_e = np.concatenate([b_s, [top]])
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
    """Split sorted disjoint intervals at every point strictly inside one.  ``points``
    sorted and unique.  O(n log p + pieces)."""
    s, e, p = as_u64(start), as_u64(end), as_u64(points)
    if s.size == 0 or p.size == 0:
        return s, e
    lo = np.searchsorted(p, s, side="right")
    hi = np.searchsorted(p, e, side="left")
    cnt = (hi - lo).astype(np.int64)
    hit = cnt > 0
    if not hit.any():
        return s, e
    return _replace(s, e, hit, _pieces(s[hit], e[hit], lo[hit], cnt[hit], p, p))
