"""``include/linux/kho/abi/block.h``: KHO serialization blocks (Linux 7.3, used by LUO).

A block set is a singly linked list of page-sized blocks (``KHO_BLOCK_SIZE`` =
``PAGE_SIZE``).  Each block starts with ``struct kho_block_header_ser`` and is followed by
``count`` fixed-size entries.  The limits are those of ``kernel/liveupdate/kho_block.c``:
a set holds at most :data:`KHO_MAX_BLOCKS` blocks, a block's ``count`` is 1 ..
``count_per_block`` (a restored set with a 0 or larger count is refused), and a cycle in
the ``next`` chain is refused.

All values little-endian; ``next`` is a physical address in bytes (0 ends the list).
"""

from __future__ import annotations

import numpy as np

#: ``struct kho_block_header_ser { u64 next; u64 count; } __packed``: 16 bytes.
KHO_BLOCK_HEADER_DTYPE = np.dtype([("next", "<u8"), ("count", "<u8")])
assert KHO_BLOCK_HEADER_DTYPE.itemsize == 16

#: ``KHO_MAX_BLOCKS``: the most blocks a set may have (kho_block.c's corruption guard).
KHO_MAX_BLOCKS = 10_000


def kho_block_size(page_size: int) -> int:
    """``KHO_BLOCK_SIZE``: one page, in bytes.  O(1)."""
    return page_size


def kho_block_count_per_block(page_size: int, entry_size: int) -> int:
    """``count_per_block``: entries of ``entry_size`` bytes after the header of one block.  O(1)."""
    return (kho_block_size(page_size) - KHO_BLOCK_HEADER_DTYPE.itemsize) // entry_size
