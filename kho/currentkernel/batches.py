"""Batches of preserved units, as both trackers take them.

A batch is ``(phys, orders)``: byte addresses and the log2 page counts of the units, one
order for all or one each.  Both the 6.16 :class:`~kho.currentkernel.tracker.Tracker`
and the 7.x :class:`~kho.currentkernel.radix_tracker.RadixTracker` keep preserved units
as bits of little-endian bitmaps (the kernel's ``unsigned long`` bitmaps byte for byte),
bit ``u % 2**bits_log2`` of bitmap ``u >> bits_log2`` for the unit number ``u = phys >>
(PAGE_SHIFT + order)``; only where a bitmap lives differs (an XArray slot, a radix leaf).
Here: the batch as arrays (:func:`unit_arrays`), the units new to a kernel-compatible
tracker (:func:`new_units`) and the batch as packed bitmaps (:func:`packed_bitmaps`).
Placement checks (aligned, in RAM, outside scratch) are
:meth:`kho.currentkernel.cover.PageCover.check_units`.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from kho.errors import KHOError


def unit_arrays(phys, orders) -> tuple[np.ndarray, np.ndarray]:
    """A batch of units as arrays: ``phys`` 1-D uint64, ``orders`` an integer array, 0-d
    (one order for all) or of ``phys``'s shape.  EINVAL for non-integers, negative
    addresses or a count mismatch; the orders' range is the tracker's to check.  O(n)."""
    phys = np.asarray(phys).reshape(-1)
    if phys.size and (phys.dtype.kind not in "iu" or (phys.dtype.kind == "i" and phys.min() < 0)):
        raise KHOError("EINVAL", "physical addresses must be non-negative integers")
    phys = phys.astype(np.uint64, copy=False)
    orders = np.asarray(orders)
    if orders.dtype.kind not in "iu":
        raise KHOError("EINVAL", "orders must be integers")
    if orders.ndim and orders.shape != phys.shape:
        raise KHOError("EINVAL", f"{orders.size} orders for {phys.size} addresses")
    return phys, orders


def new_units(phys: np.ndarray, orders: np.ndarray, is_set: Callable[[int, int], bool]) -> np.ndarray:
    """Kernel-compatible mode: a bool per unit of a validated batch, True for the units to
    set: the first of each ``(phys, order)`` the batch names, unless ``is_set(phys, order)``
    (its bit is set already).  O(n log n) numpy work plus O(n) calls of ``is_set``."""
    _, first = np.unique(np.stack([phys, orders.astype(np.uint64)]), axis=1, return_index=True)
    keep = np.zeros(phys.size, dtype=bool)
    keep[first] = True
    for i in np.flatnonzero(keep).tolist():
        if is_set(int(phys[i]), int(orders[i])):
            keep[i] = False
    return keep


#: Bits of the dense window :func:`packed_bitmaps` fills at a time for ascending units
#: (8 MiB of bools: stays in cache, no whole-batch temporaries).
WINDOW_BITS = 1 << 23


def _ascending_bitmaps(phys: np.ndarray, order: int, page_shift: int, bits_log2: int,
                       window_bits: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """:func:`packed_bitmaps` of strictly ascending units of one order, a window of
    bitmaps at a time: each window's units are a slice (binary searches at the window
    edges), scattered and packed.  O(units + touched bitmap bits), O(window) memory."""
    nbits = 1 << bits_log2
    shift = page_shift + order
    rows = max(1, window_bits // nbits)
    first, last = int(phys[0]) >> (shift + bits_log2), int(phys[-1]) >> (shift + bits_log2)
    starts = list(range(first, last + 1, rows))
    edges = np.searchsorted(phys, np.array([min(r << (shift + bits_log2), (1 << 64) - 1) for r in starts[1:]],
                                           dtype=np.uint64)).tolist()
    for r0, lo, hi in zip(starts, [0] + edges, edges + [phys.size]):
        if lo == hi:
            continue
        n = min(rows, last + 1 - r0)
        dense = np.zeros(n * nbits, dtype=bool)
        units = (phys[lo:hi] >> np.uint64(shift)).view(np.int64)
        units -= r0 << bits_log2
        dense[units] = True
        packed = np.packbits(dense, bitorder="little").reshape(n, nbits // 8)
        nonempty = np.flatnonzero(packed.any(axis=1))
        yield order, nonempty + r0, packed[nonempty]


def packed_bitmaps(phys: np.ndarray, orders: np.ndarray, page_shift: int, bits_log2: int,
                   dense_bits: int, ascending: bool = False) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The units of a validated, non-empty batch as bitmaps of ``2**bits_log2`` bits.

    Yields ``(order, bitmap indexes int64[rows], packed bits uint8[rows, 2**bits_log2 / 8])``
    for the non-empty bitmaps, orders ascending, then indexes ascending.  Per order, the
    unit numbers are scattered into a dense bool array and ``packbits``-ed, at most
    ``dense_bits`` bits a pass: O(units + touched bitmap bits) numpy work, O(dense_bits)
    temporary memory.  Unit numbers are below ``2**62`` (phys is 64-bit).  ``ascending``:
    the caller knows the batch is of one order and strictly ascending (not checked again).
    """
    nbits = 1 << bits_log2
    rows_per_pass = max(1, dense_bits // nbits)
    if ascending:
        yield from _ascending_bitmaps(phys, int(orders[0]), page_shift, bits_log2, min(dense_bits, WINDOW_BITS))
        return
    present = np.flatnonzero(np.bincount(orders, minlength=1))
    for order in present.tolist():
        of_order = phys if present.size == 1 else phys[orders == order]
        if of_order.size > 1 and (of_order[1:] > of_order[:-1]).all():
            yield from _ascending_bitmaps(of_order, order, page_shift, bits_log2, min(dense_bits, WINDOW_BITS))
            continue
        units = (of_order >> np.uint64(page_shift + order)).view(np.int64)
        lo, hi = int(units.min()) >> bits_log2, int(units.max()) >> bits_log2
        if hi - lo < rows_per_pass:  # one pass over consecutive rows: a unit's bit is units - lo * nbits
            dense = np.zeros((hi + 1 - lo) * nbits, dtype=bool)
            dense[units - (lo << bits_log2)] = True
            packed = np.packbits(dense, bitorder="little").reshape(hi + 1 - lo, nbits // 8)
            nonempty = np.flatnonzero(packed.any(axis=1))
            yield order, nonempty + lo, packed[nonempty]
            continue
        index, bit = units >> bits_log2, units & (nbits - 1)
        row_index, row = np.unique(index, return_inverse=True)
        for first in range(0, row_index.size, rows_per_pass):
            rows = min(rows_per_pass, row_index.size - first)
            sel = slice(None) if rows == row_index.size else (row >= first) & (row < first + rows)
            dense = np.zeros(rows * nbits, dtype=bool)
            dense[(row[sel] - first) * nbits + bit[sel]] = True
            packed = np.packbits(dense, bitorder="little").reshape(rows, nbits // 8)
            nonempty = np.flatnonzero(packed.any(axis=1))
            yield order, row_index[first + nonempty], packed[nonempty]
