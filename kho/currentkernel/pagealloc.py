"""The running kernel's page allocator, as far as KHO needs one.

Workloads allocate the folios they preserve from it, and encoders allocate their
metadata pages (chunks, bitmaps, radix nodes) from it, so the two never collide and
neither lands in a scratch area or on the kernel's own memory.

State: one numpy ``bool`` per page and bank (``True`` = in use or unavailable), so a
1 TiB machine costs 256 MiB of host memory.  Allocation is deterministic given the seed:
``alloc_pages`` is first-fit from low addresses (as metadata allocations are modelled),
``alloc_random``/``alloc_many`` pick uniformly among free aligned blocks (as a
long-running system's scattered folios look).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Iterable

import numpy as np

from kho.errors import KHOError
from kho.files import check_host_memory
from kho.memory import intervals
from kho.memory.physical import PhysicalMemory

#: Pages scanned per numpy step in first-fit searches.
_SCAN_WINDOW = 1 << 16


def host_bytes(nr_pages: int) -> int:
    """Host memory a :class:`PageAllocator` of ``nr_pages`` pages holds: one byte a page."""
    return nr_pages


class PageAllocator:
    """Allocate and free naturally aligned blocks of ``2**order`` pages.

    ``reserved`` are ``(phys, size)`` byte ranges never handed out (the kernel's own
    memory); scratch areas are never handed out either unless ``use_scratch``.  ENOMEM,
    before anything is allocated, when the host has less memory available than the
    per-page state needs (:func:`host_bytes`).
    """

    def __init__(self, memory: PhysicalMemory, reserved: Iterable[tuple[int, int]] = (), seed: int = 0, use_scratch: bool = False):
        self.memory = memory
        self.rng = np.random.default_rng(seed)
        check_host_memory(host_bytes(memory.nr_pages), f"a page allocator for {memory.nr_pages:,} pages")
        first, end = intervals.banks(memory)
        self._bank_pfn = list(zip(first.tolist(), end.tolist()))  # (first pfn, end pfn) per bank
        self._bank_first = first.tolist()
        self._used = [np.zeros(e - s, dtype=bool) for s, e in self._bank_pfn]
        self._hint: dict[int, tuple[int, int]] = {}  # order -> (bank index, pfn) where first-fit resumes
        self._exhausted: set[int] = set()  # orders a full first-fit scan found none of, since the last free
        for phys, size in reserved:
            self.reserve(phys, size)
        if not use_scratch:
            for area in memory.scratch:
                self.reserve(area.addr, area.size)

    # -- bookkeeping --------------------------------------------------------------------
    def _locate(self, pfn: int, nr: int) -> tuple[int, int]:
        """(bank index, offset in bank) of pfn range ``[pfn, pfn+nr)``; EINVAL outside RAM."""
        i = bisect_right(self._bank_first, pfn) - 1
        if i < 0 or pfn + nr > self._bank_pfn[i][1]:
            raise KHOError("EINVAL", f"pages {pfn:#x}+{nr} are outside RAM")
        return i, pfn - self._bank_pfn[i][0]

    def reserve(self, phys: int, size: int) -> None:
        """Mark the whole pages of ``[phys, phys+size)`` bytes unavailable (no check that they were free)."""
        shift = self.memory.page_shift
        first, last = phys >> shift, (phys + size + self.memory.page_size - 1) >> shift
        i, off = self._locate(first, last - first)
        self._used[i][off:off + last - first] = True

    def is_free(self, phys: int, size: int) -> bool:
        """True when every page of ``[phys, phys+size)`` is free."""
        shift = self.memory.page_shift
        first, last = phys >> shift, (phys + size + self.memory.page_size - 1) >> shift
        i, off = self._locate(first, last - first)
        return not self._used[i][off:off + last - first].any()

    @property
    def nr_free_pages(self) -> int:
        return int(sum(u.size - np.count_nonzero(u) for u in self._used))

    def _claim(self, bank: int, off: int, nr: int) -> int:
        self._used[bank][off:off + nr] = True
        return (self._bank_pfn[bank][0] + off) << self.memory.page_shift

    # -- first fit ----------------------------------------------------------------------
    def _first_fit(self, order: int) -> int | None:
        """Lowest free aligned block of ``order`` at or after the hint, as (bank, offset) claimed phys."""
        nr = 1 << order
        start_bank, start_pfn = self._hint.get(order, (0, 0))
        for bank in range(start_bank, len(self._used)):
            first, end = self._bank_pfn[bank]
            pfn = max(first, start_pfn if bank == start_bank else first)
            pfn = (pfn + nr - 1) & ~(nr - 1)
            used = self._used[bank]
            while pfn + nr <= end:
                window = min(_SCAN_WINDOW, (end - pfn) >> order << order)
                off = pfn - first
                blocks = used[off:off + window]
                if order:
                    blocks = blocks.reshape(-1, nr).any(axis=1)
                lowest = int(np.argmin(blocks))  # the first free block, if any: one pass, no temporaries
                if not blocks[lowest]:
                    off += lowest << order
                    self._hint[order] = (bank, first + off + nr)
                    return self._claim(bank, off, nr)
                pfn += window
        return None

    def alloc_pages(self, order: int = 0) -> int:
        """Allocate the lowest free block of ``2**order`` pages; its phys (bytes).  ENOMEM when none."""
        self._check_order(order)
        if order in self._exhausted:
            raise KHOError("ENOMEM", f"no free block of order {order}")
        phys = self._first_fit(order)
        if phys is None:
            self._hint.pop(order, None)
            phys = self._first_fit(order)
        if phys is None:
            # Remember the failure until something is freed: a refused order costs one scan.
            self._exhausted.add(order)
            raise KHOError("ENOMEM", f"no free block of order {order}")
        return phys

    # -- random -------------------------------------------------------------------------
    def _free_blocks(self, order: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """A bool per aligned block of ``order`` over all banks (True = free), and per bank
        ``(first block id, aligned pfn offset in bank, block count)``.  O(RAM pages)."""
        nr = 1 << order
        parts, layout, base = [], [], 0
        for bank, (first, end) in enumerate(self._bank_pfn):
            aligned = (first + nr - 1) & ~(nr - 1)
            count = max(0, (end - aligned) >> order)
            off = aligned - first
            used = self._used[bank][off:off + (count << order)]
            parts.append(~used.reshape(count, nr).any(axis=1) if order else ~used)
            layout.append((base, off, count))
            base += count
        return np.concatenate(parts), layout

    #: Blocks examined per step of :meth:`alloc_many` (bounds its temporary memory).
    _DRAW_CHUNK = 1 << 20

    def alloc_many(self, count: int, order: int = 0) -> np.ndarray:
        """Allocate ``count`` blocks of ``order`` chosen uniformly at random among free blocks.

        Exactly uniform: the number taken from each chunk of ``_DRAW_CHUNK`` blocks is drawn
        from the hypergeometric distribution given what is left, then that many are chosen
        uniformly inside the chunk.  Returns their phys (uint64, ascending).  All or nothing:
        ENOMEM leaves the allocator unchanged.  O(RAM pages) numpy work, O(chunk) temporary
        memory besides the result.
        """
        self._check_order(order)
        if count < 0:
            raise KHOError("EINVAL", f"negative count {count}")
        free, layout = self._free_blocks(order)
        available = int(np.count_nonzero(free))
        if available < count:
            raise KHOError("ENOMEM", f"only {available} free blocks of order {order}, {count} wanted")
        chosen = np.empty(count, dtype=np.int64)
        taken = 0
        left_free = available
        for lo in range(0, free.size, self._DRAW_CHUNK):
            if taken == count:
                break
            ids = np.flatnonzero(free[lo:lo + self._DRAW_CHUNK])
            left_free -= ids.size
            need = count - taken
            take = need if left_free == 0 else int(self.rng.hypergeometric(ids.size, left_free, need)) if ids.size else 0
            if take:
                picked = np.zeros(ids.size, dtype=bool)  # distinct picks sorted by a mask: O(chunk), no sort
                picked[self.rng.choice(ids.size, size=take, replace=False)] = True
                chosen[taken:taken + take] = ids[np.flatnonzero(picked)] + lo
                taken += take
        nr = 1 << order
        out = np.empty(count, dtype=np.uint64)
        for bank, (base, off, nblocks) in enumerate(layout):
            lo, hi = np.searchsorted(chosen, [base, base + nblocks])
            if lo == hi:
                continue
            offs = off + ((chosen[lo:hi] - base) << order)
            if order:
                self._used[bank][(offs[:, None] + np.arange(nr)).ravel()] = True
            else:
                self._used[bank][offs] = True
            out[lo:hi] = (offs + self._bank_pfn[bank][0]).astype(np.uint64) << np.uint64(self.memory.page_shift)
        return out

    def claim_pages(self, phys: np.ndarray) -> np.ndarray:
        """Allocate those of the given order-0 pages that are free; return their phys
        (uint64, in the given order).  Pages outside RAM or in use are skipped.  O(n)."""
        phys = np.asarray(phys, dtype=np.uint64)
        pfn = phys >> np.uint64(self.memory.page_shift)
        keep = np.zeros(phys.size, dtype=bool)
        for bank, (first, end) in enumerate(self._bank_pfn):
            inside = np.flatnonzero((pfn >= first) & (pfn < end))
            off = (pfn[inside] - np.uint64(first)).astype(np.int64)
            free = ~self._used[bank][off]
            self._used[bank][off[free]] = True
            keep[inside[free]] = True
        return phys[keep]

    def alloc_random(self, order: int = 0) -> int:
        """Allocate one block of ``order`` chosen uniformly among free blocks; its phys."""
        return int(self.alloc_many(1, order)[0])

    # -- free ---------------------------------------------------------------------------
    def free_pages(self, phys: int, order: int = 0) -> None:
        """Free a block; EINVAL when misaligned or not entirely allocated."""
        self._check_order(order)
        shift = self.memory.page_shift
        pfn, nr = phys >> shift, 1 << order
        if phys & ((self.memory.page_size << order) - 1):
            raise KHOError("EINVAL", f"{phys:#x} is not aligned to order {order}")
        bank, off = self._locate(pfn, nr)
        block = self._used[bank][off:off + nr]
        if not block.all():
            raise KHOError("EINVAL", f"freeing {phys:#x} order {order}: not allocated")
        block[:] = False
        self._exhausted.clear()
        for o, (hb, hp) in list(self._hint.items()):
            if (bank, pfn) < (hb, hp):
                self._hint[o] = (bank, pfn)

    def _check_order(self, order: int) -> None:
        if not 0 <= order <= self.memory.geometry.max_order:
            raise KHOError("EINVAL", f"order {order} is outside 0..{self.memory.geometry.max_order}")
