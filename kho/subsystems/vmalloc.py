"""``struct kho_vmalloc``: a vmalloc area handed over page by page (``kho_preserve_vmalloc``).

The descriptor (16 bytes, :data:`~kho.abi.kexec_handover.KHO_VMALLOC_DTYPE`) points at a
list of chunk pages; each chunk is ``struct kho_vmalloc_hdr`` (``u64 next``) then ``kho_vmalloc_size(PAGE_SIZE)`` u64
physical addresses of the area's blocks (each ``1 << order`` contiguous pages, in the
area's virtual order), zero-terminated when not full.  As the kernel does, the writer
starts a new chunk as soon as one is full, so an area of exactly a multiple of the
capacity ends with an empty chunk.  Chunks are preserved as order-0 pages, blocks with
``kho_preserve_pages``.

The reader follows ``kho_restore_vmalloc``: chunks until ``next`` is 0, entries until a
zero one, every entry adding ``1 << order`` pages, the total equal to ``total_pages``.
Both modes refuse a loop of chunks, more chunks than blocks + 1 (an empty chunk adds
nothing), an entry that would exceed ``total_pages`` and blocks outside RAM.  Strict also
refuses unknown flags, an order above MAX_PAGE_ORDER, misaligned or repeated blocks and a
chunk list the writer cannot produce (an entry after a zero, a full last chunk, a short
chunk with a successor).  The kernel ignores unknown flag bits; lenient does too.
Cost: O(chunks + blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kho.abi.kexec_handover import (
    KHO_VMALLOC_ALLOC,
    KHO_VMALLOC_DTYPE,
    KHO_VMALLOC_HUGE_VMAP,
    kho_vmalloc_size,
)
from kho.errors import KHOError, KHOFormatError
from kho.subsystems.common import Range, check_pointer, in_ram

#: Flags ``kho_vmalloc.flags`` may carry.
KHO_VMALLOC_KNOWN_FLAGS = KHO_VMALLOC_ALLOC | KHO_VMALLOC_HUGE_VMAP
#: Largest page order a lenient read accepts: a block must fit a 64-bit address space.
_MAX_ADDRESS_BITS = 64


@dataclass(frozen=True)
class VmallocArea:
    """A preserved vmalloc area: the descriptor's fields, its chunk pages and its blocks.

    ``first`` is the first chunk's phys (0 for an empty descriptor), ``total_pages`` the
    area's pages, ``order`` the log2 pages of each block, ``chunks`` the chunk pages in
    list order, ``blocks`` the block phys in the area's virtual order.
    """

    first: int
    total_pages: int
    flags: int
    order: int
    chunks: tuple[int, ...]
    blocks: tuple[int, ...]

    def descriptor(self) -> bytes:
        """The 16-byte ``struct kho_vmalloc``."""
        desc = np.zeros(1, dtype=KHO_VMALLOC_DTYPE)
        desc["first"], desc["total_pages"], desc["flags"], desc["order"] = self.first, self.total_pages, self.flags, self.order
        return desc.tobytes()

    def read(self, memory, nbytes: int | None = None) -> bytes:
        """The area's contents in virtual order (``nbytes`` of them, default all).  O(nbytes)."""
        block = memory.page_size << self.order
        want = self.total_pages * memory.page_size if nbytes is None else nbytes
        parts, left = [], want
        for phys in self.blocks:
            if left <= 0:
                break
            parts.append(memory.read(phys, min(block, left)))
            left -= block
        return b"".join(parts)

    def referenced_ranges(self, page_size: int) -> list[Range]:
        """The chunk pages and the blocks."""
        return ([Range(c, page_size, "kho_vmalloc chunk") for c in self.chunks]
                + [Range(b, page_size << self.order, "kho_vmalloc block") for b in self.blocks])

    def to_json(self) -> dict:
        return {"first": self.first, "total_pages": self.total_pages, "flags": self.flags, "order": self.order,
                "chunks": list(self.chunks), "blocks": list(self.blocks)}


def _new_chunk(memory, allocator, tracker) -> int:
    """``new_vmalloc_chunk``: a zeroed page, preserved as one page."""
    phys = allocator.alloc_pages(0)
    try:
        memory.write(phys, bytes(memory.page_size))
        tracker.preserve_pages(phys, 1)
    except KHOError:
        allocator.free_pages(phys, 0)
        raise
    return phys


def _preserve_blocks(tracker, blocks: np.ndarray, order: int, block_bytes: int) -> None:
    """``kho_preserve_pages`` of every ``1 << order``-page block, all or nothing.  Naturally
    aligned blocks are one unit of ``order`` each, so a tracker with a vectorized
    ``preserve_many`` (all or nothing itself) takes them in one call; otherwise block by
    block, undone on failure."""
    preserve_many = getattr(tracker, "preserve_many", None)
    if preserve_many is not None and not (blocks % np.uint64(block_bytes)).any():
        preserve_many(blocks, order)
        return
    done: list[int] = []
    try:
        for phys in blocks.tolist():
            tracker.preserve_pages(phys, 1 << order)
            done.append(phys)
    except KHOError:
        for phys in done:
            tracker.unpreserve_pages(phys, 1 << order)
        raise


def preserve_vmalloc(memory, allocator, tracker, blocks: Sequence[int] | np.ndarray, order: int = 0,
                     flags: int = KHO_VMALLOC_ALLOC) -> VmallocArea:
    """``kho_preserve_vmalloc`` of an area made of ``blocks`` (phys of each ``1 << order``-page
    block, in virtual order): ``len(blocks) // capacity + 1`` chunk pages allocated and
    preserved (a full chunk is always followed by another, as in the kernel), every block
    preserved, the chunk list written.  On failure everything preserved is unpreserved and
    the chunks freed (the kernel's ``kho_unpreserve_vmalloc``).  EINVAL for unknown flags.
    O(blocks), one tracker call for aligned blocks.
    """
    if flags & ~KHO_VMALLOC_KNOWN_FLAGS:
        raise KHOError("EINVAL", f"vmalloc flags {flags:#x} are not ALLOC/HUGE_VMAP")
    ps = memory.page_size
    cap = kho_vmalloc_size(ps)
    blocks = np.asarray(blocks, dtype=np.uint64).reshape(-1)
    chunks: list[int] = []
    try:
        for _ in range(blocks.size // cap + 1):
            chunks.append(_new_chunk(memory, allocator, tracker))
        _preserve_blocks(tracker, blocks, order, ps << order)
    except KHOError:
        for chunk in chunks:
            tracker.unpreserve_pages(chunk, 1)
            allocator.free_pages(chunk, 0)
        raise
    for i, chunk in enumerate(chunks):
        words = np.zeros(ps // 8, dtype="<u8")
        words[0] = chunks[i + 1] if i + 1 < len(chunks) else 0
        part = blocks[i * cap:(i + 1) * cap]
        words[1:1 + part.size] = part
        memory.write(chunk, words.tobytes())
    return VmallocArea(chunks[0], int(blocks.size) << order, flags, order, tuple(chunks), tuple(blocks.tolist()))


def vmalloc(memory, allocator, tracker, data: bytes, zeroed_pages: int = 0) -> VmallocArea:
    """``vmalloc`` + ``kho_preserve_vmalloc``: order-0 pages for ``data`` (at least
    ``zeroed_pages``, as ``vcalloc``), written (zero-padded) and preserved.  Pages are
    freed again on failure.  O(pages)."""
    ps = memory.page_size
    nr_pages = max(-(-len(data) // ps), zeroed_pages, 1)
    pages = []
    try:
        for i in range(nr_pages):
            pages.append(allocator.alloc_pages(0))
            memory.write(pages[-1], data[i * ps:(i + 1) * ps].ljust(ps, b"\0"))
        return preserve_vmalloc(memory, allocator, tracker, pages)
    except KHOError:
        for phys in pages:
            allocator.free_pages(phys, 0)
        raise


def read_vmalloc(memory, raw: bytes, *, strict: bool = True, field: str = "kho_vmalloc",
                 location: int | None = None) -> VmallocArea:
    """Decode a ``struct kho_vmalloc`` (``raw``, 16 bytes found at ``location``) and walk
    its chunks in ``memory`` (see the module docstring for the checks).  O(chunks + blocks)."""
    if len(raw) != KHO_VMALLOC_DTYPE.itemsize:
        raise KHOFormatError(field, f"{len(raw)} bytes, not {KHO_VMALLOC_DTYPE.itemsize}", location)
    desc = np.frombuffer(raw, dtype=KHO_VMALLOC_DTYPE)[0]
    first, total, flags, order = int(desc["first"]), int(desc["total_pages"]), int(desc["flags"]), int(desc["order"])
    ps = memory.page_size
    shift = ps.bit_length() - 1
    if strict and flags & ~KHO_VMALLOC_KNOWN_FLAGS:
        raise KHOFormatError(f"{field}.flags", f"unknown flags {flags:#x}", location)
    max_order = getattr(getattr(memory, "geometry", None), "max_order", None)
    if order + shift >= _MAX_ADDRESS_BITS or (strict and max_order is not None and order > max_order):
        raise KHOFormatError(f"{field}.order", f"order {order} is too large", location)
    nr = 1 << order
    block_bytes = ps << order
    max_blocks = total >> order
    cap = kho_vmalloc_size(ps)
    chunks: list[int] = []
    blocks: list[int] = []
    seen_chunks: set[int] = set()
    seen_blocks: set[int] = set()
    chunk, pages = first, 0
    while chunk:
        where = f"{field}.chunk"
        if chunk in seen_chunks:
            raise KHOFormatError(where, "the chunk list loops", chunk)
        if len(chunks) > max_blocks:
            raise KHOFormatError(where, f"more than {max_blocks + 1} chunks for {max_blocks} blocks", chunk)
        check_pointer(memory, chunk, ps, where, ps if strict else 8)
        seen_chunks.add(chunk)
        chunks.append(chunk)
        words = np.frombuffer(memory.read(chunk, ps), dtype="<u8")
        entries = words[1:1 + cap]
        zeros = np.flatnonzero(entries == 0)
        used = int(zeros[0]) if zeros.size else cap
        following = int(words[0])
        if strict:
            if entries[used:].any():
                raise KHOFormatError(f"{where}.phys", "an entry follows a zero entry", chunk)
            if used < cap and following:
                raise KHOFormatError(f"{where}.next", "a chunk that is not full has a successor", chunk)
            if used == cap and not following:
                raise KHOFormatError(f"{where}.next", "the last chunk is full (the writer adds an empty one)", chunk)
        for i, phys in enumerate(entries[:used].tolist()):
            at = chunk + 8 * (i + 1)
            if pages + nr > total:
                raise KHOFormatError(f"{where}.phys", f"more than total_pages = {total} pages", at)
            if strict and (phys % block_bytes or phys in seen_blocks):
                raise KHOFormatError(f"{where}.phys", f"block {phys:#x} is misaligned or repeated", at)
            if not in_ram(memory, phys, block_bytes):
                raise KHOFormatError(f"{where}.phys", f"block {phys:#x} of {block_bytes:#x} bytes is not in RAM", at)
            seen_blocks.add(phys)
            blocks.append(phys)
            pages += nr
        chunk = following
    if pages != total:
        raise KHOFormatError(f"{field}.total_pages", f"{total} pages claimed, the chunks hold {pages}", location)
    return VmallocArea(first, total, flags, order, tuple(chunks), tuple(blocks))


def release_vmalloc(allocator, tracker, area: VmallocArea) -> None:
    """``kho_unpreserve_vmalloc`` + ``vfree`` of an area :func:`vmalloc` made: every block
    and chunk unpreserved and freed.  O(blocks + chunks)."""
    for phys in area.blocks:
        tracker.unpreserve_pages(phys, 1 << area.order)
        allocator.free_pages(phys, area.order)
    for chunk in area.chunks:
        tracker.unpreserve_pages(chunk, 1)
        allocator.free_pages(chunk, 0)


def restore_vmalloc(kernel, area: VmallocArea) -> None:
    """The restores of ``kho_restore_vmalloc`` through the next ``kernel`` (anything with
    ``restore_pages(phys, nr_pages)``): every block (``1 << order`` pages), then every chunk
    page.  The kernel's errors propagate (the area is then partly restored, as in the
    kernel).  O(blocks + chunks)."""
    for phys in area.blocks:
        kernel.restore_pages(phys, 1 << area.order)
    for chunk in area.chunks:
        kernel.restore_pages(chunk, 1)
