"""kho's own chunk list, the container of the ranges-packed and instructions encodings.

A singly linked list of page-sized chunks, each a 16-byte :data:`CHUNK_HEADER` (``u64 next``
phys of the next chunk or 0, ``u32 count`` entries used in this chunk, ``u32 magic`` naming
the encoding) followed by fixed-size entries.  The reader detects cycles and bounds every
count by the page.  All little-endian.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kho.abi.kexec_handover import KHO_FDT_MEMORY_MAP_PROP_NAME
from kho.encodings.common import alloc_pages_bulk, check_pointers
from kho.errors import KHOFormatError
from kho.memory.physical import PhysicalMemory

#: ``struct { u64 next; u32 count; u32 magic; }`` at the start of every chunk page.
CHUNK_HEADER = np.dtype([("next", "<u8"), ("count", "<u4"), ("magic", "<u4")])


def magic_of(tag: bytes) -> int:
    """The u32 magic whose little-endian bytes spell ``tag`` (4 ASCII bytes)."""
    return int.from_bytes(tag, "little")


def chunk_capacity(page_size: int, entry_size: int) -> int:
    """Entries of ``entry_size`` bytes one chunk page holds after its header."""
    return (page_size - CHUNK_HEADER.itemsize) // entry_size


# -- chunk lists --------------------------------------------------------------------------
def write_chunk_list(memory: PhysicalMemory, allocator, payload: np.ndarray, entry_size: int, magic: int) -> np.ndarray:
    """Write ``payload`` (uint8, a whole number of entries) as a chunk list.

    Allocates ``max(1, ceil(entries / capacity))`` pages with :func:`alloc_pages_bulk`
    (nothing is written on ENOMEM) and returns their phys in list order (the first is the
    head).  O(payload bytes).
    """
    ps = memory.page_size
    cap = chunk_capacity(ps, entry_size)
    entries = payload.size // entry_size
    nchunks = max(1, -(-entries // cap))
    pages = alloc_pages_bulk(allocator, nchunks, memory.page_size)
    buf = np.zeros((nchunks, ps), dtype=np.uint8)
    header = np.zeros(nchunks, dtype=CHUNK_HEADER)
    header["next"][:-1] = pages[1:]
    header["count"] = np.minimum(cap, entries - np.arange(nchunks) * cap)
    header["magic"] = magic
    buf[:, :CHUNK_HEADER.itemsize] = header.view(np.uint8).reshape(nchunks, CHUNK_HEADER.itemsize)
    body = np.zeros(nchunks * cap * entry_size, dtype=np.uint8)
    body[:payload.size] = payload
    buf[:, CHUNK_HEADER.itemsize:CHUNK_HEADER.itemsize + cap * entry_size] = body.reshape(nchunks, cap * entry_size)
    for i, phys in enumerate(pages.tolist()):
        memory.write(phys, buf[i])
    return pages


@dataclass
class ChunkList:
    """A chunk list read back: its pages in list order, entries per chunk, and the
    concatenated entries (uint8)."""

    pages: np.ndarray
    counts: np.ndarray
    payload: np.ndarray
    entry_size: int

    def location(self, entry: int) -> int:
        """Phys of entry number ``entry`` (0-based over the whole list)."""
        ends = np.cumsum(self.counts)
        chunk = int(np.searchsorted(ends, entry, side="right"))
        first = int(ends[chunk] - self.counts[chunk])
        return int(self.pages[chunk]) + CHUNK_HEADER.itemsize + (entry - first) * self.entry_size


def read_chunk_list(memory: PhysicalMemory, head: int, entry_size: int, magic: int, field: str, *,
                    strict: bool = True) -> ChunkList:
    """Follow a chunk list from ``head``: every pointer page-aligned and in RAM (and outside
    scratch when ``strict``), the magic right, ``count`` at most the page's capacity, no
    chunk visited twice (so the walk ends after at most one visit per stored page: a page
    never written reads as zeros, whose magic is wrong).  KHOFormatError names ``field``.
    O(chunks) reads."""
    ps = memory.page_size
    cap = chunk_capacity(ps, entry_size)
    seen: set[int] = set()
    pages, counts, parts = [], [], []
    phys, where = head, None
    while phys:
        check_pointers(memory, np.array([phys], np.uint64), ps, ps, f"{field}.next" if pages else f"fdt.{KHO_FDT_MEMORY_MAP_PROP_NAME}",
                       strict=strict, where=np.array([where or 0], np.uint64))
        if phys in seen:
            raise KHOFormatError(f"{field}.next", f"chunk {phys:#x} is reached twice (the list loops)", where)
        seen.add(phys)
        page = memory.read(phys, ps)
        header = np.frombuffer(page, dtype=CHUNK_HEADER, count=1)[0]
        if int(header["magic"]) != magic:
            raise KHOFormatError(f"{field}.magic", f"{int(header['magic']):#010x}, expected {magic:#010x}", phys)
        count = int(header["count"])
        if count > cap:
            raise KHOFormatError(f"{field}.count", f"{count} entries, a chunk holds at most {cap}", phys)
        pages.append(phys)
        counts.append(count)
        parts.append(np.frombuffer(page, dtype=np.uint8, count=count * entry_size, offset=CHUNK_HEADER.itemsize))
        where, phys = phys, int(header["next"])
    return ChunkList(np.array(pages, dtype=np.uint64), np.array(counts, dtype=np.int64),
                     np.concatenate(parts) if parts else np.empty(0, np.uint8), entry_size)

