"""kho-v2: the kernel's KHO radix tree (include/linux/kho/abi/kexec_handover.h).

Every node is one page.  A unit of ``order`` at ``phys`` has the key
``(1 << (ORDER0 - order)) | (phys >> (PAGE_SHIFT + order))`` with ``ORDER0 = 64 -
PAGE_SHIFT`` (52 for 4 KiB pages): the position of the highest set bit encodes the order,
the bits below it the unit number.  Decoding: ``order = ORDER0 - fls64(key) + 1`` and
``phys = key << (PAGE_SHIFT + order)`` (the order bit is shifted out of 64 bits).

Geometry from PAGE_SHIFT, as the kernel header derives it:

* leaves (level 0) are bitmaps of ``PAGE_SIZE * 8`` bits: ``BITMAP_LOG2 = PAGE_SHIFT + 3``;
  a key's bit is ``key % 2**BITMAP_LOG2``;
* inner nodes are ``u64 table[PAGE_SIZE / 8]`` of child phys (0 = empty):
  ``TABLE_LOG2 = PAGE_SHIFT - 3``; the slot at level ``i >= 1`` is
  ``(key >> ((i - 1) * TABLE_LOG2 + BITMAP_LOG2)) % 2**TABLE_LOG2``;
* depth ``ceil((ORDER0 - BITMAP_LOG2) / TABLE_LOG2) + 1`` levels (6 for 4 KiB pages, 4 for
  16 KiB and 64 KiB); the root is at level ``depth - 1`` and ``preserved-memory-map`` holds
  its phys.

The kernel's depth formula does not count the order bit itself: the tables and the leaf
cover key bits ``0 .. BITMAP_LOG2 + (depth - 1) * TABLE_LOG2 - 1``.  With 4 KiB and 64 KiB
pages that is enough (bits 0..59 and 0..57 for keys of at most 53 and 49 bits), but with
16 KiB pages the tables cover bits 0..49 while an order-0 key has its order bit at bit 50:
the kernel's walk would rebuild a different key.  kho follows the kernel's geometry and
refuses (EINVAL) to encode units whose key does not fit; the decoder, walking the same
geometry, can never produce them.

The kernel's walk visits slots in ascending order, depth first, so units come out in
ascending key order: highest orders first, addresses ascending within an order.

Where kho places what it writes (documented in spec/kho-abi.md, relied on by the golden
tests): pages are allocated root first, then each level's nodes from the top level down in
ascending key order, then the leaves in ascending key order.  The tracker's bitmaps become
the leaves directly when they are page-sized (a page bitmap covers exactly one leaf);
512-byte bitmaps are gathered eight (``page_size / 512``) to a leaf.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from kho.abi.kexec_handover import KHO_FDT_MEMORY_MAP_PROP_NAME, KHO_KEY_BITS, RadixGeometry
from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.radix_tracker import RadixTracker
from kho.currentkernel.tracker import Tracker
from kho.devicetree.layout import pack_u64
from kho.encodings import common
from kho.encodings.base import DecodedMap, EncodedMap, Encoding, register
from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory


@register
class KhoV2(Encoding):
    """The kho-v2 radix tree (Linux 7.1).  ``depth_fix``: the ``KHO_TREE_MAX_DEPTH`` formula
    (only 16 KiB pages tell them apart); the kernel that wrote the map decides it."""

    name = "kho-v2"
    compatible = "kho-v2"
    keeps_orders = True
    #: Whether the kernels writing this ABI had the depth fix, when not told otherwise.
    default_depth_fix = False

    def __init__(self, page_size: int = 4096, depth_fix: bool | None = None, **options):
        super().__init__(page_size, **options)
        self.depth_fix = self.default_depth_fix if depth_fix is None else bool(depth_fix)
        self.geometry = RadixGeometry(page_size.bit_length() - 1, self.depth_fix)
        self.slots = page_size // 8

    def options(self) -> dict:
        return {} if self.depth_fix == self.default_depth_fix else {"depth_fix": self.depth_fix}

    # -- encode ------------------------------------------------------------------------------
    def leaf_keys(self, tracker: Tracker) -> tuple[np.ndarray, np.ndarray]:
        """Leaves for the tracker: ``(leaf key uint64[n] ascending, bitmaps uint8[n, page_size])``.

        A leaf key is ``key >> BITMAP_LOG2`` for the keys of its bits.  O(bitmaps).
        """
        g = self.geometry
        keys, maps = [], []
        for order, index, bitmaps in common.tracker_bitmaps(tracker, 1 << g.bitmap_log2):
            keys.append(g.leaf_key_array(order, index))
            maps.append(bitmaps)
        if not keys:
            return np.empty(0, np.uint64), np.empty((0, self.page_size), np.uint8)
        keys_arr, maps_arr = np.concatenate(keys), np.concatenate(maps)
        sort = np.argsort(keys_arr, kind="stable")
        return keys_arr[sort], maps_arr[sort]

    def encode(self, tracker: Tracker | RadixTracker, allocator: PageAllocator) -> EncodedMap:
        """Write the radix tree for ``tracker`` into ``tracker.memory``.

        Pages: the leaves plus, per level, one node per distinct key prefix (5 inner nodes
        and 512 leaves for 16 GiB of random order-0 pages in 64 GiB).  All pages are
        allocated before anything is written.  O(nodes) Python + O(bytes) numpy.
        """
        memory = tracker.memory
        common.check_page_size(self.name, self.page_size, memory)
        if isinstance(tracker, RadixTracker):
            return self._live_map(tracker)
        g = self.geometry
        leaf_key, leaves = self.leaf_keys(tracker)
        lost = (leaf_key >> np.uint64(g.root_level * g.table_log2)) != 0
        if lost.any():
            order = g.order0_log2 - g.bitmap_log2 - (int(leaf_key[np.argmax(lost)]).bit_length() - 1)
            raise KHOError("EINVAL", f"kho-v2 with {self.page_size}-byte pages cannot hold units of order {order}: "
                                     f"the kernel's {g.depth}-level tree leaves key bit {g.order0_log2 - order} outside its tables")
        # prefixes[l] = the keys (shifted) of the nodes at level l, ascending; level 0 = leaves.
        prefixes = [leaf_key]
        for level in range(1, g.depth):
            prefixes.append(np.unique(leaf_key >> np.uint64(level * g.table_log2)))
        prefixes[g.root_level] = np.zeros(1, np.uint64)  # the root always exists
        counts = [p.size for p in prefixes]
        order_of_alloc = list(range(g.root_level, -1, -1))
        pages = common.alloc_pages_bulk(allocator, sum(counts), self.page_size, max_order=0)
        phys_of: dict[int, np.ndarray] = {}
        first = 0
        for level in order_of_alloc:
            phys_of[level] = pages[first:first + counts[level]]
            first += counts[level]
        mask = np.uint64(self.slots - 1)
        for level in range(g.root_level, 0, -1):
            tables = np.zeros((counts[level], self.slots), dtype="<u8")
            child = prefixes[level - 1]
            parent = np.searchsorted(prefixes[level], child >> np.uint64(g.table_log2))
            tables[parent, (child & mask).astype(np.int64)] = phys_of[level - 1]
            for k in range(counts[level]):
                memory.write(int(phys_of[level][k]), tables[k])
        for k in range(counts[0]):
            memory.write(int(phys_of[0][k]), leaves[k])
        return EncodedMap(self.name, self.compatible, {KHO_FDT_MEMORY_MAP_PROP_NAME: pack_u64(int(phys_of[g.root_level][0]))},
                          np.sort(pages), self.page_size, self.options())

    # -- decode ------------------------------------------------------------------------------
    def decode(self, memory: PhysicalMemory, props: Mapping[str, bytes], *, strict: bool = True) -> DecodedMap:
        """Walk the tree level by level, :data:`~kho.encodings.common.DECODE_BATCH` nodes at a time.

        Both modes: a non-zero root pointer (the kernel refuses 0 too); every pointer
        page-aligned and in RAM; no page reached twice (a kernel never shares a node, and a
        shared one would let a few pages stand for 512**5 leaf visits); no table slot or leaf
        key encoding no order or an order too large for the physical address space; units as
        :func:`~kho.encodings.common.finish_units` checks them.  ``strict`` adds: orders at most MAX_PAGE_ORDER,
        nodes outside scratch, and the unit checks of :func:`~kho.encodings.common.finish_units`.
        O(nodes) page reads + O(leaf bytes + set bits) numpy.
        """
        common.check_page_size(self.name, self.page_size, memory)
        g = self.geometry
        ps = self.page_size
        root = common.read_map_pointer(props)
        common.check_pointers(memory, np.array([root], np.uint64), ps, ps, f"fdt.{KHO_FDT_MEMORY_MAP_PROP_NAME}", strict=strict)
        node_phys = np.array([root], np.uint64)
        node_prefix = np.zeros(1, np.uint64)
        visited = [node_phys]
        # A valid key is below 2**(ORDER0 + 1): its order bit is at most ORDER0 (order 0).
        key_limit_log2 = g.order0_log2 + 1
        for level in range(g.root_level, 0, -1):
            child_phys, child_prefix = [], []
            for b in range(0, node_phys.size, common.DECODE_BATCH):
                tables = common.read_pages(memory, node_phys[b:b + common.DECODE_BATCH], "radix.node").view("<u8")
                rows, slots = np.nonzero(tables)
                prefix = (node_prefix[b:b + common.DECODE_BATCH][rows] << np.uint64(g.table_log2)) | slots.astype(np.uint64)
                limit_log2 = key_limit_log2 - g.bitmap_log2 - (level - 1) * g.table_log2
                if limit_log2 < KHO_KEY_BITS:
                    high = prefix >= np.uint64(1 << max(limit_log2, 0))
                    if high.any():
                        i = int(np.argmax(high))
                        raise KHOFormatError("radix.table", f"slot {int(slots[i])} at level {level} holds keys of no valid order",
                                             int(node_phys[b + rows[i]]) + 8 * int(slots[i]))
                child_phys.append(tables[rows, slots].astype(np.uint64))
                child_prefix.append(prefix)
            node_phys = np.concatenate(child_phys) if child_phys else np.empty(0, np.uint64)
            node_prefix = np.concatenate(child_prefix) if child_prefix else np.empty(0, np.uint64)
            field = "radix.leaf" if level == 1 else "radix.node"
            common.check_pointers(memory, node_phys, ps, ps, field, strict=strict)
            visited.append(node_phys)
            common.check_distinct(np.concatenate(visited), field, "a radix tree page")
        leaf_phys, leaf_key = node_phys, node_prefix
        order = g.leaf_order_array(leaf_key)
        limit = common.max_unit_order(memory, strict, capped=False)
        bad = (leaf_key == 0) | (order < 0) | (order > limit)
        if bad.any():
            i = int(np.argmax(bad))
            raise KHOFormatError("radix.key", f"leaf key {int(leaf_key[i]):#x} encodes no order in 0..{limit}", int(leaf_phys[i]))
        first_unit = g.leaf_first_unit_array(leaf_key)
        phys_parts, order_parts = [], []
        for b in range(0, leaf_phys.size, common.DECODE_BATCH):
            part = slice(b, b + common.DECODE_BATCH)
            phys, unit_order = common.units_from_bitmaps(common.read_pages(memory, leaf_phys[part], "radix.leaf"), first_unit[part], order[part],
                                                  g.page_shift, leaf_phys[part])
            phys_parts.append(phys)
            order_parts.append(unit_order)
        phys = np.concatenate(phys_parts) if phys_parts else np.empty(0, np.uint64)
        unit_order = np.concatenate(order_parts) if order_parts else np.empty(0, np.uint8)
        return common.finish_units(memory, phys, unit_order, np.concatenate(visited), strict=strict, metadata_field="radix.node",
                            capped=False)

    def _live_map(self, tracker: RadixTracker) -> EncodedMap:
        """A 7.x kernel's map needs no writing: the live radix tree is it.  EINVAL when the
        tree was built with another depth formula.  O(nodes)."""
        if tracker.geometry != self.geometry:
            raise KHOError("EINVAL", f"{self.name} with depth_fix={self.depth_fix} cannot hand over a tree built "
                                     f"with depth_fix={tracker.geometry.depth_fix}")
        return EncodedMap(self.name, self.compatible, {KHO_FDT_MEMORY_MAP_PROP_NAME: pack_u64(tracker.root_phys)},
                          tracker.radix_pages(), self.page_size, self.options())


@register
class KhoV3(KhoV2):
    """kho-v3 (Linux 7.2): the kho-v2 radix map; sub-nodes gain a required ``blob-size``."""

    name = "kho-v3"
    compatible = "kho-v3"
    default_depth_fix = True


@register
class KhoV4(KhoV2):
    """kho-v4 (Linux 7.3): the same root and map as kho-v3 (LUO's blocks are what changed)."""

    name = "kho-v4"
    compatible = "kho-v4"
    default_depth_fix = True
