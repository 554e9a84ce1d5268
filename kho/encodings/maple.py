"""``maple``: a serialized range tree shaped like the kernel's maple tree (range64 nodes).

Every node is 256 bytes (:data:`MAPLE_NODE`), 16 to a 4 KiB page; pointers are the
physical addresses of nodes.  Keys are byte addresses; a node covers an inclusive key
range ``[min, max]`` given by its parent (the root covers ``[0, 2**64 - 1]``)::

    u64 pivot[15]   inclusive ends, ascending
    u64 slot[16]    leaf: values; internal: child node phys
    u8  level       0 for leaves, parent level - 1 for children
    u8  count       slots in use (1..16; 0 only in an empty tree's root leaf)
    u16 reserved    0
    u32 magic       the bytes "KHOM"

Leaf: slot ``i < count`` holds the value ``order << 1 | 1`` (a tagged value as the
kernel's ``xa_mk_value``; 0 would be NULL) of one preserved unit; the unit ends at
``pivot[i]`` (inclusive) for ``i < 15`` and at the node's ``max`` for ``i = 15``, and
starts ``page_size << order`` bytes before its end + 1: the gaps between units are
implicit, so a leaf holds up to 16 units.  Unused pivots and slots are 0.  The encoder
never fills the rightmost leaf (whose max is ``2**64 - 1``) beyond 15 units.

Internal: slot ``i < count`` points to child ``i``, which covers
``[pivot[i-1] + 1 (or min), pivot[i] (or max for the last child)]``; pivots ascend
strictly and the encoder sets each to the last byte of the child's last unit.

Nodes are written bottom-up, leaves first and the root last, packed into pages taken
from the allocator; the root FDT property ``preserved-memory-map`` holds the root's phys.
Folio orders survive.  :func:`lookup` answers "is this address preserved, and in which
unit" by descending one node per level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from kho.abi.kexec_handover import KHO_FDT_MEMORY_MAP_PROP_NAME
from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.devicetree.layout import pack_u64
from kho.encodings.base import DecodedMap, EncodedMap, Encoding, register
from kho.encodings.chunklist import magic_of
from kho.encodings.common import (
    alloc_pages_bulk,
    check_metadata_disjoint,
    check_page_size,
    check_pointers,
    check_units,
    max_unit_order,
    read_map_pointer,
    read_pages,
)
from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory

#: Number of slots in a node and of pivots (inclusive range ends).
MAPLE_SLOTS = 16
MAPLE_PIVOTS = MAPLE_SLOTS - 1
#: The serialized node (256 bytes, little-endian).
MAPLE_NODE = np.dtype([("pivot", "<u8", (MAPLE_PIVOTS,)), ("slot", "<u8", (MAPLE_SLOTS,)),
                       ("level", "u1"), ("count", "u1"), ("reserved", "<u2"), ("magic", "<u4")])
MAPLE_NODE_BYTES = MAPLE_NODE.itemsize
NODE_MAGIC = magic_of(b"KHOM")
#: The largest key (the root's ``max``).
KEY_MAX = (1 << 64) - 1
#: The highest root level a tree of at most 2**52 units can need (16**13 = 2**52).
MAX_LEVEL = 13

assert MAPLE_NODE_BYTES == 256


def unit_value(order: np.ndarray) -> np.ndarray:
    """Leaf slot values (uint64) for unit orders: ``order << 1 | 1``."""
    return (np.asarray(order, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)


@dataclass
class MapleEncodedMap(EncodedMap):
    """An :class:`EncodedMap` that also reports the tree's height (levels) and node count."""

    height: int = 1
    nr_nodes: int = 1


def _leaf_counts(n: int) -> np.ndarray:
    """Units per leaf: 16 each, the rightmost leaf at most 15 (its last unit needs an
    explicit pivot); one empty leaf for an empty set."""
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    leaves = -(-n // MAPLE_SLOTS)
    counts = np.full(leaves, MAPLE_SLOTS, dtype=np.int64)
    counts[-1] = n - MAPLE_SLOTS * (leaves - 1)
    if counts[-1] == MAPLE_SLOTS:
        counts[-1] = MAPLE_SLOTS - 1
        counts = np.append(counts, 1)
    return counts


def build_nodes(phys: np.ndarray, order: np.ndarray, page_size: int) -> tuple[np.ndarray, list[int]]:
    """The tree's nodes for units sorted by phys, leaves first and the root last, with
    child slots holding *node indices* (to be replaced by phys), and the node count per
    level (bottom-up).  Leaves are whole-array reshapes of the units: O(units) numpy work."""
    n = phys.size
    counts = _leaf_counts(n)
    end = phys + (np.uint64(page_size) << order.astype(np.uint64)) - np.uint64(1)
    value = unit_value(order)
    level_sizes = [counts.size]
    while level_sizes[-1] > 1:
        level_sizes.append(-(-level_sizes[-1] // MAPLE_SLOTS))
    nodes = np.zeros(sum(level_sizes), dtype=MAPLE_NODE)
    nodes["magic"] = NODE_MAGIC
    leaves = nodes[:counts.size]
    leaves["count"] = counts
    first = np.cumsum(counts) - counts
    full = int(np.count_nonzero(counts == MAPLE_SLOTS))  # the full leaves come first
    body = full * MAPLE_SLOTS
    leaves["pivot"][:full] = end[:body].reshape(full, MAPLE_SLOTS)[:, :MAPLE_PIVOTS]
    leaves["slot"][:full] = value[:body].reshape(full, MAPLE_SLOTS)
    for leaf in range(full, counts.size):  # the last one or two leaves
        lo, k = int(first[leaf]), int(counts[leaf])
        leaves["pivot"][leaf, :k] = end[lo:lo + k]
        leaves["slot"][leaf, :k] = value[lo:lo + k]
    subtree_max = end[np.maximum(first + counts - 1, 0)] if n else np.zeros(1, np.uint64)
    base = 0
    for level, (size, parents) in enumerate(zip(level_sizes, level_sizes[1:]), start=1):
        upper = nodes[base + size:base + size + parents]
        child = np.arange(size, dtype=np.int64)
        parent, pslot = child // MAPLE_SLOTS, child % MAPLE_SLOTS
        upper["level"] = level
        upper["count"] = np.minimum(MAPLE_SLOTS, size - np.arange(parents) * MAPLE_SLOTS)
        upper["slot"][parent, pslot] = (base + child).astype(np.uint64)
        last = (pslot == MAPLE_SLOTS - 1) | (child == size - 1)
        upper["pivot"][parent[~last], pslot[~last]] = subtree_max[~last]
        subtree_max = subtree_max[np.minimum(np.arange(parents) * MAPLE_SLOTS + MAPLE_SLOTS - 1, size - 1)]
        base += size
    return nodes, level_sizes


def _node_phys(pages: np.ndarray, index: np.ndarray, page_size: int) -> np.ndarray:
    per_page = page_size // MAPLE_NODE_BYTES
    return pages[index // per_page] + (index % per_page).astype(np.uint64) * np.uint64(MAPLE_NODE_BYTES)


# -- reading ------------------------------------------------------------------------------------
def _read_nodes(memory: PhysicalMemory, phys: np.ndarray, field: str, where: np.ndarray, strict: bool = True) -> np.ndarray:
    """The nodes at ``phys`` (uint64), validated as pointers (256-aligned, in RAM, and outside
    scratch when ``strict``); ``where`` is the phys of the slot each pointer was read from (0
    for the root property)."""
    check_pointers(memory, phys, MAPLE_NODE_BYTES, MAPLE_NODE_BYTES, field, strict=strict, where=where)
    ps = memory.page_size
    page_phys = phys & ~np.uint64(ps - 1)
    pages, inverse = np.unique(page_phys, return_inverse=True)
    data = read_pages(memory, pages).reshape(-1, MAPLE_NODE_BYTES)
    per_page = ps // MAPLE_NODE_BYTES
    rows = inverse.reshape(-1).astype(np.int64) * per_page + ((phys - page_phys) // np.uint64(MAPLE_NODE_BYTES)).astype(np.int64)
    return data[rows].reshape(-1).view(MAPLE_NODE)


def _fail(mask: np.ndarray, phys: np.ndarray, field: str, message: str) -> None:
    i = int(np.argmax(mask.reshape(mask.shape[0], -1).any(axis=1)))
    raise KHOFormatError(f"maple.{field}", message, int(phys[i]))


def _check_header(nodes: np.ndarray, phys: np.ndarray, level: int, root: bool) -> None:
    for mask, field, message in (
        (nodes["magic"] != NODE_MAGIC, "magic", "not a maple node"),
        (nodes["level"] != level, "level", f"expected level {level}"),
        (nodes["reserved"] != 0, "reserved", "must be 0"),
        (nodes["count"] > MAPLE_SLOTS, "count", f"more than {MAPLE_SLOTS} slots"),
        (nodes["count"] < (0 if root and level == 0 else 1), "count", "empty node"),
    ):
        if mask.any():
            _fail(mask, phys, field, message)


def _children(nodes: np.ndarray, phys: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Validate internal nodes covering ``[lo, hi]``; their children's phys, the phys of
    the slots they were read from, and the children's ``[lo, hi]`` (level order)."""
    count = nodes["count"].astype(np.int64)
    piv, slots = nodes["pivot"], nodes["slot"]
    pos = np.arange(MAPLE_SLOTS)
    used_piv = pos[:MAPLE_PIVOTS] < (count - 1)[:, None]
    used_slot = pos < count[:, None]
    ascending = np.ones_like(used_piv)
    ascending[:, 1:] = piv[:, 1:] > piv[:, :-1]
    first_ok = (count < 2) | (piv[:, 0] >= lo)
    last = piv[np.arange(nodes.size), np.maximum(count - 2, 0)]
    last_ok = (count < 2) | (last < hi)
    for mask, field, message in (
        (~used_piv & (piv != 0), "pivot", "unused pivot is not 0"),
        (~used_slot & (slots != 0), "slot", "unused slot is not 0"),
        (used_slot & (slots == 0), "slot", "child pointer is 0"),
        (used_piv & ~ascending, "pivot", "pivots do not ascend"),
        (~(first_ok & last_ok), "pivot", "pivot outside the node's range"),
    ):
        if mask.any():
            _fail(mask, phys, field, message)
    child_lo = np.empty((nodes.size, MAPLE_SLOTS), dtype=np.uint64)
    child_hi = np.empty_like(child_lo)
    child_lo[:, 0] = lo
    child_lo[:, 1:] = piv + np.uint64(1)
    child_hi[:, :MAPLE_PIVOTS] = piv
    child_hi[np.arange(nodes.size), count - 1] = hi
    slot_phys = phys[:, None] + np.uint64(MAPLE_PIVOTS * 8) + pos.astype(np.uint64) * np.uint64(8)
    return slots[used_slot], slot_phys[used_slot], child_lo[used_slot], child_hi[used_slot]


def _leaf_units(nodes: np.ndarray, phys: np.ndarray, lo: np.ndarray, hi: np.ndarray, memory: PhysicalMemory,
                max_order: int | None = None):
    """Validate leaves covering ``[lo, hi]`` with unit orders at most ``max_order`` (default
    MAX_PAGE_ORDER); their units ``(phys, order)`` in order, and a function giving the phys
    of the slot unit ``i`` was read from."""
    max_order = memory.geometry.max_order if max_order is None else max_order
    count = nodes["count"].astype(np.int64)
    piv, slots = nodes["pivot"], nodes["slot"]
    pos = np.arange(MAPLE_SLOTS)
    used_slot = pos < count[:, None]
    used_piv = used_slot[:, :MAPLE_PIVOTS]
    order = slots >> np.uint64(1)
    for mask, field, message in (
        (~used_piv & (piv != 0), "pivot", "unused pivot is not 0"),
        (~used_slot & (slots != 0), "slot", "unused slot is not 0"),
        (used_slot & ((slots & np.uint64(1)) == 0), "slot", "not a value entry"),
        (used_slot & (order > np.uint64(max_order)), "slot",
         f"order above {'MAX_PAGE_ORDER ' if max_order == memory.geometry.max_order else ''}{max_order}"),
    ):
        if mask.any():
            _fail(mask, phys, field, message)
    ends = np.empty((nodes.size, MAPLE_SLOTS), dtype=np.uint64)
    ends[:, :MAPLE_PIVOTS] = piv
    ends[:, MAPLE_PIVOTS] = hi
    after = ends + np.uint64(1)
    size = np.left_shift(np.uint64(memory.page_size), order)
    start = after - size
    beyond = ends >= np.uint64(1 << 63)
    misaligned = (after & (size - np.uint64(1))) != 0
    outside = ends > hi[:, None]
    before = start > ends  # the unit would start below address 0
    before[:, 0] |= start[:, 0] < lo
    before[:, 1:] |= start[:, 1:] <= ends[:, :-1]
    for mask, message in (
        (beyond, "unit end beyond the address space"),
        (misaligned, "unit end + 1 not aligned to the unit size"),
        (outside, "unit ends beyond the node's range"),
        (before, "unit starts before the previous one ends or below the node's range"),
    ):
        mask &= used_slot
        if mask.any():
            _fail(mask, phys, "pivot", message)
    def locate(i: int) -> int:
        node, slot = divmod(int(np.flatnonzero(used_slot)[i]), MAPLE_SLOTS)
        return int(phys[node]) + MAPLE_PIVOTS * 8 + slot * 8

    return start[used_slot], order[used_slot].astype(np.uint8), locate


def _check_unique(child: np.ndarray, where: np.ndarray) -> None:
    """KHOFormatError when two slots of one level point to the same node (a node reached
    at two levels fails its level check instead), before the next level is read."""
    sort = np.argsort(child, kind="stable")
    dup = np.flatnonzero(child[sort][1:] == child[sort][:-1])
    if dup.size:
        i = int(sort[dup[0] + 1])
        raise KHOFormatError("maple.slot", f"node {int(child[i]):#x} is reached twice", int(where[i]))


def _root(memory: PhysicalMemory, props: Mapping[str, bytes], strict: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    root = np.array([read_map_pointer(props)], dtype=np.uint64)
    node = _read_nodes(memory, root, f"fdt.{KHO_FDT_MEMORY_MAP_PROP_NAME}", np.zeros(1, np.uint64), strict)
    level = int(node["level"][0])
    if int(node["magic"][0]) == NODE_MAGIC and level > MAX_LEVEL:
        raise KHOFormatError("maple.level", f"root level {level} is above {MAX_LEVEL}", int(root[0]))
    return root, node, level


def decode_tree(memory: PhysicalMemory, props: Mapping[str, bytes], *, strict: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Read and validate the whole tree, one level at a time: units ``(phys, order)``,
    node phys (sorted), height.  O(nodes) numpy work plus one read per node page."""
    phys, nodes, level = _root(memory, props, strict)
    height = level + 1
    lo = np.zeros(1, dtype=np.uint64)
    hi = np.full(1, KEY_MAX, dtype=np.uint64)
    all_phys = [phys]
    while True:
        _check_header(nodes, phys, level, root=len(all_phys) == 1)
        if level == 0:
            unit_phys, order, locate = _leaf_units(nodes, phys, lo, hi, memory, max_unit_order(memory, strict))
            break
        child, where, lo, hi = _children(nodes, phys, lo, hi)
        _check_unique(child, where)
        level -= 1
        nodes = _read_nodes(memory, child, "maple.slot", where, strict)
        phys = child
        all_phys.append(phys)
    node_phys = np.concatenate(all_phys)
    check_units(memory, unit_phys, order, "maple.leaf", locate, strict=strict)
    return unit_phys, order, np.sort(node_phys), height


def lookup(memory: PhysicalMemory, props: Mapping[str, bytes], phys: int) -> tuple[int, int] | None:
    """The preserved unit ``(phys, order)`` holding byte ``phys``, or None, found by
    descending from the root: one node read and validated per level, O(height)."""
    if not 0 <= phys <= KEY_MAX:
        raise KHOError("EINVAL", f"address {phys:#x} is not an unsigned 64-bit value")
    node_phys, nodes, level = _root(memory, props)
    lo = np.zeros(1, dtype=np.uint64)
    hi = np.full(1, KEY_MAX, dtype=np.uint64)
    root = True
    key = np.uint64(phys)
    while True:
        _check_header(nodes, node_phys, level, root)
        if level == 0:
            start, order, _ = _leaf_units(nodes, node_phys, lo, hi, memory)
            ends = start + (np.uint64(memory.page_size) << order.astype(np.uint64)) - np.uint64(1)
            i = int(np.searchsorted(ends, key))
            if i < start.size and start[i] <= key:
                return int(start[i]), int(order[i])
            return None
        child, where, child_lo, child_hi = _children(nodes, node_phys, lo, hi)
        i = min(int(np.searchsorted(child_hi, key)), child.size - 1)
        level -= 1
        node_phys, lo, hi = child[i:i + 1], child_lo[i:i + 1], child_hi[i:i + 1]
        nodes = _read_nodes(memory, node_phys, "maple.slot", where[i:i + 1])
        root = False


@register
class Maple(Encoding):
    """A maple-tree-like range tree of 256-byte nodes; keeps folio orders."""

    name = "maple"
    compatible = "kho-maple"
    keeps_orders = True

    def encode(self, tracker: Tracker, allocator: PageAllocator) -> MapleEncodedMap:
        """Build the levels bottom-up in numpy, then write the node pages.  O(units)."""
        memory = tracker.memory
        check_page_size(self.name, self.page_size, memory)
        phys, order = tracker.units_array()
        nodes, level_sizes = build_nodes(phys, order, self.page_size)
        per_page = self.page_size // MAPLE_NODE_BYTES
        pages = alloc_pages_bulk(allocator, -(-nodes.size // per_page), self.page_size)
        internal = nodes[level_sizes[0]:]
        slots = internal["slot"]
        used = np.arange(MAPLE_SLOTS) < internal["count"][:, None]
        slots[used] = _node_phys(pages, slots[used].astype(np.int64), self.page_size)
        buf = np.zeros(pages.size * per_page, dtype=MAPLE_NODE)
        buf[:nodes.size] = nodes
        data = buf.view(np.uint8).reshape(pages.size, self.page_size)
        for i, page in enumerate(pages.tolist()):
            memory.write(page, data[i])
        root = int(_node_phys(pages, np.array([nodes.size - 1]), self.page_size)[0])
        return MapleEncodedMap(self.name, self.compatible, {KHO_FDT_MEMORY_MAP_PROP_NAME: pack_u64(root)}, np.sort(pages),
                               self.page_size, height=len(level_sizes), nr_nodes=int(nodes.size))

    def decode(self, memory: PhysicalMemory, props: Mapping[str, bytes], *, strict: bool = True) -> DecodedMap:
        """Validate every node level by level; the units in address order.

        The tree's shape is checked in both modes (it is what orders the units).
        ``strict`` adds: orders at most MAX_PAGE_ORDER, units and nodes outside scratch,
        nodes outside the preserved units.  ``strict=False`` allows orders up to the
        physical address space and skips those placement checks."""
        check_page_size(self.name, self.page_size, memory)
        phys, order, node_phys, _ = decode_tree(memory, props, strict=strict)
        pages = np.unique(node_phys & ~np.uint64(memory.page_size - 1))
        if strict:
            check_metadata_disjoint(memory, pages, phys, order, "maple.node")
        return DecodedMap(phys, order, exact_orders=True, metadata_pages=pages)

    def lookup(self, memory: PhysicalMemory, props: Mapping[str, bytes], phys: int) -> tuple[int, int] | None:
        """See :func:`lookup`."""
        check_page_size(self.name, self.page_size, memory)
        return lookup(memory, props, phys)
