"""What the kernel's memblock does for the preserved units, counted exactly, and its time.

:mod:`kho.nextkernel.memblock` gets the *end state* of memblock right with O(n) numpy
work; this module counts the *work* the kernel's own algorithm (``mm/memblock.c`` as in
the kernels KHO runs on, 6.16 .. 7.3) does to get there, one ``memblock_reserve`` +
``memblock_reserved_mark_noinit`` per unit in the order the next kernel walks the map
(:func:`walk_order`):

* ``memblock_add_range`` (reserve): one linear scan of ``memblock.reserved`` from the
  first region up to the first region at or past the unit's end; when the array is more
  than half full (``2 * cnt + 1 > max``) a counting scan first, then the array doubles
  while the count would not fit, then the inserting scan; the insert shifts the regions
  above it (``memmove``); ``memblock_merge_regions`` over the inserted region and its two
  neighbours (the new region has flags 0, so it merges only with touching flag-0 regions);
* ``memblock_reserved_mark_noinit`` (``memblock_setclr_flag`` on ``reserved``):
  ``memblock_isolate_range`` doubles the array while ``cnt + 2 > max``, scans from the first
  region, splits a region that crosses the unit's ends (undoing the flag-0 merge above),
  sets ``MEMBLOCK_RSRV_NOINIT`` and merges with touching NOINIT regions (the units
  already walked that are physically adjacent).

Counting is exact for that algorithm and needs no loop over regions: with the units
disjoint from each other and from the regions reserved before the walk ("base"
regions), the region count before unit ``i`` is ``B + sum(v[s] for s < i)`` and the
regions below it ``below_base(i) + sum(v[s] for s < i if addr[s] < addr[i])``, where
``v[s] = 1 - (NOINIT merges unit s made)``.  The second sum is computed over the
ascending runs of the walk (the radix walk has one run per order) with sorted
prefix sums: O(R n + n log n) numpy work for n units in R ascending runs, about a
second for 4M units.

One thing is left out on purpose, in the counts and in the direct simulation the tests
check them against: ``memblock_double_array`` takes its new array from memblock and frees
the old one (a ``memblock_reserve`` and ``memblock_free`` among the next kernel's early
allocations in scratch, O(log n) times in a walk); only the doubling and the entries it
copies are counted, not those two calls' own scans.

Units: addresses and sizes in bytes, counts in region visits (loop iterations that read
one ``struct memblock_region``) and regions moved (entries shifted by ``memmove`` or
copied by a doubling), times in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from kho.abi.kexec_handover import (
    KHO_FDT_COMPATIBLE_V1,
    KHO_FDT_COMPATIBLES,
    RadixGeometry,
)
from kho.errors import KHOError
from kho.kexec.timing import NextKernelCosts
from kho.memory import intervals
from kho.nextkernel.memblock import MemblockFlag

#: ``INIT_MEMBLOCK_RESERVED_REGIONS``: entries of the static ``memblock.reserved`` array.
INIT_MEMBLOCK_RESERVED_REGIONS = 128
#: Root compatibles whose map is the radix tree (walked highest order first).
RADIX_COMPATIBLES = tuple(c for c in KHO_FDT_COMPATIBLES if c != KHO_FDT_COMPATIBLE_V1)
#: Deserialization paths (as :data:`kho.nextkernel.boot.PATHS`).
MEMBLOCK_PATH, INSTRUCTIONS_PATH = "memblock", "instructions"


def walk_order(phys: np.ndarray, order: np.ndarray, compatible: str) -> np.ndarray:
    """Indices of the units ``(phys, order)`` in the order the next kernel reserves them.

    * radix tree (``kho-v2`` .. ``kho-v4``): keys ascending, i.e. the highest order first
      and addresses ascending within an order;
    * ``kho-v1``: the chunk list, orders ascending (one run of chunks per order) and
      addresses ascending within an order;
    * any other map (ranges, maple, the instruction stream): by address.
    O(n log n).
    """
    phys = np.asarray(phys, dtype=np.uint64)
    order = np.asarray(order, dtype=np.int64)
    if compatible in RADIX_COMPATIBLES:
        return np.lexsort((phys, -order))
    if compatible == KHO_FDT_COMPATIBLE_V1:
        return np.lexsort((phys, order))
    return np.argsort(phys, kind="stable")


def radix_pages(phys: np.ndarray, order: np.ndarray, page_shift: int = 12) -> int:
    """Pages of the kho-v2 .. v4 radix tree holding the units: leaves plus inner nodes on
    every level (the tree a kernel builds for exactly these units).  O(n log n)."""
    if not np.asarray(phys).size:
        return 1  # the root
    geo = RadixGeometry(page_shift)
    order = np.asarray(order, dtype=np.uint64)
    keys = (np.uint64(1) << (np.uint64(geo.order0_log2) - order)) | (np.asarray(phys, np.uint64) >> (np.uint64(page_shift) + order))
    # a node on level l holds the keys sharing key >> (BITMAP_LOG2 + l * TABLE_LOG2); the root's shift is below 64
    return sum(int(np.unique(keys >> np.uint64(geo.bitmap_log2 + level * geo.table_log2)).size)
               for level in range(geo.depth))


@dataclass(frozen=True)
class MemblockCounts:
    """The work of one walk's ``memblock_reserve`` + ``memblock_reserved_mark_noinit`` calls.

    ``*_scan_visits``: iterations of the ``for_each_memblock_type`` loops (reserve: both
    passes); ``*_merge_iterations``: iterations of ``memblock_merge_regions``;
    ``*_regions_moved``: entries shifted by ``memmove`` (insert, merge, split);
    ``*_doubling_copied``: entries copied by ``memblock_double_array`` in that call.
    """

    units: int
    base_regions: int
    counting_passes: int
    reserve_scan_visits: int
    reserve_merge_iterations: int
    reserve_regions_moved: int
    reserve_doubling_copied: int
    isolate_scan_visits: int
    noinit_merge_iterations: int
    noinit_regions_moved: int
    noinit_doubling_copied: int
    doublings: int
    final_regions: int
    final_max: int

    @property
    def region_visits(self) -> int:
        """Every loop iteration that read a region: scans and merges of both calls."""
        return (self.reserve_scan_visits + self.reserve_merge_iterations + self.isolate_scan_visits
                + self.noinit_merge_iterations)

    @property
    def regions_moved(self) -> int:
        """Entries moved: memmoves and doubling copies of both calls."""
        return (self.reserve_regions_moved + self.reserve_doubling_copied + self.noinit_regions_moved
                + self.noinit_doubling_copied)

    def to_dict(self) -> dict:
        return {**asdict(self), "memblock_region_visits": self.region_visits, "memblock_regions_moved": self.regions_moved}


def _earlier_below_sums(addr: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``out[i] = sum(weight[s] for s < i if addr[s] < addr[i])`` (addresses distinct).

    Over the maximal ascending runs of ``addr``: within a run every earlier element is
    below; earlier runs are kept merged in one sorted array with prefix sums of their
    weights.  O(R n + n log n) for R runs."""
    n = addr.size
    out = np.zeros(n, dtype=np.int64)
    if n == 0:
        return out
    cuts = np.flatnonzero(addr[1:] < addr[:-1]) + 1
    bounds = np.concatenate([[0], cuts, [n]])
    seen = addr[:0]
    seen_w = weight[:0]
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        a, w = addr[lo:hi], weight[lo:hi]
        prefix = np.concatenate([[0], np.cumsum(seen_w, dtype=np.int64)])
        at = np.searchsorted(seen, a)
        out[lo:hi] = prefix[at] + np.concatenate([[0], np.cumsum(w[:-1], dtype=np.int64)])
        slots = at + np.arange(a.size)
        keep = np.ones(seen.size + a.size, dtype=bool)
        keep[slots] = False
        merged, merged_w = np.empty(keep.size, addr.dtype), np.empty(keep.size, np.int64)
        merged[slots], merged_w[slots] = a, w
        merged[keep], merged_w[keep] = seen, seen_w
        seen, seen_w = merged, merged_w
    return out


def _doublings(need: np.ndarray, initial_max: int) -> tuple[np.ndarray, np.ndarray]:
    """The array size after each event (running maximum of the sizes needed, rounded up to
    ``initial_max`` times a power of two) and the size before it.  O(n)."""
    need = np.maximum.accumulate(np.maximum(need, initial_max))
    ratio = -(-need // initial_max)
    k = np.ceil(np.log2(ratio.astype(np.float64))).astype(np.int64)
    k += (initial_max << k) < need  # float rounding
    after = np.int64(initial_max) << k
    before = np.concatenate([[initial_max], after[:-1]])
    return after, before


def count_memblock(unit_base, unit_size, base_regions=None,
                   initial_max: int = INIT_MEMBLOCK_RESERVED_REGIONS) -> MemblockCounts:
    """Count the kernel's memblock work for ``memblock_reserve(base, size)`` then
    ``memblock_reserved_mark_noinit(base, size)`` for each unit, in the order given.

    ``base_regions``: ``(base, size, flags)`` arrays of ``memblock.reserved`` before the walk
    (sorted, disjoint; touching regions of equal flags are merged first, as memblock keeps
    them); all regions are taken to be on one node, as reservations are then.
    ``initial_max``: the array's size before the walk (grown to hold the base regions).
    EINVAL when a unit is empty or overlaps another unit or a base region (the counting
    relies on disjoint units; a kernel would WARN and the algorithm would differ).
    O(R n + (n + B) log(n + B)) numpy work, R the ascending runs of the unit addresses.
    """
    ub = np.asarray(unit_base, dtype=np.int64).reshape(-1)
    ue = ub + np.asarray(unit_size, dtype=np.int64).reshape(-1)
    n = ub.size
    if n and not (ue > ub).all():
        raise KHOError("EINVAL", "memblock cost: every unit needs a positive size")
    if base_regions is None:
        bb, be, bf = np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    else:
        bb = np.asarray(base_regions[0], dtype=np.int64).reshape(-1)
        be = bb + np.asarray(base_regions[1], dtype=np.int64).reshape(-1)
        bf = np.asarray(base_regions[2], dtype=np.int64).reshape(-1)
        keep = be > bb
        bb, be, bf = bb[keep], be[keep], bf[keep]
        if bb.size > 1:
            if not ((bb[1:] >= be[:-1]).all()):
                raise KHOError("EINVAL", "memblock cost: base regions must be sorted and disjoint")
            joins = (be[:-1] == bb[1:]) & (bf[:-1] == bf[1:])
            first = np.flatnonzero(np.concatenate([[True], ~joins]))
            last = np.concatenate([first[1:] - 1, [bb.size - 1]])
            bb, be, bf = bb[first], be[last], bf[first]
    nb = bb.size
    while initial_max < nb:
        initial_max *= 2

    # Pieces (base regions and units) in address order: disjointness and touching neighbours.
    p_start = np.concatenate([bb, ub])
    p_end = np.concatenate([be, ue])
    p_unit = np.concatenate([np.full(nb, -1, np.int64), np.arange(n, dtype=np.int64)])
    p_flags = np.concatenate([bf, np.full(n, int(MemblockFlag.RSRV_NOINIT), np.int64)])
    by_addr = np.argsort(p_start, kind="stable")
    s, e, who, fl = p_start[by_addr], p_end[by_addr], p_unit[by_addr], p_flags[by_addr]
    if s.size > 1 and not (s[1:] >= e[:-1]).all():
        bad = int(np.flatnonzero(s[1:] < e[:-1])[0])
        raise KHOError("EINVAL", f"memblock cost: preserved units must be disjoint from each other and from the "
                                 f"regions reserved before them ({int(s[bad]):#x}-{int(e[bad]):#x} overlaps "
                                 f"{int(s[bad + 1]):#x}-{int(e[bad + 1]):#x})")
    pos = np.empty(n, np.int64)
    is_unit = who >= 0
    pos[who[is_unit]] = np.flatnonzero(is_unit)
    time = np.arange(n, dtype=np.int64)
    noinit = int(MemblockFlag.RSRV_NOINIT)

    def side(nb_pos: np.ndarray, touching: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(merges with a flag-0 base region at reserve, merges with a present NOINIT region at mark_noinit)."""
        safe = np.clip(nb_pos, 0, max(s.size - 1, 0))
        nb_unit, nb_flags = who[safe], fl[safe]
        flag0 = touching & (nb_unit < 0) & (nb_flags == 0)
        present_noinit = touching & (((nb_unit < 0) & (nb_flags == noinit)) | ((nb_unit >= 0) & (nb_unit < time)))
        return flag0.astype(np.int64), present_noinit.astype(np.int64)

    left_touch = (pos > 0) & (e[np.maximum(pos - 1, 0)] == ub)
    right_touch = (pos + 1 < s.size) & (s[np.minimum(pos + 1, s.size - 1)] == ue)
    l0, ml = side(pos - 1, left_touch)
    r0, mr = side(pos + 1, right_touch)

    v = 1 - ml - mr
    cnt = nb + np.concatenate([[0], np.cumsum(v[:-1], dtype=np.int64)]) if n else np.empty(0, np.int64)
    p = np.searchsorted(be, ub, side="right").astype(np.int64) + _earlier_below_sums(ub, v)
    nx = (p < cnt).astype(np.int64)
    left = (p > 0).astype(np.int64)

    # The array size: a reserve needs cnt + 1 (checked only in its counting pass, and
    # cnt + 1 <= max holds when it is skipped), an isolate cnt' + 2.
    cnt_iso = cnt + 1 - l0 - r0
    need = np.empty(2 * n, np.int64)
    need[0::2], need[1::2] = cnt + 1, cnt_iso + 2
    after, before = _doublings(need, initial_max)
    max_before_reserve = before[0::2]
    passes = np.where(2 * cnt + 1 <= max_before_reserve, 1, 2)

    # A doubling from m entries copies m: from ``before`` to ``after`` that is after - before.
    copied = after - before
    reserve_scan = passes * (p + nx)
    reserve_moved = (cnt - p) + l0 * (cnt - p) + r0 * (cnt - p - 1)
    isolate_scan = p + 1 + r0 + nx
    noinit_moved = l0 * (cnt_iso - p + 1) + r0 * (cnt_iso + l0 - p) + ml * (cnt - p) + mr * (cnt - p - 1)
    merge_iter = left + nx
    final_max = int(after[-1]) if n else initial_max
    return MemblockCounts(
        units=n, base_regions=nb, counting_passes=int((passes == 2).sum()),
        reserve_scan_visits=int(reserve_scan.sum()), reserve_merge_iterations=int(merge_iter.sum()),
        reserve_regions_moved=int(reserve_moved.sum()), reserve_doubling_copied=int(copied[0::2].sum()),
        isolate_scan_visits=int(isolate_scan.sum()), noinit_merge_iterations=int(merge_iter.sum()),
        noinit_regions_moved=int(noinit_moved.sum()), noinit_doubling_copied=int(copied[1::2].sum()),
        doublings=(final_max // initial_max).bit_length() - 1,
        final_regions=int(nb + v.sum()), final_max=final_max)


def base_regions_of(reserved_regions: np.ndarray, unit_phys: np.ndarray, unit_size: np.ndarray):
    """The regions of a final ``memblock.reserved`` (a :data:`~kho.nextkernel.memblock.REGION_DTYPE`
    array) that the units did not make: its coverage minus the units, each piece with the
    flags of its region.  ``(base, size, flags)``.  O((n + m) log m)."""
    start = reserved_regions["base"].astype(np.uint64)
    end = start + reserved_regions["size"].astype(np.uint64)
    us, ue = intervals.normalize(unit_phys, intervals.as_u64(unit_phys) + intervals.as_u64(unit_size))
    ps, pe = intervals.subtract(start, end, us, ue)
    owner = np.searchsorted(start, ps, side="right") - 1
    return ps, pe - ps, reserved_regions["flags"][owner].astype(np.int64)


@dataclass(frozen=True)
class RestoreCost:
    """The next kernel's KHO stages, modelled: ``kho_restore_s`` (the map walk, the head
    pages, and on the memblock path the memblock calls) and ``free_list_s`` (building the
    buddy free lists).  ``counts`` is None on the instruction path (no memblock call)."""

    path: str
    units: int
    map_pages: int
    free_pages: int
    free_blocks: int
    reserved_regions: int
    counts: MemblockCounts | None
    walk_s: float
    reserve_s: float
    noinit_s: float
    free_list_s: float

    @property
    def kho_restore_s(self) -> float:
        return self.walk_s + self.reserve_s + self.noinit_s

    @property
    def total_s(self) -> float:
        return self.kho_restore_s + self.free_list_s

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "counts"}
        out.update(kho_restore_s=self.kho_restore_s, free_list_s=self.free_list_s)
        if self.counts is not None:
            out.update(self.counts.to_dict())
        return out


def restore_cost(costs: NextKernelCosts, path: str, units: int, map_pages: int, counts: MemblockCounts | None,
                 free_pages: int, free_blocks: int, reserved_regions: int) -> RestoreCost:
    """Seconds of the next kernel's KHO stages from the counts (see :class:`NextKernelCosts`).

    memblock path: per unit the walk and head page, per map page walked, and the memblock
    work of ``counts``; the free-list build walks ``reserved_regions`` regions.  Instruction
    path: the stream walk and the head pages only, linear in units and pages.  Both: per
    page freed and per free block.  O(1)."""
    if path not in (MEMBLOCK_PATH, INSTRUCTIONS_PATH):
        raise KHOError("EINVAL", f"unknown deserialization path {path!r}")
    walk = costs.walk_s(units, map_pages)
    reserve = noinit = 0.0
    regions_walked = 0
    if path == MEMBLOCK_PATH:
        if counts is None:
            raise KHOError("EINVAL", "the memblock path needs its memblock counts")
        reserve = costs.reserve_s(counts.units, counts.reserve_scan_visits + counts.reserve_merge_iterations,
                                  counts.reserve_regions_moved + counts.reserve_doubling_copied)
        noinit = costs.noinit_s(counts.units, counts.isolate_scan_visits + counts.noinit_merge_iterations,
                                counts.noinit_regions_moved + counts.noinit_doubling_copied)
        regions_walked = reserved_regions
    free = costs.free_list_s(free_pages, free_blocks, regions_walked)
    return RestoreCost(path, units, map_pages, free_pages, free_blocks, reserved_regions,
                       counts if path == MEMBLOCK_PATH else None, walk, reserve, noinit, free)


def boot_restore_cost(nk, costs: NextKernelCosts, map_pages: int | None = None) -> RestoreCost:
    """:func:`restore_cost` of a booted :class:`~kho.nextkernel.boot.NextKernel`: its units in
    the walk order of its map's compatible, the regions reserved before them (its final
    ``memblock.reserved`` minus the units), its free pages and blocks.  ``map_pages``: pages
    of the serialized map the kernel walked; None counts the radix tree's pages of a radix
    map (EINVAL for another map).  O(R n + n log n)."""
    phys, order = nk.kho.unit_phys, nk.kho.unit_order
    ps = nk.memory.page_size
    size = np.left_shift(np.uint64(ps), order.astype(np.uint64))
    report = nk.report()
    free_blocks = sum(sum(v) for v in report["free_blocks"].values())
    compatible = nk.kho.fdt.compatible if nk.kho.fdt is not None else ""
    if map_pages is None:
        if not nk.revived:
            map_pages = 0
        elif compatible in RADIX_COMPATIBLES:
            map_pages = radix_pages(phys, order, nk.memory.page_shift)
        else:
            raise KHOError("EINVAL", f"the pages of a {compatible} map are not known: give them")
    counts = None
    if nk.path == MEMBLOCK_PATH:
        idx = walk_order(phys, order, compatible)
        counts = count_memblock(phys[idx], size[idx], base_regions_of(nk.memblock.reserved.regions, phys, size))
    return restore_cost(costs, nk.path, int(phys.size), map_pages, counts, report["free_pages"], free_blocks,
                        report["memblock_reserved_regions"])


def fragmented_units(n: int, start: int = 1 << 30, page_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """``n`` order-0 units no two of which touch (every other page from ``start``), as the
    interleaved runs of the real-kernel timing: ``(phys, size)``.  O(n)."""
    phys = np.uint64(start) + np.arange(n, dtype=np.uint64) * np.uint64(2 * page_size)
    return phys, np.full(n, page_size, np.uint64)


def adjacent_units(n: int, start: int = 1 << 30, page_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """``n`` order-0 units on consecutive pages from ``start``: ``(phys, size)``.  O(n)."""
    phys = np.uint64(start) + np.arange(n, dtype=np.uint64) * np.uint64(page_size)
    return phys, np.full(n, page_size, np.uint64)


# -- the real-kernel timing runs ---------------------------------------------------------------

#: Regions reserved before the walk in the reconstructions of the real-kernel runs: 8 below
#: the preserved memory (x86's first page, BIOS areas, ...) and 8 above it (the next kernel's
#: early allocations in scratch), one page each, flags 0.
TIMING_BASE_BELOW = tuple(i << 20 for i in range(8))
TIMING_BASE_ABOVE = tuple((0x78000 + 0x100 * i) << 12 for i in range(8))
#: Where the reconstructions put the preserved sets (bytes): KHO's own units, the memfd.
TIMING_EXTRA_AT, TIMING_MEMFD_AT = 0x0800_0000, 0x1000_0000


def timing_run_layout(kind: str, memfd_pages: int, units: int, final_regions: int, page_size: int = 4096):
    """A preserved set shaped like one run of ``deserialize-timing.txt`` (Linux 7.3, x86_64
    under QEMU TCG): ``units`` order-0 units of which ``memfd_pages`` belong to the memfd —
    ``interleaved`` (every other page: no two touch) or ``contiguous`` (equal runs of
    adjacent pages) — and the rest KHO's own units, some isolated and the others one
    adjacent block, their numbers chosen so that the walk ends with ``final_regions``
    reserved regions as measured (``rsv_cnt``), with 16 regions reserved before it.

    Returns ``(phys, size, base_regions)``, units in the radix walk order.  O(units)."""
    if kind not in ("interleaved", "contiguous") or not 0 < memfd_pages <= units:
        raise KHOError("EINVAL", f"no timing run of kind {kind!r} with {memfd_pages} of {units} units")
    base = sorted(TIMING_BASE_BELOW + TIMING_BASE_ABOVE)
    nbase = len(base)
    extra = units - memfd_pages
    if kind == "interleaved":
        memfd, _ = fragmented_units(memfd_pages, TIMING_MEMFD_AT, page_size)
        isolated = final_regions - nbase - memfd_pages - 1
    else:
        isolated = min(16, extra)
        runs = final_regions - nbase - isolated - (1 if extra > isolated else 0)
        if runs < 1:
            raise KHOError("EINVAL", f"{final_regions} regions cannot hold a contiguous run of {memfd_pages} pages")
        run_of = np.arange(memfd_pages, dtype=np.uint64) * np.uint64(runs) // np.uint64(memfd_pages)
        memfd = np.uint64(TIMING_MEMFD_AT) + (np.arange(memfd_pages, dtype=np.uint64) + run_of) * np.uint64(page_size)
    if not 0 <= isolated <= extra:
        raise KHOError("EINVAL", f"{final_regions} final regions do not fit {kind} {memfd_pages} pages + {extra} others")
    lone, _ = fragmented_units(isolated, TIMING_EXTRA_AT, page_size)
    block, _ = adjacent_units(extra - isolated, TIMING_EXTRA_AT + (2 * isolated + 1) * page_size, page_size)
    phys = np.sort(np.concatenate([lone, block, memfd]))
    size = np.full(phys.size, page_size, np.uint64)
    n = len(base)
    return phys, size, (np.array(base, np.uint64), np.full(n, page_size, np.uint64), np.zeros(n, np.int64))


def timing_run_counts(kind: str, memfd_pages: int, units: int, final_regions: int) -> dict:
    """The model's counts for a :func:`timing_run_layout`: what the fit of a profile to the
    real-kernel timing needs (units, map pages, the memblock counts).  O(R n)."""
    phys, size, base = timing_run_layout(kind, memfd_pages, units, final_regions)
    counts = count_memblock(phys, size, base)
    return {"units": int(phys.size), "map_pages": radix_pages(phys, np.zeros(phys.size, np.int64)), **asdict(counts)}
