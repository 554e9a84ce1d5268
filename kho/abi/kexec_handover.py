"""``include/linux/kho/abi/kexec_handover.h``: the KHO root FDT, the radix tree, kho_vmalloc.

Also the two structures the header family leaves to ``kernel/liveupdate/kexec_handover.c``:
``struct kho_scratch`` (the scratch-area array handed to the next kernel) and the page
``private`` word the next kernel stamps on every preserved unit (``KHO_PAGE_MAGIC``).

All values little-endian (the kernel writes them native-endian on arm64 and x86_64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# -- the root FDT ----------------------------------------------------------------------------

#: Root ``compatible`` of each KHO ABI generation (the memory map of v2..v4 is one radix tree).
KHO_FDT_COMPATIBLE_V1 = "kho-v1"
KHO_FDT_COMPATIBLE_V2 = "kho-v2"
KHO_FDT_COMPATIBLE_V3 = "kho-v3"
KHO_FDT_COMPATIBLE_V4 = "kho-v4"
#: Every root compatible a kernel has written, oldest first.
KHO_FDT_COMPATIBLES = (KHO_FDT_COMPATIBLE_V1, KHO_FDT_COMPATIBLE_V2, KHO_FDT_COMPATIBLE_V3, KHO_FDT_COMPATIBLE_V4)
#: Root property: u64 phys of the preserved-memory map (chunk list head or radix root).
KHO_FDT_MEMORY_MAP_PROP_NAME = "preserved-memory-map"
#: Sub-node property of kho-v1: u64 phys of the subsystem's own FDT.
KHO_V1_SUB_TREE_PROP_NAME = "fdt"
#: Sub-node property of kho-v2 and later: u64 phys of the subsystem's blob.
KHO_SUB_TREE_PROP_NAME = "preserved-data"
#: Sub-node property of kho-v3 and later (required when reading): u64 size of the blob in bytes.
KHO_SUB_TREE_SIZE_PROP_NAME = "blob-size"

# -- the arm64 handoff (the next kernel's /chosen) ------------------------------------------------

#: ``/chosen`` property: ``<addr size>`` of the KHO FDT, in the root's cells (big-endian).
KHO_CHOSEN_FDT_PROP_NAME = "linux,kho-fdt"
#: ``/chosen`` property: ``<addr size>`` of the ``struct kho_scratch`` array.
KHO_CHOSEN_SCRATCH_PROP_NAME = "linux,kho-scratch"

# -- struct kho_scratch ------------------------------------------------------------------------

#: ``struct kho_scratch { phys_addr_t addr; phys_addr_t size; }``: one scratch area, bytes.
KHO_SCRATCH_DTYPE = np.dtype([("addr", "<u8"), ("size", "<u8")])
assert KHO_SCRATCH_DTYPE.itemsize == 16

# -- the page private word ---------------------------------------------------------------------

#: ``KHO_PAGE_MAGIC``: 'KHOP', stamped in a preserved unit's head page by the next kernel.
KHO_PAGE_MAGIC = 0x4B484F50
#: ``union kho_page_info { unsigned long page_private; struct { unsigned int order; unsigned int magic; }; }``.
KHO_PAGE_INFO_DTYPE = np.dtype([("order", "<u4"), ("magic", "<u4")])
assert KHO_PAGE_INFO_DTYPE.itemsize == 8

# -- struct kho_vmalloc ------------------------------------------------------------------------

#: ``struct kho_vmalloc``: phys of the first chunk, total pages, flags, page order (16 bytes).
KHO_VMALLOC_DTYPE = np.dtype([("first", "<u8"), ("total_pages", "<u4"), ("flags", "<u2"), ("order", "<u2")])
assert KHO_VMALLOC_DTYPE.itemsize == 16
#: ``struct kho_vmalloc_hdr``: phys of the next ``kho_vmalloc_chunk`` page (0 ends the list).
KHO_VMALLOC_HDR_DTYPE = np.dtype([("next", "<u8")])
assert KHO_VMALLOC_HDR_DTYPE.itemsize == 8
#: ``kho_vmalloc.flags``: the area was vmalloc()ed / mapped with huge pages.
KHO_VMALLOC_ALLOC = 0x1
KHO_VMALLOC_HUGE_VMAP = 0x2


def kho_vmalloc_size(page_size: int) -> int:
    """``KHO_VMALLOC_SIZE``: u64 page addresses in one chunk page (511 with 4 KiB pages). O(1)."""
    return (page_size - KHO_VMALLOC_HDR_DTYPE.itemsize) // 8


# -- the radix tree (kho-v2 .. kho-v4) ------------------------------------------------------------

#: Bits in a key (``unsigned long``) and in a physical address (``phys_addr_t``).
KHO_KEY_BITS = 64


@dataclass(frozen=True)
class RadixGeometry:
    """``enum kho_radix_consts`` for one page size, and the key arithmetic built on it.

    A unit of ``order`` at ``phys`` has the key ``(1 << (ORDER_0_LOG2 - order)) |
    (phys >> (PAGE_SHIFT + order))``: the position of the highest set bit is the order, the
    bits below it the unit number.  Leaves (level 0) are bitmaps of ``PAGE_SIZE * 8`` bits;
    inner nodes are ``u64 table[PAGE_SIZE / 8]`` of child phys.  The scalar methods take and
    return Python ints; the ``*_array`` methods are their vectorized forms over uint64
    arrays.  Every method is O(1) per key.

    ``depth_fix`` selects the depth formula: False is the one first merged (Linux 7.1,
    ``DIV_ROUND_UP(ORDER_0_LOG2 - BITMAP_LOG2, TABLE_LOG2) + 1``), which does not count the
    order bit itself, so with 16 KiB pages its 4 levels cover key bits 0..49 and cannot hold
    the order-0 marker at bit 50; True is the 2026 fix (``+ 1`` inside the division): 5
    levels for 16 KiB pages.  Both give 6 levels for 4 KiB and 4 for 64 KiB pages.
    """

    page_shift: int
    depth_fix: bool = False

    @property
    def order0_log2(self) -> int:
        """``KHO_ORDER_0_LOG2``: bit position of an order-0 key's order bit (``64 - PAGE_SHIFT``)."""
        return KHO_KEY_BITS - self.page_shift

    @property
    def table_log2(self) -> int:
        """``KHO_TABLE_SIZE_LOG2``: log2 of the u64 slots of an inner node (``PAGE_SIZE / 8``)."""
        return self.page_shift - 3

    @property
    def bitmap_log2(self) -> int:
        """``KHO_BITMAP_SIZE_LOG2``: log2 of the bits of a leaf (``PAGE_SIZE * 8``)."""
        return self.page_shift + 3

    @property
    def depth(self) -> int:
        """``KHO_TREE_MAX_DEPTH``: levels including the leaves (6 for 4 KiB pages; 16 KiB
        pages: 4, or 5 with ``depth_fix``)."""
        return -(-(self.order0_log2 - self.bitmap_log2 + self.depth_fix) // self.table_log2) + 1

    @property
    def root_level(self) -> int:
        """Level of the root node (``depth - 1``); ``preserved-memory-map`` points at it."""
        return self.depth - 1

    # -- one key ---------------------------------------------------------------------------
    def encode_key(self, phys: int, order: int) -> int:
        """The key of the unit of ``order`` at ``phys`` (bytes)."""
        return (1 << (self.order0_log2 - order)) | (phys >> (self.page_shift + order))

    def decode_key(self, key: int) -> tuple[int, int]:
        """``(phys in bytes, order)`` of a key; the order bit is shifted out of 64 bits."""
        order = self.order0_log2 - key.bit_length() + 1
        return (key << (self.page_shift + order)) & ((1 << KHO_KEY_BITS) - 1), order

    def table_index(self, key: int, level: int) -> int:
        """Slot of ``key`` in its node at ``level`` (1 .. depth - 1)."""
        return (key >> ((level - 1) * self.table_log2 + self.bitmap_log2)) % (1 << self.table_log2)

    def bitmap_index(self, key: int) -> int:
        """Bit of ``key`` in its leaf."""
        return key % (1 << self.bitmap_log2)

    # -- many keys -------------------------------------------------------------------------
    def leaf_key_array(self, order: int, leaf_index: np.ndarray) -> np.ndarray:
        """Leaf keys (``key >> BITMAP_LOG2``) of the leaves ``leaf_index`` of one ``order``.

        ``leaf_index`` counts leaves of that order from address 0: leaf ``i`` holds the units
        ``i * 2**BITMAP_LOG2 ..`` of the order.  uint64 in, uint64 out.
        """
        return np.uint64(1 << (self.order0_log2 - order - self.bitmap_log2)) | leaf_index.astype(np.uint64)

    def leaf_order_array(self, leaf_key: np.ndarray) -> np.ndarray:
        """The order encoded by each leaf key (int64; ``order0_log2 + 1`` for key 0)."""
        return self.order0_log2 - (fls64(leaf_key) + self.bitmap_log2) + 1

    def leaf_first_unit_array(self, leaf_key: np.ndarray) -> np.ndarray:
        """The unit number (``phys >> (PAGE_SHIFT + order)``) of bit 0 of each leaf (int64)."""
        top = fls64(leaf_key)
        order_bit = np.uint64(1) << np.maximum(top - 1, 0).astype(np.uint64)
        return ((leaf_key & ~order_bit) << np.uint64(self.bitmap_log2)).astype(np.int64)


def fls64(values: np.ndarray) -> np.ndarray:
    """``fls64`` of each uint64 (1-based index of the highest set bit, 0 for 0), int64.

    Exact for values below 2**53 (float64 exponent); a radix leaf key is below 2**50.
    """
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)
