"""Shared by the kernel-ABI tests: constants, an allocator that hands out a fixed script of
pages (so golden tests know where metadata lands), a little-endian u64, and the hypothesis
strategy of machines and candidate units for round trips."""

import struct

from hypothesis import strategies as st

from kho.errors import KHOError
from kho.memory.physical import Bank, PhysicalMemory

MiB = 1 << 20
PS = 4096
MAP = "preserved-memory-map"


class ScriptedAllocator:
    """Hands out a fixed list of pages in order (the allocator protocol KHO encoders use)."""

    def __init__(self, pages):
        self.pages = list(pages)
        self.freed = []

    def alloc_pages(self, order=0):
        assert order == 0
        if not self.pages:
            raise KHOError("ENOMEM", "script exhausted")
        return self.pages.pop(0)

    def free_pages(self, phys, order=0):
        self.freed.append(phys)


def memory_with(pages, overrides=None):
    """A 16 MiB machine holding ``pages`` (phys -> bytes), some replaced by ``overrides``."""
    memory = PhysicalMemory.single_bank(16 * MiB)
    for phys, page in {**pages, **(overrides or {})}.items():
        memory.write(phys, page)
    return memory


def u64(value):
    """``value`` as 8 little-endian bytes (the KHO FDT's native-endian u64 on arm64/x86)."""
    return struct.pack("<Q", value)


@st.composite
def machines_and_units(draw):
    """1-3 banks with holes (sizes/gaps in 4 MiB), units of every order, page 0 and the top of RAM likely."""
    nbanks = draw(st.integers(1, 3))
    banks, pos = [], draw(st.sampled_from([0, 0, 4 * MiB]))
    for i in range(nbanks):
        size = draw(st.integers(2, 6)) * 4 * MiB
        banks.append(Bank(pos, size, i % 2))
        pos += size + draw(st.integers(0, 3)) * 4 * MiB
    memory = PhysicalMemory(banks)
    top = banks[-1].end
    candidates = draw(st.lists(st.tuples(
        st.one_of(st.just(0), st.just(top - PS), st.just(banks[0].end - PS), st.integers(0, top - 1)),
        st.integers(0, 10)), min_size=1, max_size=40))
    # units of mixed orders back to back (each aligned up to its order) from a random page of bank 0
    pos = draw(st.integers(0, banks[0].size // PS - 1)) * PS + banks[0].start
    for order in draw(st.lists(st.integers(0, 10), max_size=12)):
        size = PS << order
        pos = -(-pos // size) * size
        candidates.append((pos, order))
        pos += size
    return memory, candidates
