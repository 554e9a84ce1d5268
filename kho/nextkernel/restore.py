"""The next kernel's side of the KHO API: sub-trees and restoring preserved memory.

Kernel semantics (``kho_retrieve_subtree``, ``kho_restore_folio``, ``kho_restore_pages``):

* ``retrieve_subtree(name)``: ENOENT when KHO was not revived or there is no such
  sub-node, EINVAL when its pointer property is missing or not 8 bytes;
* ``restore_folio(phys)``: the head page must carry the 'KHOP' magic and, except from a
  7.1+ kernel (kho-v2 .. kho-v4), an order up to MAX_PAGE_ORDER (Linux 7.1 dropped that limit, as its
  ``kho_preserve_pages`` writes larger units: spec/kernel-versions.md); the magic is
  cleared, so a second restore fails.  The kernel returns
  NULL for every failure; kho names it: EINVAL for an address that is not page-aligned
  or outside RAM, inside a preserved unit but not its head, or a corrupted order;
  ENOENT when nothing preserved starts there (never preserved, or already restored);
* ``restore_pages(phys, n)``: the greedy split of ``kho_preserve_pages`` (capped at
  MAX_PAGE_ORDER under kho-v1, as :class:`kho.currentkernel.tracker.Tracker` preserves;
  uncapped from kho-v2 on), each unit restored.  kho
  checks every unit before restoring any (the kernel stops at the first failure, leaving
  the earlier ones restored) and requires each preserved unit to have exactly the split's
  order (the kernel would restore a differently sized unit and skip pages).

Restored pages belong to the caller (state *allocated*): ``free_pages`` returns them to
the buddy allocator.  Units never restored stay reserved for good: :meth:`leaked`.

Units: ``phys`` in bytes, pages, orders.
"""

from __future__ import annotations

import numpy as np

from kho.abi.kexec_handover import KHO_FDT_COMPATIBLE_V2, KHO_FDT_COMPATIBLE_V3, KHO_FDT_COMPATIBLE_V4, KHO_PAGE_MAGIC
from kho.encodings.common import PHYS_ADDR_BITS
from kho.devicetree import KHOFdt
from kho.errors import KHOError
from kho.memory.geometry import greedy_split
from kho.memory.physical import PhysicalMemory
from kho.nextkernel.memmap import ALLOCATED, PRESERVED, MemMap


class IncomingKHO:
    """What the next kernel received through KHO (``kho_in``).

    ``fdt`` is the checked KHO FDT, or None when KHO revival was disabled;
    ``unit_phys``/``unit_order`` are the preserved units the map listed.
    """

    def __init__(self, memory: PhysicalMemory, memmap: MemMap, fdt: KHOFdt | None,
                 unit_phys: np.ndarray, unit_order: np.ndarray):
        self.memory = memory
        self.memmap = memmap
        self.fdt = fdt
        self.unit_phys = unit_phys
        self.unit_order = unit_order
        #: The largest order restore accepts: any from a 7.1+ kernel (kho-v2 .. kho-v4), else
        #: MAX_PAGE_ORDER (kho-v1, and kho's own encodings, whose tracker caps the split).
        capped = fdt is None or fdt.compatible not in (KHO_FDT_COMPATIBLE_V2, KHO_FDT_COMPATIBLE_V3, KHO_FDT_COMPATIBLE_V4)
        self._max_order = memory.geometry.max_order if capped else PHYS_ADDR_BITS - memory.page_shift

    @property
    def revived(self) -> bool:
        """True when the handover was accepted (``is_kho_boot``)."""
        return self.fdt is not None

    def retrieve_subtree(self, name: str) -> int:
        """The phys a sub-node points at (``kho_retrieve_subtree``)."""
        if self.fdt is None:
            raise KHOError("ENOENT", "KHO was not revived: no sub-trees")
        return self.fdt.retrieve_subtree(name)

    # -- restore ----------------------------------------------------------------------------
    def _head(self, phys: int, order: int | None) -> tuple[int, int]:
        """Check that a restorable unit starts at ``phys`` (of ``order`` if given);
        returns its memmap index and order."""
        if phys < 0 or phys & (self.memory.page_size - 1):
            raise KHOError("EINVAL", f"{phys:#x} is not page-aligned")
        idx = int(self.memmap.index([phys >> self.memory.page_shift])[0])
        info = self.memmap.info[idx]
        if int(info["magic"]) != KHO_PAGE_MAGIC:
            if self.memmap.state[idx] == PRESERVED:
                raise KHOError("EINVAL", f"{phys:#x} is inside a preserved unit, not at its head")
            raise KHOError("ENOENT", f"nothing preserved starts at {phys:#x} (never preserved, or already restored)")
        found = int(info["order"])
        if found > self._max_order:
            raise KHOError("EINVAL", f"{phys:#x} carries order {found}, above MAX_PAGE_ORDER {self._max_order}")
        if order is not None and found != order:
            raise KHOError("EINVAL", f"{phys:#x} was preserved as order {found}, not {order} as the range's split expects")
        return idx, found

    def _take(self, idx: int, order: int) -> None:
        self.memmap.info[idx] = 0
        self.memmap.state[idx:idx + (1 << order)] = ALLOCATED

    def restore_folio(self, phys: int) -> int:
        """Take back the folio preserved at ``phys``; returns its order.  O(1)."""
        idx, order = self._head(phys, None)
        self._take(idx, order)
        return order

    def restore_pages(self, phys: int, nr_pages: int) -> None:
        """Take back ``nr_pages`` pages preserved with ``preserve_pages`` from ``phys``.

        All or nothing.  O(units of the split).
        """
        if nr_pages <= 0:
            raise KHOError("EINVAL", f"a range needs at least one page, not {nr_pages}")
        if phys < 0 or phys & (self.memory.page_size - 1):
            raise KHOError("EINVAL", f"{phys:#x} is not page-aligned")
        shift = self.memory.page_shift
        heads = [self._head(pfn << shift, order)
                 for pfn, order in greedy_split(phys >> shift, nr_pages, self._max_order)]
        for idx, order in heads:
            self._take(idx, order)

    # -- accounting -------------------------------------------------------------------------
    def leaked(self) -> tuple[np.ndarray, np.ndarray]:
        """The preserved units not restored (yet): they stay reserved.  ``(phys, order)``."""
        if not self.unit_phys.size:
            return self.unit_phys, self.unit_order
        idx = self.memmap.index(self.unit_phys >> np.uint64(self.memory.page_shift))
        left = self.memmap.info["magic"][idx] == KHO_PAGE_MAGIC
        return self.unit_phys[left], self.unit_order[left]

    def nr_preserved_pages(self) -> int:
        """Pages in all the preserved units received."""
        return int(np.sum(np.left_shift(np.int64(1), self.unit_order.astype(np.int64))))
