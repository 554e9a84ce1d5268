"""Cutting a dump down to its handover: the pages the handover references, copied into a fresh
:class:`~kho.memory.physical.PhysicalMemory` with the dump's banks, ready for
:mod:`kho.dumps.writers` (a reduced fixture, a minimal reproducer for a bug report).

Units: phys in bytes; pages page-aligned.
"""

from __future__ import annotations

import numpy as np

from kho.dumps.find import DumpHandover
from kho.dumps.subnodes import referenced_ranges
from kho.memory.physical import PhysicalMemory
from kho.subsystems.common import RangeKind


def referenced_pages(handover: DumpHandover, page_size: int, *, contents: bool = False) -> np.ndarray:
    """Phys (uint64, ascending, distinct) of every page a referenced range touches, plus the
    pages of every x86 ``boot_params`` found; preserved contents (ranges of kind
    :attr:`~kho.subsystems.common.RangeKind.CONTENTS`) only with ``contents``.  O(pages)."""
    parts = [np.array([b.phys for b in handover.boot_params], np.uint64)]
    for r in referenced_ranges(handover, page_size):
        if r.size and (contents or r.kind != RangeKind.CONTENTS):
            first, end = r.phys // page_size, -(-(r.phys + r.size) // page_size)
            parts.append(np.arange(first, end, dtype=np.uint64) * np.uint64(page_size))
    return np.unique(np.concatenate(parts))


def cut(memory: PhysicalMemory, pages: np.ndarray) -> PhysicalMemory:
    """A memory with ``memory``'s banks holding only ``pages`` (phys) copied from it; pages
    outside RAM are skipped.  O(pages)."""
    out = PhysicalMemory(memory.banks, memory.page_size)
    ps = memory.page_size
    for phys in pages.tolist():
        if memory.in_ram(phys, ps):
            out.write(phys, memory.read(phys, ps))
    return out
