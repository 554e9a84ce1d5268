"""Preserved-set patterns for comparing encodings at scale.

Each pattern draws units from a running kernel's :class:`~kho.currentkernel.pagealloc.PageAllocator`
(so they never touch scratch or the kernel's memory, and encoders' metadata pages never
collide with them) and returns ``(phys uint64, order uint8)`` arrays sorted by address,
covering about ``share`` of RAM:

``random``   order-0 pages uniformly at random (the design discussion's worst case);
``runs``     contiguous runs of 1..1024 pages at random places (within random 4 MiB blocks);
``mixed``    folios of uniformly random order 0..MAX_PAGE_ORDER, like the kernel's KHO self-test;
``strided``  one page in every ``round(1/share)`` (regular fragmentation);
``huge``     mostly 2 MiB and 4 MiB units (90 % of the bytes), the rest order-0 pages.

All are vectorized: O(RAM pages) numpy work at most.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from kho.currentkernel.pagealloc import PageAllocator
from kho.errors import KHOError
from kho.memory.geometry import greedy_split_array

PatternFn = Callable[[PageAllocator, int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _sorted(phys: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sort = np.argsort(phys, kind="stable")
    return phys[sort].astype(np.uint64), orders[sort].astype(np.uint8)


def random_pages(alloc: PageAllocator, pages: int, rng: np.random.Generator):
    """``pages`` order-0 pages uniformly at random among free pages."""
    phys = alloc.alloc_many(pages, 0)
    return phys, np.zeros(phys.size, dtype=np.uint8)


def contiguous_runs(alloc: PageAllocator, pages: int, rng: np.random.Generator):
    """Runs of 1..1024 pages (mean ~512) at a random offset inside random 4 MiB-aligned blocks,
    one run a block."""
    max_order = min(10, alloc.memory.geometry.max_order)
    block = 1 << max_order
    # Twice the expected number of runs (mean length ~block/2), more until they cover ``pages``.
    lengths = rng.integers(1, block + 1, size=4 * pages // block + 16)
    while int(lengths.sum()) < pages:
        lengths = np.concatenate([lengths, rng.integers(1, block + 1, size=lengths.size)])
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), pages)) + 1]
    lengths[-1] -= int(lengths.sum()) - pages  # the cut stays within (0, block]
    starts = alloc.alloc_many(lengths.size, max_order) >> np.uint64(alloc.memory.page_shift)
    rng.shuffle(starts)
    offsets = (rng.random(lengths.size) * (block - lengths + 1)).astype(np.int64)
    first = starts.astype(np.int64) + offsets
    pfn, orders = greedy_split_array(first, first + lengths, alloc.memory.geometry.max_order)
    return _sorted(pfn.astype(np.uint64) << np.uint64(alloc.memory.page_shift), orders)


def mixed_orders(alloc: PageAllocator, pages: int, rng: np.random.Generator):
    """Folios of uniformly random order 0..MAX_PAGE_ORDER until ``pages`` pages (last ones order 0)."""
    max_order = alloc.memory.geometry.max_order
    orders = rng.integers(0, max_order + 1, size=max(1, 2 * pages // ((1 << (max_order + 1)) // (max_order + 1)) + 16))
    sizes = np.left_shift(1, orders)
    keep = int(np.searchsorted(np.cumsum(sizes), pages, side="right"))
    orders = orders[:keep]
    rest = pages - int(np.left_shift(1, orders).sum())
    parts_p, parts_o = [], []
    for order in range(max_order, -1, -1):  # largest first, so small folios don't fragment big blocks
        n = int(np.count_nonzero(orders == order)) + (rest if order == 0 else 0)
        if n:
            parts_p.append(alloc.alloc_many(n, order))
            parts_o.append(np.full(n, order, dtype=np.uint8))
    return _sorted(np.concatenate(parts_p), np.concatenate(parts_o))


def strided_pages(alloc: PageAllocator, pages: int, rng: np.random.Generator):
    """One order-0 page every ``stride`` pages of each bank, ``stride = nr_pages // pages``;
    pages that are not free are skipped and made up for with random free pages."""
    memory = alloc.memory
    stride = max(1, memory.nr_pages // max(pages, 1))
    shift = memory.page_shift
    want = []
    for bank in memory.banks:
        pfn = np.arange(bank.start >> shift, bank.end >> shift, stride, dtype=np.uint64)
        want.append(pfn)
    pfn = np.concatenate(want)[:pages]
    taken = alloc.claim_pages(pfn << np.uint64(shift))
    short = pages - taken.size
    phys = taken if short <= 0 else np.concatenate([taken, alloc.alloc_many(short, 0)])
    return _sorted(phys, np.zeros(phys.size, dtype=np.uint8))


def huge_units(alloc: PageAllocator, pages: int, rng: np.random.Generator):
    """90 % of the bytes in 2 MiB and 4 MiB units (order 9 and 10 with 4 KiB pages), the rest order 0."""
    max_order = alloc.memory.geometry.max_order
    big = [max_order - 1, max_order]
    big_pages = pages * 9 // 10
    per = (1 << big[0]) + (1 << big[1])
    n_each = big_pages // per
    parts_p = [alloc.alloc_many(n_each, big[0]), alloc.alloc_many(n_each, big[1])]
    parts_o = [np.full(n_each, big[0], np.uint8), np.full(n_each, big[1], np.uint8)]
    rest = pages - n_each * per
    parts_p.append(alloc.alloc_many(rest, 0))
    parts_o.append(np.zeros(rest, np.uint8))
    return _sorted(np.concatenate(parts_p), np.concatenate(parts_o))


PATTERNS: dict[str, PatternFn] = {
    "random": random_pages,
    "runs": contiguous_runs,
    "mixed": mixed_orders,
    "strided": strided_pages,
    "huge": huge_units,
}


def generate(name: str, alloc: PageAllocator, preserved_bytes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Units of pattern ``name`` preserving about ``preserved_bytes`` (rounded down to pages)."""
    if name not in PATTERNS:
        raise KHOError("EINVAL", f"unknown pattern {name!r} (one of {', '.join(PATTERNS)})")
    pages = preserved_bytes >> alloc.memory.page_shift
    if pages <= 0:
        raise KHOError("EINVAL", f"preserving {preserved_bytes} bytes is less than a page")
    if pages > alloc.nr_free_pages:
        raise KHOError("ENOMEM", f"cannot preserve {preserved_bytes} bytes: only {alloc.nr_free_pages} pages are free")
    return PATTERNS[name](alloc, pages, np.random.default_rng(seed))
