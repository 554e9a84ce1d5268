"""kho.memory.intervals against a model: a Python set of the integers covered."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho.memory import intervals
from kho.memory.intervals import IntervalSet
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea

#: Intervals in any order, overlapping, touching or empty: ``(start, length)``.
raw = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 30)), max_size=12)
dtypes = st.sampled_from([np.int64, np.uint64])
points = st.lists(st.integers(0, 240), max_size=20)


def covered(start, end) -> set[int]:
    return {x for s, e in zip(np.asarray(start).tolist(), np.asarray(end).tolist()) for x in range(s, e)}


def arrays(pairs, dtype):
    return np.array([s for s, _ in pairs], dtype=dtype), np.array([s + n for s, n in pairs], dtype=dtype)


def is_set(s, e, *, touching_allowed: bool) -> bool:
    """Sorted, non-empty, disjoint (and not touching unless allowed)."""
    apart = s[1:] >= e[:-1] if touching_allowed else s[1:] > e[:-1]
    return bool((e > s).all() and apart.all())


def interval_set(pairs, dtype):
    """A set of touching and non-touching intervals: the union, cut at some of the inputs' ends."""
    s, e = intervals.normalize(*arrays(pairs, dtype))
    return intervals.split_at(s, e, np.unique(arrays(pairs, dtype)[1]))


@settings(max_examples=200, deadline=None)
@given(raw, dtypes, st.booleans())
def test_normalize_is_the_union(pairs, dtype, merge_touching):
    s, e = intervals.normalize(*arrays(pairs, dtype), merge_touching=merge_touching)
    assert s.dtype == dtype and e.dtype == dtype
    assert covered(s, e) == covered(*arrays(pairs, dtype))
    assert is_set(s, e, touching_allowed=not merge_touching)
    a, b = arrays(pairs, dtype)
    lo, hi = a[a < b], b[a < b]
    assert intervals.within(s, e, lo, hi).all()  # every input inside one output interval
    for joint in e[:-1][e[:-1] == s[1:]].tolist():  # two outputs touch only where no input crosses
        assert not ((lo < joint) & (hi > joint)).any()


@settings(max_examples=200, deadline=None)
@given(raw, raw, dtypes)
def test_set_algebra_matches_sets(a, b, dtype):
    a_s, a_e = interval_set(a, dtype)
    b_s, b_e = interval_set(b, dtype)
    for op, want in ((intervals.intersect, covered(a_s, a_e) & covered(b_s, b_e)),
                     (intervals.subtract, covered(a_s, a_e) - covered(b_s, b_e))):
        s, e = op(a_s, a_e, b_s, b_e)
        assert covered(s, e) == want and s.dtype == dtype
        assert is_set(s, e, touching_allowed=True)
    # subtract keeps A's own boundaries: no piece crosses an end of A.
    s, e = intervals.subtract(a_s, a_e, b_s, b_e)
    assert not any(((s < x) & (e > x)).any() for x in a_e.tolist())
    union = IntervalSet.of(np.concatenate([a_s, b_s]), np.concatenate([a_e, b_e]))
    assert covered(union.start, union.end) == covered(a_s, a_e) | covered(b_s, b_e)
    assert union.size == len(covered(union.start, union.end))
    left = IntervalSet(a_s, a_e).subtract(IntervalSet(b_s, b_e))
    assert covered(left.start, left.end) == covered(a_s, a_e) - covered(b_s, b_e)


@settings(max_examples=200, deadline=None)
@given(raw, st.sets(st.integers(0, 240), max_size=8), dtypes)
def test_split_at_and_gaps(pairs, cuts, dtype):
    s0, e0 = interval_set(pairs, dtype)
    s, e = intervals.split_at(s0, e0, sorted(cuts))
    assert covered(s, e) == covered(s0, e0) and is_set(s, e, touching_allowed=True)
    assert not any(((s < p) & (e > p)).any() for p in cuts)
    g_s, g_e = intervals.gaps(s0, e0)
    if s0.size:
        hull = set(range(int(s0[0]), int(e0[-1])))
        assert covered(g_s, g_e) == hull - covered(s0, e0)
        assert is_set(g_s, g_e, touching_allowed=False)


@settings(max_examples=200, deadline=None)
@given(raw, st.lists(st.integers(0, 240), max_size=8), dtypes)
def test_merge_adjacent_joins_touching_except_at_barriers(pairs, barriers, dtype):
    s0, e0 = interval_set(pairs, dtype)
    walls = sorted(set(barriers))
    s, e = intervals.merge_adjacent(s0, e0, walls)
    assert covered(s, e) == covered(s0, e0) and is_set(s, e, touching_allowed=True)
    for left_end, right_start in zip(e[:-1].tolist(), s[1:].tolist()):
        assert left_end < right_start or left_end in walls  # touching only at a barrier
    assert set(s.tolist()) <= set(s0.tolist())  # nothing new is cut


@settings(max_examples=200, deadline=None)
@given(raw, points, st.lists(st.tuples(st.integers(0, 240), st.integers(1, 20)), max_size=10), dtypes)
def test_queries_match_sets(pairs, pts, spans, dtype):
    s, e = interval_set(pairs, dtype)
    model = covered(s, e)
    assert intervals.contains(s, e, pts).tolist() == [p in model for p in pts]
    where = intervals.locate(s, e, pts)
    for p, i in zip(pts, where.tolist()):
        assert (i == -1) if p not in model else (s[i] <= p < e[i])
    lo = [a for a, _ in spans]
    hi = [a + n for a, n in spans]
    pieces = [set(range(int(x), int(y))) for x, y in zip(s.tolist(), e.tolist())]
    assert intervals.overlaps(s, e, lo, hi).tolist() == [bool(set(range(x, y)) & model) for x, y in zip(lo, hi)]
    assert intervals.within(s, e, lo, hi).tolist() == [any(set(range(x, y)) <= p for p in pieces) for x, y in zip(lo, hi)]
    assert intervals.size(s, e) == len(model)
    assert intervals.points(s, e).tolist() == sorted(model)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 4)), max_size=12), dtypes)
def test_of_units(units, dtype):
    start = np.array([s for s, _ in units], dtype=dtype)
    order = np.array([o for _, o in units], dtype=np.uint8)
    s, e = intervals.of_units(start, order)
    assert s.dtype == dtype and (e - s).tolist() == [1 << o for _, o in units]
    one = IntervalSet.of(*intervals.of_units(start, 2))
    assert covered(one.start, one.end) == {x for p, _ in units for x in range(p, p + 4)}


@pytest.fixture
def memory():
    """Two touching banks and a third behind a hole; scratch areas touching each other and a bank edge."""
    mem = PhysicalMemory([Bank(0, 64 << 12), Bank(64 << 12, 64 << 12), Bank(256 << 12, 64 << 12)])
    mem.set_scratch([ScratchArea(8 << 12, 8 << 12), ScratchArea(16 << 12, 4 << 12), ScratchArea(120 << 12, 8 << 12),
                     ScratchArea(256 << 12, 1 << 12)])
    return mem


def test_machine_sets(memory):
    assert [x.tolist() for x in intervals.banks(memory)] == [[0, 64, 256], [64, 128, 320]]
    assert [x.tolist() for x in intervals.scratch(memory)] == [[8, 16, 120, 256], [16, 20, 128, 257]]
    s, e, in_scratch = intervals.ram_segments(memory)
    assert list(zip(s.tolist(), e.tolist(), in_scratch.tolist())) == [
        (0, 8, False), (8, 16, True), (16, 20, True), (20, 64, False), (64, 120, False), (120, 128, True),
        (256, 257, True), (257, 320, False)]
    s, e = intervals.usable(memory)
    assert s.dtype == np.int64
    assert list(zip(s.tolist(), e.tolist())) == [(0, 8), (20, 64), (64, 120), (257, 320)]
    assert intervals.within(s, e, [60], [68]).tolist() == [False]  # across the bank boundary


def test_empty_sets_keep_their_dtype():
    empty = np.empty(0, np.int64)
    for op in (intervals.intersect, intervals.subtract):
        assert op(empty, empty, [1], [2])[0].dtype == np.int64
    assert intervals.normalize([], [])[0].dtype == np.uint64
    assert intervals.contains(empty, empty, [0, 5]).tolist() == [False, False]
    assert intervals.within(empty, empty, [0], [1]).tolist() == [False]
    assert intervals.points(empty, empty).size == 0
