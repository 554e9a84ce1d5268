"""The stateless Linux 7.x tracker: the KHO radix tree is the tracker and the map.

Since Linux 7.1 (``kho: adopt radix tree for preserved memory tracking``, ``kho: remove
finalize state and clients``) the running kernel keeps no separate tracker: preserving a
unit walks the radix tree of ``include/linux/kho/abi`` from the root and creates the
missing page-sized nodes on the way (``kho_radix_add_page``), unpreserving clears the bit
and frees nothing (``kho_radix_del_page``).  There is no finalize step: the tree in memory
is the kho-v2 .. kho-v4 map at every moment, and ``preserved-memory-map`` holds
:attr:`RadixTracker.root_phys`.  The modelled kernel memory is the radix pages.

Layout, as the kernel's (and kho's kho-v2 encoder's) radix tree: a unit of ``order`` at
``phys`` has the key of :class:`~kho.abi.kexec_handover.RadixGeometry`; the leaf (level 0)
holding it is the one whose *leaf key* is ``key >> BITMAP_LOG2`` and its bit is
``key % 2**BITMAP_LOG2``; the level-``l`` node on its path is the one whose prefix is
``leaf key >> (l * TABLE_LOG2)``, and a child sits in its parent's slot ``prefix %
2**TABLE_LOG2``.  Every node is one page allocated from the kernel's page allocator and
written zeroed, then kept current in :class:`~kho.memory.physical.PhysicalMemory` after
every change.  Host-side, nodes are also kept in plain dicts (prefix -> phys per level,
phys -> ``bytearray`` contents) for O(1) lookups.

Orders above MAX_PAGE_ORDER are real here: :meth:`RadixTracker.split` is the 7.x
``kho_preserve_pages`` split, not capped, cut where the NUMA node changes.  The tree's
depth formula is the geometry's: with 16 KiB pages and the formula first merged
(``depth_fix=False``) the 4-level tree cannot hold an order-0 key, and such units are
refused (EINVAL) instead of being silently stored under another key as the kernel would.

Differences from the kernel, on purpose (the same as :class:`~kho.currentkernel.tracker.Tracker`):

* strict mode refuses (EEXIST) a unit covering an already preserved page; ``strict=False``
  is the kernel's way (re-preserving a unit is a no-op, overlapping units are kept);
* every call is all or nothing: everything is checked and every node page allocated before
  anything changes (the kernel frees the nodes it created and rolls back on failure);
* unpreserving a unit that is not preserved is ENOENT (the kernel WARNs and returns);
* a unit never spans two RAM banks, so :meth:`RadixTracker.split` also cuts where two banks
  of one node meet (the kernel cuts only where the node changes);
* there is no finalize, so no EBUSY either;
* a :class:`~kho.currentkernel.cover.PageCover` (one byte per RAM page) answers overlap
  and ``is_preserved`` questions; it is not part of the modelled kernel memory.

Units: ``phys`` in bytes, ``pfn`` page frame numbers, ``order`` log2 of pages, keys as
the kernel's ``unsigned long``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from kho.abi.kexec_handover import RadixGeometry
from kho.currentkernel.batches import packed_bitmaps, unit_arrays
from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.trackerbase import TrackerBase
from kho.errors import KHOError
from kho.memory import intervals
from kho.memory.geometry import greedy_split_array
from kho.memory.physical import PhysicalMemory


@dataclass(frozen=True)
class RadixMemory:
    """Modelled kernel memory of a :class:`RadixTracker`: its node pages."""

    nr_leaves: int
    nr_tables: int
    page_size: int

    @property
    def leaves(self) -> int:
        """Bytes of leaf (bitmap) pages."""
        return self.nr_leaves * self.page_size

    @property
    def tables(self) -> int:
        """Bytes of inner-node (table) pages, the root included."""
        return self.nr_tables * self.page_size

    @property
    def total(self) -> int:
        """Bytes of all radix pages."""
        return self.leaves + self.tables


class RadixTracker(TrackerBase):
    """The 7.x preservation tracker: a live KHO radix tree.  See the module docstring.

    ``memory``: the machine; ``allocator``: where node pages come from (``alloc_pages(0)``
    / ``free_pages``); ``depth_fix``: the ``KHO_TREE_MAX_DEPTH`` formula (False: the one
    first merged).  The root node is allocated here, as the kernel does at boot (ENOMEM
    when no page is free).
    """

    def __init__(self, memory: PhysicalMemory, allocator: PageAllocator, *, strict: bool = True, depth_fix: bool = True):
        super().__init__(memory, strict)
        g = RadixGeometry(memory.page_shift, depth_fix)
        self.allocator = allocator
        self.geometry = g
        self._slot_mask = (1 << g.table_log2) - 1
        self._bit_mask = (1 << g.bitmap_log2) - 1
        self._bitmap_log2 = g.bitmap_log2
        #: Largest order kho accepts: the order bit of its key stays above the leaf bits.
        self.max_order = g.order0_log2 - g.bitmap_log2
        #: Smallest order whose key the tables can hold (1 for 16 KiB pages without the fix).
        self.min_order = max(0, g.order0_log2 + 1 - (g.bitmap_log2 + g.root_level * g.table_log2))
        self._nodes: list[dict[int, int]] = [{} for _ in range(g.depth)]  # level -> prefix -> phys
        self._pages: dict[int, bytearray] = {}  # phys -> contents of every node page
        self._units_per_order: dict[int, int] = {}
        #: Every RAM bank's first and end pfn, where :meth:`split` cuts.
        self._bank_edges = np.unique(np.concatenate(intervals.banks(memory, np.int64)))
        root = self._alloc_pages(1)[0]
        self._nodes[g.root_level][0] = root
        self._pages[root] = bytearray(self._page_size)
        memory.write(root, self._pages[root])

    # -- sizes ----------------------------------------------------------------------------
    @property
    def root_phys(self) -> int:
        """Phys of the root node: what the KHO FDT's ``preserved-memory-map`` holds."""
        return self._nodes[self.geometry.root_level][0]

    def radix_pages(self) -> np.ndarray:
        """Phys of every node page, root, tables and leaves (uint64, ascending).  O(nodes)."""
        return np.array(sorted(self._pages), dtype=np.uint64)

    def kernel_memory(self) -> RadixMemory:
        """The modelled kernel memory: leaves and tables, one page each.  O(depth)."""
        nr_leaves = len(self._nodes[0])
        return RadixMemory(nr_leaves, len(self._pages) - nr_leaves, self._page_size)

    # -- validation -------------------------------------------------------------------------
    def _check_order(self, order: int) -> None:
        if not 0 <= order <= self.max_order:
            raise KHOError("EINVAL", f"order {order} is outside 0..{self.max_order} (the radix key's order bit must stay above the leaf bits)")
        if order < self.min_order:
            g = self.geometry
            raise KHOError("EINVAL", f"order {order} cannot be preserved with {self._page_size}-byte pages: the {g.depth}-level radix tree "
                                     f"(KHO_TREE_MAX_DEPTH without the 2026 depth fix) covers key bits 0..{g.bitmap_log2 + g.root_level * g.table_log2 - 1}, "
                                     f"and the order bit of an order-{order} key is bit {g.order0_log2 - order}")

    def _locate_unit(self, phys: int, order: int) -> tuple[int, int]:
        """Checks one unit and returns (bank index, pfn offset in bank)."""
        if not self.min_order <= order <= self.max_order:
            self._check_order(order)
        return self._cover.locate_unit(phys, order)

    def _check_batch(self, phys, orders) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validate a batch; return (phys uint64, order uint8, bank index int64) arrays."""
        phys, orders = unit_arrays(phys, orders)
        if orders.size:
            low, high = int(orders.min()), int(orders.max())
            if low < self.min_order or high > self.max_order:
                self._check_order(low if low < self.min_order else high)
        return self._cover.check_units(phys, orders)

    # -- nodes ------------------------------------------------------------------------------
    def _leaf_of(self, phys: int, order: int) -> tuple[int, int]:
        """``(leaf key, bit)`` of one unit.  O(1)."""
        key = self.geometry.encode_key(phys, order)
        return key >> self._bitmap_log2, key & self._bit_mask  # bitmap_index, without the call

    def _add_paths(self, leaf_keys: list[int]) -> None:
        """Create the missing nodes on the paths to ``leaf_keys`` (kho_radix_add_page's walk).

        All pages are allocated first (ENOMEM frees them and changes nothing), then linked
        top-down and written zeroed with their parents' new slots.  O(new nodes) page
        allocations and writes.
        """
        g = self.geometry
        plan: list[tuple[int, int]] = []
        for level in range(g.root_level - 1, -1, -1):
            nodes, shift = self._nodes[level], level * g.table_log2
            seen = set()
            for leaf_key in leaf_keys:
                prefix = leaf_key >> shift
                if prefix not in nodes and prefix not in seen:
                    seen.add(prefix)
                    plan.append((level, prefix))
        if not plan:
            return
        pages = self._alloc_pages(len(plan))
        dirty = set(pages)
        for (level, prefix), page in zip(plan, pages):
            self._nodes[level][prefix] = page
            self._pages[page] = bytearray(self._page_size)
            parent = self._nodes[level + 1][prefix >> g.table_log2]
            slot = prefix & self._slot_mask
            self._pages[parent][slot * 8:slot * 8 + 8] = page.to_bytes(8, "little")
            dirty.add(parent)
        for page in dirty:
            self.memory.write(page, self._pages[page])

    def _alloc_pages(self, count: int) -> list[int]:
        """``count`` zeroed node pages from the allocator, in its order; never page 0 (phys
        0 is an empty slot).  All or nothing: ENOMEM frees what was taken.  O(count) calls."""
        pages: list[int] = []
        null_page = False
        try:
            while len(pages) < count:
                page = self.allocator.alloc_pages(0)
                if page == 0:
                    null_page = True
                else:
                    pages.append(page)
        except KHOError:
            for page in pages:
                self.allocator.free_pages(page, 0)
            raise
        finally:
            if null_page:
                self.allocator.free_pages(0, 0)
        return pages

    def _test_bit(self, phys: int, order: int) -> bool:
        leaf_key, bit = self._leaf_of(phys, order)
        leaf = self._nodes[0].get(leaf_key)
        return leaf is not None and bool(self._pages[leaf][bit >> 3] & (1 << (bit & 7)))

    # -- one unit -----------------------------------------------------------------------------
    def preserve_folio(self, phys: int, order: int = 0) -> None:
        """Preserve the folio of ``2**order`` pages at ``phys`` (kho_preserve_folio).

        O(1) dict work plus one leaf page write; O(depth) page allocations when the path
        is new.
        """
        where = self._claim_unit(phys, order)
        if where is None:
            return
        leaf_key, bit = self._leaf_of(phys, order)
        leaf = self._nodes[0].get(leaf_key)
        if leaf is None:
            try:
                self._add_paths([leaf_key])
            except KHOError:
                self._cover.add(*where, 1 << order, -1)
                raise
            leaf = self._nodes[0][leaf_key]
        page = self._pages[leaf]
        page[bit >> 3] |= 1 << (bit & 7)
        self.memory.write(leaf, page)
        self._count(order, 1)

    def unpreserve_folio(self, phys: int, order: int = 0) -> None:
        """Undo :meth:`preserve_folio` (kho_unpreserve_folio); ENOENT when that exact unit
        is not preserved.  Nodes stay allocated even when they become empty, as in the kernel."""
        bank, off = self._locate_unit(phys, order)
        if not self._test_bit(phys, order):
            raise KHOError("ENOENT", f"{phys:#x} order {order} is not preserved")
        leaf_key, bit = self._leaf_of(phys, order)
        leaf = self._nodes[0][leaf_key]
        page = self._pages[leaf]
        page[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF
        self.memory.write(leaf, page)
        self._cover.add(bank, off, 1 << order, -1)
        self._count(order, -1)

    def _count(self, order: int, units: int) -> None:
        """Account ``units`` (negative: removed) units of ``order``."""
        self._nr_units += units
        self._nr_pages += units << order
        left = self._units_per_order.get(order, 0) + units
        if left:
            self._units_per_order[order] = left
        else:
            self._units_per_order.pop(order, None)

    # -- ranges -------------------------------------------------------------------------------
    def split(self, phys: int, nr_pages: int) -> tuple[np.ndarray, np.ndarray]:
        """The units ``(phys uint64, order uint8)`` the 7.x ``kho_preserve_pages`` makes of a range.

        ``order = min(ctz(pfn), floor(log2(pages left)))``, not capped at MAX_PAGE_ORDER,
        and cut where the range passes from one RAM bank (NUMA node) to the next.
        ``unpreserve_pages`` takes the same split (as the kernel does since its fix of May
        2026).  O(units).
        """
        first, end = self._page_range(phys, nr_pages)
        starts, ends = intervals.split_at(np.array([first], np.int64), np.array([end], np.int64), self._bank_edges)
        pfn, order = greedy_split_array(starts, ends, self.max_order)
        return pfn.astype(np.uint64) << np.uint64(self._page_shift), order

    # -- batches ------------------------------------------------------------------------------
    def _packed_leaves(self, phys: np.ndarray, orders: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """``(leaf key, packed bits uint8[page_size])`` for the units of a validated batch:
        :func:`~kho.currentkernel.batches.packed_bitmaps` with one leaf a bitmap.
        O(units + touched leaf bits) numpy work."""
        g = self.geometry
        for order, index, packed in packed_bitmaps(phys, orders, self._page_shift, g.bitmap_log2, self._DENSE_BITS):
            yield from zip(g.leaf_key_array(order, index).tolist(), packed)

    def _leaf_array(self, leaf_key: int) -> np.ndarray | None:
        """The contents of a leaf as a writable uint8 view, or None when it does not exist."""
        leaf = self._nodes[0].get(leaf_key)
        return None if leaf is None else np.frombuffer(self._pages[leaf], dtype=np.uint8)

    def preserve_many(self, phys, orders=0) -> None:
        """Preserve a batch of units: ``phys`` an array of addresses, ``orders`` an int or an array.

        All or nothing: validated, checked for overlaps (strict mode), the missing node
        pages allocated, then every touched leaf updated and written once.  Vectorized:
        O(units + pages) numpy work plus O(touched nodes) Python.
        """
        phys, orders, bank = self._check_batch(phys, orders)
        if not phys.size:
            return
        if not self.strict:
            phys, orders, bank = self._drop_already_set(phys, orders, bank)
            if not phys.size:
                return
        g = self.geometry
        if self.strict and self._cover.last_ascending and self._cover.single_bank:
            # Disjoint units of one order: pack them first, check and mark the cover from the bits.
            order = int(orders[0])
            rows = [(index, bits) for _, index, bits in
                    packed_bitmaps(phys, orders, self._page_shift, g.bitmap_log2, self._DENSE_BITS, ascending=True)]
            self._cover.mark_unique_bits(order, rows, g.bitmap_log2)
            packed = [leaf for index, bits in rows for leaf in zip(g.leaf_key_array(order, index).tolist(), bits)]
            pages = None  # computed only to undo
        else:
            pages = self._cover.pages_of(phys, orders, bank)
            if self.strict:
                self._cover.mark_unique(pages)
            else:
                self._cover.add_pages(pages, 1)
            packed = list(self._packed_leaves(phys, orders))
        try:
            self._add_paths([leaf_key for leaf_key, _ in packed if leaf_key not in self._nodes[0]])
        except KHOError:
            if pages is None:
                pages = self._cover.pages_of(phys, orders, bank)
            if self.strict:
                self._cover.unmark_unique(pages)
            else:
                self._cover.add_pages(pages, -1)
            raise
        for leaf_key, bits in packed:
            self._leaf_array(leaf_key)[:] |= bits
            leaf = self._nodes[0][leaf_key]
            self.memory.write(leaf, self._pages[leaf])
        self._count_batch(orders, 1)

    def unpreserve_many(self, phys, orders=0) -> None:
        """Unpreserve a batch of exact units; ENOENT (and no change) if any is not preserved
        or the batch names a unit twice.  O(units + pages) numpy work."""
        phys, orders, bank = self._check_batch(phys, orders)
        if not phys.size:
            return
        plan, cleared = [], 0
        for leaf_key, bits in self._packed_leaves(phys, orders):
            leaf = self._leaf_array(leaf_key)
            if leaf is None or np.any(leaf & bits != bits):
                missing = bits if leaf is None else bits & ~leaf
                bit = int(np.flatnonzero(np.unpackbits(missing, bitorder="little"))[0])
                where, order = self.geometry.decode_key((leaf_key << self.geometry.bitmap_log2) | bit)
                raise KHOError("ENOENT", f"{where:#x} order {order} is not preserved")
            plan.append((leaf_key, leaf, bits))
            cleared += int(np.unpackbits(bits).sum())
        if cleared != phys.size:
            raise KHOError("ENOENT", "the batch unpreserves some unit twice")
        for leaf_key, leaf, bits in plan:
            leaf &= ~bits
            page = self._nodes[0][leaf_key]
            self.memory.write(page, self._pages[page])
        pages = self._cover.pages_of(phys, orders, bank)
        if self.strict:  # distinct units never share a page: each page goes back to 0
            self._cover.unmark_unique(pages)
        else:
            self._cover.add_pages(pages, -1)
        self._count_batch(orders, -1)

    def _count_batch(self, orders: np.ndarray, sign: int) -> None:
        if orders.size and int(orders.min()) == int(orders.max()):  # one order: no bincount of the batch
            self._count(int(orders[0]), sign * int(orders.size))
            return
        counts = np.bincount(orders)
        for order in np.flatnonzero(counts).tolist():
            self._count(order, sign * int(counts[order]))

    # -- queries ------------------------------------------------------------------------------
    def _orders_present(self) -> list[int]:
        return sorted(self._units_per_order)

    #: Leaves unpacked per numpy pass when listing units.
    _WALK_LEAVES = 1024

    def walk_array(self) -> tuple[np.ndarray, np.ndarray]:
        """All preserved units ``(phys uint64, order uint8)`` in the kernel's walk order
        (``kho_radix_walk_tree``: ascending key, so highest order first, then address).

        Leaves unpacked ``_WALK_LEAVES`` at a time: O(leaves * PAGE_SIZE * 8) numpy work,
        O(``_WALK_LEAVES`` pages * 8) temporary memory besides the result.
        """
        g = self.geometry
        leaf_keys = sorted(self._nodes[0])
        phys_parts, order_parts = [np.empty(0, np.uint64)], [np.empty(0, np.uint8)]
        for first in range(0, len(leaf_keys), self._WALK_LEAVES):
            chunk = leaf_keys[first:first + self._WALK_LEAVES]
            maps = np.stack([np.frombuffer(self._pages[self._nodes[0][k]], dtype=np.uint8) for k in chunk])
            pos = np.flatnonzero(np.unpackbits(maps, axis=1, bitorder="little").view(bool))
            keys = np.array(chunk, dtype=np.uint64)[pos >> g.bitmap_log2]
            order = g.leaf_order_array(keys)
            unit = g.leaf_first_unit_array(keys) + (pos & self._bit_mask)
            phys_parts.append(unit.view(np.uint64) << (order + self._page_shift).astype(np.uint64))
            order_parts.append(order.astype(np.uint8))
        return np.concatenate(phys_parts), np.concatenate(order_parts)

    def units_array(self) -> tuple[np.ndarray, np.ndarray]:
        """All preserved units as ``(phys uint64, order uint8)`` sorted by address (then
        order), like :meth:`Tracker.units_array <kho.currentkernel.tracker.Tracker.units_array>`."""
        phys, order = self.walk_array()
        sort = np.lexsort((order, phys))
        return phys[sort], order[sort]
