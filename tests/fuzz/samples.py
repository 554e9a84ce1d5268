"""Small handovers written by kho, and what each fuzz target's input bytes mean.

The machine (:func:`machine`): two RAM banks with a hole between them and two scratch
areas; preserved units of every order in both banks (a dense patch of pages, a run, lone
folios up to MAX_PAGE_ORDER), so every encoding uses all of its record kinds.

Memory-based maps (kho-v1, kho-v2, ranges-packed, maple, instructions) are fuzzed as a
*map input*: ``u64 root pointer (LE) || pages``.  The pages are written, in order, into
an *arena* of :data:`ARENA_PAGES` pages at :data:`ARENA` (outside every unit and scratch
area), and the root pointer becomes the ``preserved-memory-map`` property.  Seeds are real
maps encoded by kho with a bump allocator confined to the arena, so their pointers point
into it; a fuzzer (or a mutation test) can then rewrite any byte, pointer or page.
Other targets take the raw format: the ``mem`` property (ranges), a KHO FDT, a boot DTB,
a scratch-area array (written at the arena) or a handover image file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kho.abi.kexec_handover import KHO_FDT_MEMORY_MAP_PROP_NAME
from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.devicetree.layout import U64_PROP
from kho.encodings import get_encoding
from kho.errors import KHOError
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea

PS = 4096
MiB = 1 << 20
BANKS = (Bank(0, 16 * MiB, 0), Bank(32 * MiB, 16 * MiB, 1))
SCRATCH = (ScratchArea(4 * MiB, MiB, "lowmem"), ScratchArea(38 * MiB, MiB, "global"))
#: Where map inputs' pages go: 256 pages (1 MiB) in the first bank, touching no unit.
ARENA = 13 * MiB
ARENA_PAGES = 256
#: Longest map input: the root pointer and a full arena.
MAX_MAP_INPUT = U64_PROP.size + ARENA_PAGES * PS

#: The sample's units ``(phys, order)``: lone folios of many orders in both banks.
FOLIOS = ((12 * MiB, 0), (12 * MiB + 8 * PS, 3), (34 * MiB, 3), (36 * MiB, 9), (44 * MiB, 10), (2 * MiB, 5), (15 * MiB, 8))
#: A dense patch (every other page of 200) and a run of 37 pages (split greedily).
PATCH = (8 * MiB, 200)
RUN = (40 * MiB, 37)


def machine() -> PhysicalMemory:
    """A fresh machine: the banks and scratch areas above, no contents."""
    memory = PhysicalMemory(BANKS, PS)
    memory.set_scratch(SCRATCH)
    return memory


class ArenaAllocator:
    """Hands out naturally aligned blocks from the arena, in address order (never frees)."""

    def __init__(self, memory: PhysicalMemory):
        self.memory = memory
        self.next = ARENA

    def alloc_pages(self, order: int = 0) -> int:
        size = PS << order
        phys = -(-self.next // size) * size
        if phys + size > ARENA + ARENA_PAGES * PS:
            raise KHOError("ENOMEM", "the fuzz arena is full")
        self.next = phys + size
        return phys

    def free_pages(self, phys: int, order: int = 0) -> None:
        """Freed pages are not reused (the arena is small and short-lived)."""


def tracker(memory: PhysicalMemory, kind: str = "mixed", preserve_bits: int | str = "page") -> Tracker:
    """A finalized tracker on ``memory``: ``mixed`` (everything above), ``folio`` (one
    order-3 folio), ``patch`` (the dense patch only) or ``empty``."""
    t = Tracker(memory, preserve_bits)
    if kind in ("mixed", "patch"):
        start, count = PATCH
        t.preserve_many(np.arange(count, dtype=np.uint64) * np.uint64(2 * PS) + np.uint64(start), 0)
    if kind == "mixed":
        t.preserve_pages(*RUN)
        for phys, order in FOLIOS:
            t.preserve_folio(phys, order)
    if kind == "folio":
        t.preserve_folio(34 * MiB, 3)
    t.finalize()
    return t


@dataclass
class MapSample:
    """An encoded map: the memory holding it, its root properties and its fuzz input."""

    memory: PhysicalMemory
    props: dict[str, bytes]
    units: list[tuple[int, int]]
    data: bytes


def encode_map(name: str, kind: str = "mixed", **options) -> MapSample:
    """Encode the ``kind`` sample with encoding ``name`` into the arena; its map input
    (or, for ``ranges``, the ``mem`` property)."""
    memory = machine()
    preserve_bits = 4096 if options.get("bitmap_bytes") == 512 else "page"
    t = tracker(memory, kind, preserve_bits)
    encoded = get_encoding(name, PS, **options).encode(t, ArenaAllocator(memory))
    if KHO_FDT_MEMORY_MAP_PROP_NAME not in encoded.props:
        return MapSample(memory, dict(encoded.props), t.units(), encoded.props["mem"])
    used = int(encoded.metadata_pages.max()) + PS - ARENA if encoded.metadata_pages.size else 0
    data = encoded.props[KHO_FDT_MEMORY_MAP_PROP_NAME] + memory.read(ARENA, used)
    return MapSample(memory, dict(encoded.props), t.units(), data)


def load_map(data: bytes) -> tuple[PhysicalMemory, dict[str, bytes]]:
    """A fresh machine with ``data``'s pages in the arena (a partial last page is zero-padded,
    anything beyond the arena ignored) and its root property (whatever its length)."""
    memory = machine()
    pages = data[U64_PROP.size:MAX_MAP_INPUT]
    if pages:
        memory.write(ARENA, pages + bytes(-len(pages) % PS))
    return memory, {KHO_FDT_MEMORY_MAP_PROP_NAME: data[:U64_PROP.size]}


def handover_allocator(memory: PhysicalMemory, t: Tracker) -> PageAllocator:
    """A page allocator for the handover's own pages, avoiding the units."""
    alloc = PageAllocator(memory)
    for phys, order in t.units():
        alloc.reserve(phys, PS << order)
    return alloc
