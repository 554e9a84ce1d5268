"""A memory dump as the decoders see memory: a read-only :class:`PhysicalMemory`.

:class:`DumpMemory` is a :class:`~kho.memory.physical.PhysicalMemory` whose banks are the
dump's RAM and whose contents come from a :class:`~kho.dumps.sources.Source` on demand, so
every decoder (``kho.encodings``, ``kho.devicetree``) reads a dump unchanged while host
memory stays bounded by the pages actually read (nothing is stored).  Scratch areas can be
set (from the handoff found in the dump).  Writing is refused: a dump is evidence.
"""

from __future__ import annotations

from typing import Sequence

from kho.dumps.sources import Source
from kho.errors import KHOError
from kho.memory.physical import Bank, PhysicalMemory


class DumpMemory(PhysicalMemory):
    """RAM ``banks`` (bytes) read from ``source``; ``read`` is O(size) plus the source's cost."""

    def __init__(self, source: Source, banks: Sequence[Bank], page_size: int):
        super().__init__(banks, page_size)
        self.source = source

    def read(self, phys: int, size: int) -> bytes:
        """``size`` bytes from ``phys`` inside one bank (KHOError(EINVAL) otherwise)."""
        self.check_range(phys, size, "read")
        return self.source.read(phys, size) if size else b""

    def write(self, phys: int, data) -> None:
        raise KHOError("EINVAL", f"{self.source.description}: a dump is read-only (write at {phys:#x})")

    def fill_pattern(self, phys: int, size: int, seed: int) -> None:
        raise KHOError("EINVAL", f"{self.source.description}: a dump is read-only (fill at {phys:#x})")

    def discard(self, phys: int, size: int) -> None:
        raise KHOError("EINVAL", f"{self.source.description}: a dump is read-only (discard at {phys:#x})")
