"""The sizes of the design discussion (DESIGN.md section 5), computed by running kho.

Each figure comes from preserving a set in a :class:`~kho.currentkernel.tracker.Tracker` and running
the encoder or reading the tracker's own accounting, never from arithmetic typed in:

* ``bitmaps_16g``: every order-0 page of 16 GiB preserved; the tracker's bitmaps (page-
  sized, and Linux 6.16's 512-byte ones) total 512 KiB, one bit a 4 KiB page;
* ``ranges_isolated``: 4,194,304 order-0 pages (16 GiB) no two of which touch, written
  by ``ranges``: 16-byte pairs, 64 MiB;
* ``ranges_random``: 16 GiB of random order-0 pages in 64 GiB (the ``random`` pattern
  on a booted machine), written by ``ranges``: neighbours merge, about 3.1 M ranges,
  about 48 MiB;
* ``packed_512k``: the most isolated pages ``ranges-packed`` fits in 512 KiB of chunk
  pages (8-byte entries behind a 16-byte header a page): about 65 k ranges, about
  256 MiB of random 4 KiB pages;
* ``maple_node``: the serialized maple node, 256 bytes (16 slots, 15 pivots), and the
  nodes the ``maple`` encoder writes for the same isolated pages.

The isolated-page sets use a machine without scratch areas or kernel regions (only the
preserved pages matter there).  Cost: about 2 s and 1 GiB of host memory in all.
"""

from __future__ import annotations

import numpy as np

from kho.abi.kho_v1 import PRESERVE_BITS_6_16
from kho.currentkernel.machine import Machine
from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.encodings import get_encoding
from kho.encodings.chunklist import CHUNK_HEADER, chunk_capacity
from kho.encodings.maple import MAPLE_NODE, MAPLE_PIVOTS, MAPLE_SLOTS
from kho.encodings.ranges import RANGE
from kho.encodings.ranges_packed import PACKED_ENTRY
from kho.memory.physical import PhysicalMemory
from kho.simulation.preserved_sets import generate

GIB, MIB, KIB = 1 << 30, 1 << 20, 1 << 10
PAGE_SIZE = 4096
#: The metadata budget the design discussion measured encodings against (bytes).
BUDGET = 512 * KIB


def _isolated(ram: int, pages: int) -> tuple[PhysicalMemory, PageAllocator, Tracker]:
    """A bare machine of ``ram`` bytes with ``pages`` order-0 pages preserved two pfns apart
    (no two touch), above the first 16 MiB (left free for the encoders' pages)."""
    memory = PhysicalMemory.single_bank(ram, PAGE_SIZE)
    allocator = PageAllocator(memory)
    phys = allocator.claim_pages(((np.arange(pages, dtype=np.uint64) * 2) + (16 * MIB // PAGE_SIZE)) * PAGE_SIZE)
    tracker = Tracker(memory)
    tracker.preserve_many(phys, 0)
    tracker.finalize()
    return memory, allocator, tracker


def bitmaps_16g() -> dict:
    """Bitmap bytes of a tracker holding every page of 16 GiB, for both bitmap sizes."""
    memory = PhysicalMemory.single_bank(16 * GIB, PAGE_SIZE)
    pfn = np.arange(memory.nr_pages, dtype=np.uint64)
    out = {"ram_bytes": memory.ram_size, "preserved_pages": memory.nr_pages}
    for label, bits in (("page", "page"), ("linux_6_16", PRESERVE_BITS_6_16)):
        tracker = Tracker(memory, bits)
        tracker.preserve_many(pfn << np.uint64(memory.page_shift), 0)
        mem = tracker.kernel_memory()
        out[label] = {"bitmap_bytes_each": tracker.bitmap_bytes, "bitmaps": mem.nr_bitmaps, "bytes": mem.bitmaps}
    return out


def ranges_isolated() -> dict:
    """``ranges`` on 16 GiB of order-0 pages that never touch."""
    memory, allocator, tracker = _isolated(64 * GIB, 16 * GIB // PAGE_SIZE)
    encoded = get_encoding("ranges", PAGE_SIZE).encode(tracker, allocator)
    return {"preserved_pages": tracker.nr_pages, "ranges": encoded.nr_ranges, "range_bytes": RANGE.itemsize,
            "bytes": encoded.fdt_bytes}


def ranges_random(seed: int = 1) -> dict:
    """``ranges`` on 16 GiB of random order-0 pages in a 64 GiB machine."""
    machine = Machine.boot(64 * GIB, PAGE_SIZE, seed=seed)
    phys, order = generate("random", machine.allocator, 16 * GIB, seed=seed)
    tracker = Tracker(machine.memory)
    tracker.preserve_many(phys, order)
    tracker.finalize()
    encoded = get_encoding("ranges", PAGE_SIZE).encode(tracker, machine.allocator)
    return {"ram_bytes": 64 * GIB, "preserved_pages": tracker.nr_pages, "ranges": encoded.nr_ranges,
            "bytes": encoded.fdt_bytes, "seed": seed}


def packed_512k() -> dict:
    """``ranges-packed`` of as many isolated pages as 512 KiB of chunks hold, and one more."""
    budget_pages = BUDGET // PAGE_SIZE
    capacity = budget_pages * chunk_capacity(PAGE_SIZE, PACKED_ENTRY.itemsize)
    out = {"budget_bytes": BUDGET, "entry_bytes": PACKED_ENTRY.itemsize, "chunk_header_bytes": CHUNK_HEADER.itemsize,
           "entries_without_headers": BUDGET // PACKED_ENTRY.itemsize}
    for key, pages in (("full", capacity), ("one_more", capacity + 1)):
        memory, allocator, tracker = _isolated(2 * GIB, pages)
        encoded = get_encoding("ranges-packed", PAGE_SIZE).encode(tracker, allocator)
        out[key] = {"ranges": pages, "preserved_bytes": tracker.nr_pages * PAGE_SIZE, "bytes": encoded.metadata_bytes}
    return out


def maple_node() -> dict:
    """The maple node's size and the nodes ``maple`` writes for 65,536 isolated pages."""
    memory, allocator, tracker = _isolated(2 * GIB, 65536)
    encoded = get_encoding("maple", PAGE_SIZE).encode(tracker, allocator)
    return {"node_bytes": MAPLE_NODE.itemsize, "slots": MAPLE_SLOTS, "pivots": MAPLE_PIVOTS,
            "units": len(tracker), "nodes": encoded.nr_nodes, "height": encoded.height,
            "node_bytes_total": encoded.nr_nodes * MAPLE_NODE.itemsize, "bytes": encoded.metadata_bytes}


def design_sizes(seed: int = 1) -> dict:
    """Every figure above, by name."""
    return {"bitmaps_16g": bitmaps_16g(), "ranges_isolated": ranges_isolated(), "ranges_random": ranges_random(seed),
            "packed_512k": packed_512k(), "maple_node": maple_node()}
