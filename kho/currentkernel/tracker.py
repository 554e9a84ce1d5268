"""The running kernel's preservation tracker (``struct kho_mem_track``).

Structure, as in Linux 6.16 and later kho-v1 kernels: an :class:`~kho.currentkernel.xarray.XArray`
keyed by order, whose entries are XArrays keyed by ``(pfn >> order) // PRESERVE_BITS``,
whose entries are bitmaps of ``PRESERVE_BITS`` bits (numpy ``uint8`` arrays, bit ``b``
in byte ``b // 8`` at position ``b % 8``: the kernel's little-endian ``unsigned long``
bitmap byte for byte).  Bit ``(pfn >> order) % PRESERVE_BITS`` set means the unit of
``2**order`` pages at ``pfn`` is preserved.

``PRESERVE_BITS`` is 4096 (512-byte bitmaps, Linux 6.16) or ``page_size * 8``
(page-sized bitmaps, later kernels), chosen at construction.

Differences from the kernel, on purpose:

* kho refuses to preserve a page that a preserved unit of any order already covers
  (``EEXIST``); the kernel sets the bit again silently.  ``strict=False`` accepts it the
  kernel's way (re-preserving a unit is a no-op; overlapping units of different orders
  are kept).
* :meth:`Tracker.preserve_pages` caps the greedy split at MAX_PAGE_ORDER.  The kernel
  does not cap it, and then cannot restore the units above MAX_PAGE_ORDER it wrote.
* A failing call, batch or range changes nothing: everything is checked before anything
  is set (the kernel sets as it goes and rolls back).
* kho keeps a host-side index, a :class:`~kho.currentkernel.cover.PageCover` (one byte
  per RAM page counting the preserved units that cover it), for O(1) overlap checks; it is
  not part of the modelled kernel memory.

Units: ``phys`` in bytes, ``pfn`` page frame numbers, ``order`` in pages (log2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from kho.abi.kho_v1 import PRESERVE_BITS_6_16
from kho.currentkernel.batches import packed_bitmaps, unit_arrays
from kho.currentkernel.trackerbase import TrackerBase
from kho.currentkernel.xarray import XA_NODE_BYTES, XArray
from kho.errors import KHOError
from kho.memory.geometry import greedy_split_array
from kho.memory.physical import PhysicalMemory


@dataclass(frozen=True)
class TrackerMemory:
    """Modelled kernel memory of a tracker, in bytes."""

    bitmaps: int
    nr_bitmaps: int
    xarray_nodes: int
    nr_xarray_nodes: int

    @property
    def total(self) -> int:
        return self.bitmaps + self.xarray_nodes


class Tracker(TrackerBase):
    """Per-order preservation bitmaps indexed by XArrays.  See the module docstring.

    ``preserve_bits``: 4096, or ``"page"`` / ``page_size * 8`` for page-sized bitmaps.
    """

    def __init__(self, memory: PhysicalMemory, preserve_bits: int | str = "page", *, strict: bool = True):
        page_bits = memory.page_size * 8
        if preserve_bits == "page":
            preserve_bits = page_bits
        if preserve_bits not in (PRESERVE_BITS_6_16, page_bits):
            raise KHOError("EINVAL", f"PRESERVE_BITS must be {PRESERVE_BITS_6_16} or {page_bits}, not {preserve_bits}")
        super().__init__(memory, strict)
        self.preserve_bits = int(preserve_bits)
        self._bits_shift = self.preserve_bits.bit_length() - 1
        self.finalized = False
        self.orders = XArray()  # order -> XArray(index -> bitmap)
        self._phys_bits: dict[int, XArray] = {}  # the same per-order XArrays, for O(1) lookup
        #: order -> {xarray index: bitmap bytes}: the bytes the XArrays' numpy bitmaps view,
        #: for single-unit calls at Python speed (not modelled kernel memory).
        self._raw: dict[int, dict[int, bytearray]] = {}
        self._bit_mask = self.preserve_bits - 1
        self._max_order = memory.geometry.max_order

    # -- sizes --------------------------------------------------------------------------
    @property
    def bitmap_bytes(self) -> int:
        """Bytes in one bitmap (PRESERVE_BITS / 8)."""
        return self.preserve_bits // 8

    def kernel_memory(self) -> TrackerMemory:
        """The modelled kernel memory: bitmaps plus XArray nodes (orders and per-order arrays)."""
        nr_bitmaps = 0
        nodes = self.orders.nr_nodes
        for _, phys_bits in self.orders.items():
            nr_bitmaps += len(phys_bits)
            nodes += phys_bits.nr_nodes
        return TrackerMemory(nr_bitmaps * self.bitmap_bytes, nr_bitmaps, nodes * XA_NODE_BYTES, nodes)

    # -- validation ---------------------------------------------------------------------
    def _check_mutable(self) -> None:
        if self.finalized:
            raise KHOError("EBUSY", "the tracker is finalized; preserved memory can no longer change")

    def _check_order(self, order: int) -> None:
        max_order = self.memory.geometry.max_order
        if not 0 <= order <= max_order:
            raise KHOError("EINVAL", f"order {order} is outside 0..{max_order} (MAX_PAGE_ORDER)")

    def _locate_unit(self, phys: int, order: int) -> tuple[int, int]:
        """Checks one unit and returns (bank index, pfn offset in bank)."""
        if not 0 <= order <= self._max_order:
            self._check_order(order)
        return self._cover.locate_unit(phys, order)

    def _bitmap(self, order: int, index: int, create: bool) -> np.ndarray | None:
        """The bitmap of ``order`` at xarray ``index`` (created zeroed when ``create``)."""
        phys_bits = self._phys_bits.get(order)
        if phys_bits is None:
            if not create:
                return None
            phys_bits = self._phys_bits[order] = XArray()
            self.orders.store(order, phys_bits)
        bitmap = phys_bits.load(index)
        if bitmap is None and create:
            raw = bytearray(self.bitmap_bytes)
            bitmap = np.frombuffer(raw, dtype=np.uint8)
            phys_bits.store(index, bitmap)
            self._raw.setdefault(order, {})[index] = raw
        return bitmap

    def _bit_of(self, phys: int, order: int) -> tuple[int, int]:
        key = phys >> (self.memory.page_shift + order)
        return key >> self._bits_shift, key & (self.preserve_bits - 1)

    def _test_bit(self, phys: int, order: int) -> bool:
        index, bit = self._bit_of(phys, order)
        bitmap = self._bitmap(order, index, create=False)
        return bitmap is not None and bool(bitmap[bit >> 3] & (1 << (bit & 7)))

    # -- one unit -----------------------------------------------------------------------
    def preserve_folio(self, phys: int, order: int = 0) -> None:
        """Preserve the folio of ``2**order`` pages at ``phys`` (kho_preserve_folio).  O(height)."""
        if self.finalized:
            self._check_mutable()
        if self._claim_unit(phys, order) is None:
            return
        key = phys >> (self._page_shift + order)
        bit = key & self._bit_mask
        raw = self._raw[order].get(key >> self._bits_shift) if order in self._raw else None
        if raw is None:
            self._bitmap(order, key >> self._bits_shift, create=True)
            raw = self._raw[order][key >> self._bits_shift]
        raw[bit >> 3] |= 1 << (bit & 7)
        self._nr_units += 1
        self._nr_pages += 1 << order

    def unpreserve_folio(self, phys: int, order: int = 0) -> None:
        """Undo :meth:`preserve_folio`; ENOENT when that exact unit is not preserved.

        The bitmap stays allocated even when it becomes empty, as in the kernel.
        """
        self._check_mutable()
        bank, off = self._locate_unit(phys, order)
        if not self._test_bit(phys, order):
            raise KHOError("ENOENT", f"{phys:#x} order {order} is not preserved")
        index, bit = self._bit_of(phys, order)
        bitmap = self._bitmap(order, index, create=False)
        bitmap[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF
        nr = 1 << order
        self._cover.add(bank, off, nr, -1)
        self._nr_units -= 1
        self._nr_pages -= nr

    # -- ranges -------------------------------------------------------------------------
    def split(self, phys: int, nr_pages: int) -> tuple[np.ndarray, np.ndarray]:
        """The units ``(phys, order)`` that :meth:`preserve_pages` would use for a range: the
        greedy split, capped at MAX_PAGE_ORDER.  O(units)."""
        first, end = self._page_range(phys, nr_pages)
        pfn, order = greedy_split_array(np.array([first]), np.array([end]), self._max_order)
        return pfn.astype(np.uint64) << np.uint64(self._page_shift), order

    # -- batches ------------------------------------------------------------------------
    def _check_batch(self, phys, orders) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validate a batch; return (phys uint64, order uint8, bank index int64) arrays."""
        phys, orders = unit_arrays(phys, orders)
        max_order = self.memory.geometry.max_order
        if orders.size and (orders.min() < 0 or orders.max() > max_order):
            bad = int(orders.reshape(-1)[((orders < 0) | (orders > max_order)).reshape(-1)][0])
            raise KHOError("EINVAL", f"order {bad} is outside 0..{max_order} (MAX_PAGE_ORDER)")
        return self._cover.check_units(phys, orders)

    def preserve_many(self, phys, orders=0) -> None:
        """Preserve a batch of units: ``phys`` an array of addresses, ``orders`` an int or an array.

        All or nothing.  Vectorized: O(units + pages) numpy work plus O(bitmaps) Python.
        """
        self._check_mutable()
        phys, orders, bank = self._check_batch(phys, orders)
        if not phys.size:
            return
        if self.strict and self._cover.last_ascending and self._cover.single_bank:
            # Disjoint units of one order: pack them first, check and mark the cover from the bits.
            order = int(orders[0])
            rows = [(index, packed) for _, index, packed in
                    packed_bitmaps(phys, orders, self._page_shift, self._bits_shift, self._DENSE_BITS, ascending=True)]
            self._cover.mark_unique_bits(order, rows, self._bits_shift)
            for index, packed in rows:
                for i, bits in zip(index.tolist(), packed):
                    self._bitmap(order, i, create=True)[:] |= bits
            self._nr_units += int(phys.size)
            self._nr_pages += int(phys.size) << order
            return
        if not self.strict:
            phys, orders, bank = self._drop_already_set(phys, orders, bank)
        pages = self._cover.pages_of(phys, orders, bank)
        if self.strict:
            self._cover.mark_unique(pages)
        else:
            self._cover.add_pages(pages, 1)
        self._set_bits(phys, orders)
        self._nr_units += int(phys.size)
        self._nr_pages += int(np.bincount(orders, minlength=self._max_order + 1) @ (1 << np.arange(self._max_order + 1)))

    def _batch_bitmaps(self, phys: np.ndarray, orders: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(order, xarray index, packed bits)`` for the units of a validated batch."""
        for order, index, packed in packed_bitmaps(phys, orders, self._page_shift, self._bits_shift, self._DENSE_BITS):
            for i, bits in zip(index.tolist(), packed):
                yield order, i, bits

    def _set_bits(self, phys: np.ndarray, orders: np.ndarray) -> None:
        for order, index, packed in self._batch_bitmaps(phys, orders):
            self._bitmap(order, index, create=True)[:] |= packed

    def unpreserve_many(self, phys, orders=0) -> None:
        """Unpreserve a batch of exact units; ENOENT (and no change) if any is not preserved
        or the batch names a unit twice."""
        self._check_mutable()
        phys, orders, bank = self._check_batch(phys, orders)
        if not phys.size:
            return
        plan, cleared = [], 0
        for order, index, packed in self._batch_bitmaps(phys, orders):
            bitmap = self._bitmap(order, index, create=False)
            if bitmap is None or np.any(bitmap & packed != packed):
                missing = packed if bitmap is None else packed & ~bitmap
                bit = int(np.flatnonzero(np.unpackbits(missing, bitorder="little"))[0])
                where = ((index << self._bits_shift) + bit) << (self.memory.page_shift + order)
                raise KHOError("ENOENT", f"{where:#x} order {order} is not preserved")
            plan.append((bitmap, packed))
            cleared += int(np.unpackbits(packed).sum())
        if cleared != phys.size:
            raise KHOError("ENOENT", "the batch unpreserves some unit twice")
        for bitmap, packed in plan:
            bitmap &= ~packed
        self._cover.add_pages(self._cover.pages_of(phys, orders, bank), -1)
        self._nr_units -= int(phys.size)
        self._nr_pages -= int(np.sum(np.left_shift(1, orders.astype(np.int64))))

    # -- queries ------------------------------------------------------------------------
    def _orders_present(self) -> list[int]:
        return [order for order, _ in self.orders.items()]

    def bitmaps(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(order, xarray index, bitmap)`` in order, then index, order (as the kernel walks them)."""
        for order, phys_bits in self.orders.items():
            for index, bitmap in phys_bits.items():
                yield order, index, bitmap

    def units_array(self) -> tuple[np.ndarray, np.ndarray]:
        """All preserved units as ``(phys uint64, order uint8)`` arrays sorted by address.

        Walks each order's XArray once: one unpack and one ``flatnonzero`` per order, a
        merge only when several orders are present.  O(units + bitmap bits).
        """
        shift = self.memory.page_shift
        bits_shift = self._bits_shift
        phys_parts, order_parts = [], []
        for order, phys_bits in self.orders.items():
            items = list(phys_bits.items())
            if not items:
                continue
            index = np.fromiter((i for i, _ in items), dtype=np.int64, count=len(items))
            pos = np.flatnonzero(np.unpackbits(np.concatenate([bitmap for _, bitmap in items]), bitorder="little").view(bool))
            if index[-1] - index[0] == index.size - 1:  # consecutive bitmaps: one offset for all
                key = pos
                key += int(index[0]) << bits_shift
            else:
                key = (index[pos >> bits_shift] << bits_shift) | (pos & ((1 << bits_shift) - 1))
            key <<= shift + order
            phys_parts.append(key.view(np.uint64))
            order_parts.append(np.full(key.size, order, dtype=np.uint8))
        if not phys_parts:
            return np.empty(0, np.uint64), np.empty(0, np.uint8)
        if len(phys_parts) == 1:
            return phys_parts[0], order_parts[0]
        phys = np.concatenate(phys_parts)
        sort = np.argsort(phys, kind="stable")
        return phys[sort], np.concatenate(order_parts)[sort]

    # -- finalize -----------------------------------------------------------------------
    def finalize(self) -> None:
        """Freeze the tracker: every later change raises EBUSY (the serialized map is now fixed)."""
        self.finalized = True
