"""The kho-v1 memory map of Linux 6.16 .. 6.19: a linked list of ``khoser_mem_chunk`` pages.

The kernel defined these in ``kernel/kexec_handover.c`` (no ABI header existed yet).  Every
chunk is one page: a 16-byte ``struct khoser_mem_chunk_hdr`` then ``KHOSER_BITMAP_SIZE``
``struct khoser_mem_bitmap_ptr`` entries (255 with 4 KiB pages).  Each entry names a
bitmap of ``PRESERVE_BITS`` bits (``struct kho_mem_phys_bits``): bit ``b`` set means the
unit of the chunk's order at ``phys_start + (b << (order + PAGE_SHIFT))``.
All values little-endian.
"""

from __future__ import annotations

import numpy as np

#: ``PRESERVE_BITS`` of Linux 6.16: 512-byte bitmaps.  Later kernels use ``PAGE_SIZE * 8``.
PRESERVE_BITS_6_16 = 512 * 8

#: ``struct khoser_mem_chunk_hdr``: phys of the next chunk (0 ends the list), order, entries used.
KHOSER_MEM_CHUNK_HDR_DTYPE = np.dtype([("next", "<u8"), ("order", "<u4"), ("num_elms", "<u4")])
assert KHOSER_MEM_CHUNK_HDR_DTYPE.itemsize == 16
#: ``struct khoser_mem_bitmap_ptr``: first byte covered by the bitmap, phys of the bitmap.
KHOSER_MEM_BITMAP_PTR_DTYPE = np.dtype([("phys_start", "<u8"), ("bitmap", "<u8")])
assert KHOSER_MEM_BITMAP_PTR_DTYPE.itemsize == 16


def khoser_bitmap_size(page_size: int) -> int:
    """``KHOSER_BITMAP_SIZE``: entries in one chunk page (255 with 4 KiB pages).  O(1)."""
    return (page_size - KHOSER_MEM_CHUNK_HDR_DTYPE.itemsize) // KHOSER_MEM_BITMAP_PTR_DTYPE.itemsize


def khoser_mem_chunk_dtype(page_size: int) -> np.dtype:
    """``struct khoser_mem_chunk``: the header then :func:`khoser_bitmap_size` entries, one page."""
    dtype = np.dtype([("hdr", KHOSER_MEM_CHUNK_HDR_DTYPE),
                      ("entries", KHOSER_MEM_BITMAP_PTR_DTYPE, (khoser_bitmap_size(page_size),))])
    assert dtype.itemsize == page_size
    return dtype
