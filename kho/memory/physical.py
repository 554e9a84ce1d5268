"""The physical memory of a modelled machine: RAM banks, scratch areas and page contents.

One :class:`PhysicalMemory` outlives every modelled kexec: the current kernel writes
into it, relocation copies within it, and the next kernel reads it back.

Units: ``phys`` and sizes in bytes, ``pfn`` = ``phys >> page_shift``.  Contents are
sparse: a page never written reads as zeros; pages written explicitly are kept (one
``bytes`` object a page, in a sorted map); large data regions can instead hold
deterministic generated content (:mod:`kho.memory.contents`) recorded as ``[start, end)`` pfn
runs with a seed, so their size costs no host memory.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
from sortedcontainers import SortedDict

from kho.errors import KHOError
from kho.memory.contents import pattern_bytes
from kho.memory.geometry import PageGeometry


@dataclass(frozen=True)
class Bank:
    """A contiguous RAM bank: ``[start, start + size)`` bytes on NUMA node ``node``."""

    start: int
    size: int
    node: int = 0

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class ScratchArea:
    """A KHO scratch area ``[addr, addr + size)`` bytes; ``kind`` is lowmem, global or node<N>.

    Serialized as the kernel's ``struct kho_scratch { u64 addr; u64 size; }``.
    """

    addr: int
    size: int
    kind: str = "global"

    @property
    def end(self) -> int:
        return self.addr + self.size


class PhysicalMemory:
    """RAM banks with sparse contents.  See the module docstring for units."""

    def __init__(self, banks: Sequence[Bank | tuple[int, int] | tuple[int, int, int]], page_size: int = 4096):
        self.geometry = PageGeometry(page_size)
        parsed = sorted((b if isinstance(b, Bank) else Bank(*b) for b in banks), key=lambda b: b.start)
        if not parsed:
            raise KHOError("EINVAL", "a machine needs at least one RAM bank")
        for bank in parsed:
            if bank.size <= 0 or not self.geometry.is_aligned(bank.start) or not self.geometry.is_aligned(bank.size):
                raise KHOError("EINVAL", f"RAM bank {bank.start:#x}+{bank.size:#x} is empty or not page-aligned")
            if bank.end > 1 << 52:
                raise KHOError("EINVAL", f"RAM bank {bank.start:#x}+{bank.size:#x} ends above the 52-bit physical address space")
        for left, right in zip(parsed, parsed[1:]):
            if left.end > right.start:
                raise KHOError("EINVAL", f"RAM banks {left.start:#x} and {right.start:#x} overlap")
        self.banks: tuple[Bank, ...] = tuple(parsed)
        self._bank_starts = np.array([b.start for b in parsed], dtype=np.uint64)
        self._bank_ends = np.array([b.end for b in parsed], dtype=np.uint64)
        self._bank_start_list = [b.start for b in parsed]
        self.scratch: tuple[ScratchArea, ...] = ()
        self._scratch_starts = np.empty(0, np.uint64)
        self._scratch_ends = np.empty(0, np.uint64)
        self._scratch_start_list: list[int] = []
        self._pages: SortedDict = SortedDict()  # pfn -> bytes (one page)
        self._generated: SortedDict = SortedDict()  # start pfn -> (end pfn, seed)

    @classmethod
    def single_bank(cls, ram_size: int, page_size: int = 4096, base: int = 0) -> "PhysicalMemory":
        """A machine with one bank of ``ram_size`` bytes at ``base``."""
        return cls([Bank(base, ram_size)], page_size)

    # -- geometry -----------------------------------------------------------------------
    @property
    def page_size(self) -> int:
        return self.geometry.page_size

    @property
    def page_shift(self) -> int:
        return self.geometry.page_shift

    @property
    def ram_size(self) -> int:
        """Total bytes of RAM over all banks (holes not counted)."""
        return sum(b.size for b in self.banks)

    @property
    def nr_pages(self) -> int:
        return self.ram_size >> self.page_shift

    def bank_of(self, phys: int) -> Bank | None:
        """The bank holding byte ``phys``, or None.  O(log banks)."""
        i = bisect_right(self._bank_start_list, phys) - 1
        if i >= 0 and phys < self.banks[i].end:
            return self.banks[i]
        return None

    def in_ram(self, phys: int, size: int) -> bool:
        """True when ``[phys, phys + size)`` lies inside one bank."""
        bank = self.bank_of(phys)
        return bank is not None and phys + size <= bank.end

    def in_ram_array(self, phys: np.ndarray, size: np.ndarray) -> np.ndarray:
        """Vectorized :meth:`in_ram` over uint64 arrays (bool array).  O(n log banks)."""
        phys = np.asarray(phys, dtype=np.uint64)
        end = phys + np.asarray(size, dtype=np.uint64)
        if len(self.banks) == 1:
            return (phys >= self._bank_starts[0]) & (end <= self._bank_ends[0]) & (end > phys)
        i = np.searchsorted(self._bank_starts, phys, side="right").astype(np.int64) - 1
        ok = i >= 0
        ok &= end <= self._bank_ends[np.maximum(i, 0)]
        ok &= end > phys  # no wrap
        return ok

    def check_range(self, phys: int, size: int, what: str = "range") -> None:
        """Raise KHOError(EINVAL) unless ``[phys, phys+size)`` is inside one RAM bank."""
        if phys < 0 or size < 0 or not self.in_ram(phys, max(size, 1)):
            raise KHOError("EINVAL", f"{what} {phys:#x}+{size:#x} is outside RAM")

    # -- scratch areas ------------------------------------------------------------------
    def set_scratch(self, areas: Iterable[ScratchArea]) -> None:
        """Record the scratch areas (kept in address order); each must lie in RAM, page-aligned, disjoint."""
        areas = sorted(areas, key=lambda a: a.addr)
        for area in areas:
            if not (self.geometry.is_aligned(area.addr) and self.geometry.is_aligned(area.size)) or area.size <= 0:
                raise KHOError("EINVAL", f"scratch area {area.addr:#x}+{area.size:#x} is empty or not page-aligned")
            self.check_range(area.addr, area.size, "scratch area")
        for left, right in zip(areas, areas[1:]):
            if left.end > right.addr:
                raise KHOError("EINVAL", f"scratch areas at {left.addr:#x} and {right.addr:#x} overlap")
        self.scratch = tuple(areas)
        self._scratch_starts = np.array([a.addr for a in areas], dtype=np.uint64)
        self._scratch_ends = np.array([a.end for a in areas], dtype=np.uint64)
        self._scratch_start_list = [a.addr for a in areas]

    def overlaps_scratch(self, phys: int, size: int) -> bool:
        """True when ``[phys, phys+size)`` shares a byte with a scratch area.  O(log areas)."""
        i = bisect_left(self._scratch_start_list, phys + size) - 1
        return i >= 0 and self.scratch[i].end > phys

    def overlaps_scratch_array(self, phys: np.ndarray, size: np.ndarray) -> np.ndarray:
        """Vectorized :meth:`overlaps_scratch` (bool array)."""
        phys = np.asarray(phys, dtype=np.uint64)
        if not self.scratch:
            return np.zeros(phys.shape, dtype=bool)
        end = phys + np.asarray(size, dtype=np.uint64)
        i = np.searchsorted(self._scratch_starts, end, side="left").astype(np.int64) - 1
        return (i >= 0) & (self._scratch_ends[np.maximum(i, 0)] > phys)

    # -- contents -----------------------------------------------------------------------
    def _page_range(self, phys: int, size: int) -> tuple[int, int]:
        shift = self.page_shift
        return phys >> shift, (phys + size + self.page_size - 1) >> shift

    def _generated_overlapping(self, first: int, last: int) -> Iterator[tuple[int, int, int]]:
        """Generated runs ``(start, end, seed)`` (pfns) that meet ``[first, last)``."""
        gen = self._generated
        i = gen.bisect_right(first) - 1
        if i < 0:
            i = 0
        keys = gen.keys()
        while i < len(gen):
            start = keys[i]
            if start >= last:
                break
            end, seed = gen[start]
            if end > first:
                yield start, end, seed
            i += 1

    def read(self, phys: int, size: int) -> bytes:
        """``size`` bytes from ``phys`` (may span pages; must stay inside one bank).  O(size).

        Fast path: a read within one explicitly stored page is a slice of it (a stored page
        always overrides generated content, and was range-checked when written).
        """
        offset = phys & (self.page_size - 1)
        if 0 < size and offset + size <= self.page_size:
            page = self._pages.get(phys >> self.page_shift)
            if page is not None and phys >= 0:
                return page if size == self.page_size else page[offset:offset + size]
        self.check_range(phys, size, "read")
        if size == 0:
            return b""
        first, last = self._page_range(phys, size)
        buf = self._overlay_pages(bytearray((last - first) * self.page_size), first, last)
        offset = phys - (first << self.page_shift)
        return bytes(buf[offset:offset + size])

    def _overlay_pages(self, buf: bytearray, first: int, last: int) -> bytearray:
        """``buf`` (the bytes of pfns ``[first, last)``) with this memory's generated runs and
        stored pages laid over it, in that order.  O(pages in the range)."""
        ps = self.page_size
        for start, end, seed in self._generated_overlapping(first, last):
            lo, hi = max(start, first), min(end, last)
            buf[(lo - first) * ps:(hi - first) * ps] = pattern_bytes(seed, lo, hi - lo, ps)
        for pfn in self._pages.irange(first, last - 1):
            buf[(pfn - first) * ps:(pfn - first + 1) * ps] = self._pages[pfn]
        return buf

    def is_generated(self, phys: int, size: int) -> bool:
        """Whether any page of ``[phys, phys+size)`` has generated content (pages that cost
        no storage: a decoder must not take them as metadata).  O(log runs)."""
        first, last = self._page_range(phys, size)
        return next(self._generated_overlapping(first, last), None) is not None

    def read_page(self, pfn: int) -> bytes:
        """The whole page ``pfn``."""
        return self.read(pfn << self.page_shift, self.page_size)

    def read_u64(self, phys: int) -> int:
        """A little-endian u64 at ``phys``."""
        return int.from_bytes(self.read(phys, 8), "little")

    def write(self, phys: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Write ``data`` at ``phys``; the pages touched become explicitly stored.  O(len).

        Fast path: bytes or a bytearray of exactly one page over a page already stored (so
        inside RAM and not generated) replaces it in place.
        """
        if type(data) in (bytes, bytearray) and len(data) == self.geometry.page_size and phys >= 0:
            pfn, offset = divmod(phys, self.geometry.page_size)
            if not offset and pfn in self._pages:
                self._pages[pfn] = bytes(data)
                return
        data = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data).cast("B")
        size = len(data)
        self.check_range(phys, size, "write")
        ps, shift = self.page_size, self.page_shift
        pos = 0
        while pos < size:
            pfn = (phys + pos) >> shift
            offset = (phys + pos) & (ps - 1)
            n = min(ps - offset, size - pos)
            if n == ps:
                page = bytes(data[pos:pos + n])
            else:
                page = bytearray(self.read_page(pfn))
                page[offset:offset + n] = data[pos:pos + n]
                page = bytes(page)
            self._split_generated(pfn, pfn + 1)
            self._pages[pfn] = page
            pos += n

    def write_u64(self, phys: int, value: int) -> None:
        self.write(phys, value.to_bytes(8, "little"))

    def _split_generated(self, first: int, last: int) -> None:
        """Remove pfns ``[first, last)`` from the generated runs (keeping the parts outside)."""
        for start, end, seed in list(self._generated_overlapping(first, last)):
            del self._generated[start]
            if start < first:
                self._generated[start] = (first, seed)
            if end > last:
                self._generated[last] = (end, seed)

    def discard(self, phys: int, size: int) -> None:
        """Forget the contents of whole pages ``[phys, phys+size)``: they read as zeros again."""
        self._check_page_range(phys, size)
        first, last = self._page_range(phys, size)
        self._split_generated(first, last)
        for pfn in list(self._pages.irange(first, last - 1)):
            del self._pages[pfn]

    def fill_pattern(self, phys: int, size: int, seed: int) -> None:
        """Give whole pages ``[phys, phys+size)`` the generated content of ``seed`` (see :mod:`kho.memory.contents`)."""
        self.discard(phys, size)
        first, last = self._page_range(phys, size)
        self._generated[first] = (last, seed)

    def _check_page_range(self, phys: int, size: int) -> None:
        if not (self.geometry.is_aligned(phys) and self.geometry.is_aligned(size)):
            raise KHOError("EINVAL", f"{phys:#x}+{size:#x} is not page-aligned")
        self.check_range(phys, size)

    def digest(self, phys: int, size: int, chunk_pages: int = 4096) -> bytes:
        """BLAKE2b-128 digest of ``[phys, phys+size)``; reads in chunks of ``chunk_pages``.  O(size)."""
        h = hashlib.blake2b(digest_size=16)
        step = chunk_pages * self.page_size
        for off in range(0, size, step):
            h.update(self.read(phys + off, min(step, size - off)))
        return h.digest()

    # -- enumeration of stored contents -----------------------------------------------------
    def stored_pages(self, first: int = 0, last: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Explicitly stored pages ``(pfn, bytes)`` in ``[first, last)``, in pfn order."""
        hi = None if last is None else last - 1
        for pfn in self._pages.irange(first, hi):
            yield pfn, self._pages[pfn]

    def generated_runs(self) -> Iterator[tuple[int, int, int]]:
        """Generated runs ``(start pfn, end pfn, seed)`` in pfn order."""
        for start, (end, seed) in self._generated.items():
            yield start, end, seed

    @property
    def nr_stored_pages(self) -> int:
        return len(self._pages)
