"""KHO serialization blocks (``include/linux/kho/abi/block.h``, ``kernel/liveupdate/kho_block.c``).

A block set is a chain of page-sized blocks, each ``struct kho_block_header_ser {u64 next;
u64 count;}`` followed by ``count`` entries of one fixed size.  The running kernel grows
the set one zeroed, preserved page at a time as entries are added (``kho_block_set_grow``)
and fills the entries when it serializes (``kho_block_set_it_reserve_entry``), so every
block but the last is full.

The reader follows ``kho_block_set_restore``: both modes refuse a cycle, more than
:data:`~kho.abi.block.KHO_MAX_BLOCKS` blocks and a ``count`` of 0 or above the block's
capacity, as the kernel does, and a block outside RAM.  Strict also wants page-aligned
blocks and every block but the last full.  Cost: O(blocks + entries).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kho.abi.block import (
    KHO_BLOCK_HEADER_DTYPE,
    KHO_MAX_BLOCKS,
    kho_block_count_per_block,
    kho_block_size,
)
from kho.errors import KHOError, KHOFormatError
from kho.subsystems.common import Range, alloc_preserve, check_pointer


@dataclass(frozen=True)
class BlockSet:
    """A restored block set: each block's ``(phys, count)`` in chain order and the raw
    entries (``entry_size`` bytes each) in order."""

    entry_size: int
    blocks: tuple[tuple[int, int], ...]
    entries: tuple[bytes, ...]

    @property
    def head(self) -> int:
        """Phys of the first block (0 when empty)."""
        return self.blocks[0][0] if self.blocks else 0

    def entry_address(self, index: int, page_size: int) -> int:
        """Phys of entry ``index``.  O(blocks)."""
        per = kho_block_count_per_block(page_size, self.entry_size)
        phys, _ = self.blocks[index // per]
        return phys + KHO_BLOCK_HEADER_DTYPE.itemsize + (index % per) * self.entry_size

    def block_ranges(self, page_size: int, what: str) -> list[Range]:
        """Each block's pages, described as ``what``."""
        return [Range(phys, kho_block_size(page_size), what) for phys, _ in self.blocks]

    def to_json(self) -> dict:
        return {"entry_size": self.entry_size, "blocks": [{"phys": p, "count": c} for p, c in self.blocks]}


class OutgoingBlockSet:
    """The running kernel's ``struct kho_block_set`` for entries of ``entry_size`` bytes.

    :meth:`grow` / :meth:`shrink` keep exactly enough preserved blocks for a number of
    entries (KHOError E2BIG beyond :data:`KHO_MAX_BLOCKS`, where ``kho_block_add`` returns ENOSPC);
    :meth:`serialize` writes entries into them and links them.
    """

    def __init__(self, memory, allocator, tracker, entry_size: int):
        self.memory, self.allocator, self.tracker = memory, allocator, tracker
        self.entry_size = entry_size
        self.per_block = kho_block_count_per_block(memory.page_size, entry_size)
        if self.per_block < 1:
            raise KHOError("EINVAL", f"a {entry_size}-byte entry does not fit a block")
        self.blocks: list[int] = []

    @property
    def head(self) -> int:
        """``kho_block_set_head_pa``: phys of the first block, 0 when there is none."""
        return self.blocks[0] if self.blocks else 0

    def _link(self) -> None:
        for i, phys in enumerate(self.blocks):
            self.memory.write_u64(phys, self.blocks[i + 1] if i + 1 < len(self.blocks) else 0)

    def grow(self, count: int) -> None:
        """``kho_block_set_grow``: add blocks until ``count`` entries fit; all or nothing."""
        before = len(self.blocks)
        try:
            while count > len(self.blocks) * self.per_block:
                if len(self.blocks) >= KHO_MAX_BLOCKS:
                    raise KHOError("E2BIG", f"a block set holds at most {KHO_MAX_BLOCKS} blocks (the kernel's ENOSPC)")
                self.blocks.append(alloc_preserve(self.memory, self.allocator, self.tracker, kho_block_size(self.memory.page_size)))
        except KHOError:
            while len(self.blocks) > before:
                self._free_last()
            raise
        finally:
            self._link()

    def _free_last(self) -> None:
        phys = self.blocks.pop()
        self.tracker.unpreserve_folio(phys, 0)
        self.allocator.free_pages(phys, 0)

    def shrink(self, count: int) -> None:
        """``kho_block_set_shrink``: drop last blocks no longer needed for ``count`` entries."""
        while self.blocks and count <= (len(self.blocks) - 1) * self.per_block:
            self._free_last()
        self._link()

    def serialize(self, entries: Sequence[bytes]) -> int:
        """Write ``entries`` (each exactly ``entry_size`` bytes) into the blocks grown for
        them, set each block's ``count``; the head phys (0 when empty).  EINVAL when the set
        was not grown for them (the kernel's WARN + ENOSPC)."""
        if len(entries) > len(self.blocks) * self.per_block:
            raise KHOError("EINVAL", f"{len(entries)} entries but blocks for {len(self.blocks) * self.per_block}")
        header = KHO_BLOCK_HEADER_DTYPE.itemsize
        for b, phys in enumerate(self.blocks):
            part = entries[b * self.per_block:(b + 1) * self.per_block]
            if any(len(e) != self.entry_size for e in part):
                raise KHOError("EINVAL", f"entries must be {self.entry_size} bytes")
            page = bytearray(self.memory.page_size)
            page[8:header] = len(part).to_bytes(8, "little")
            page[header:header + len(part) * self.entry_size] = b"".join(part)
            self.memory.write(phys, bytes(page))
        self._link()
        return self.head


def read_block_set(memory, head: int, entry_size: int, *, strict: bool = True, field: str = "block") -> BlockSet:
    """Restore the block set at ``head`` (0: empty) with entries of ``entry_size`` bytes.
    See the module docstring for the checks.  O(blocks + entries)."""
    ps = memory.page_size
    per = kho_block_count_per_block(ps, entry_size)
    header = KHO_BLOCK_HEADER_DTYPE.itemsize
    blocks: list[tuple[int, int]] = []
    entries: list[bytes] = []
    seen: set[int] = set()
    phys = head
    while phys:
        if phys in seen:
            raise KHOFormatError(f"{field}.next", "the block list loops", phys)
        if len(blocks) >= KHO_MAX_BLOCKS:
            raise KHOFormatError(f"{field}.next", f"more than {KHO_MAX_BLOCKS} blocks", phys)
        check_pointer(memory, phys, kho_block_size(ps), field, ps if strict else 8)
        seen.add(phys)
        hdr = np.frombuffer(memory.read(phys, header), dtype=KHO_BLOCK_HEADER_DTYPE)[0]
        count, following = int(hdr["count"]), int(hdr["next"])
        if count == 0 or count > per:
            raise KHOFormatError(f"{field}.count", f"{count} entries (a block holds 1 to {per})", phys + 8)
        if strict and blocks and blocks[-1][1] != per:
            raise KHOFormatError(f"{field}.count", "a block before the last is not full", blocks[-1][0] + 8)
        raw = memory.read(phys + header, count * entry_size)
        entries.extend(raw[i * entry_size:(i + 1) * entry_size] for i in range(count))
        blocks.append((phys, count))
        phys = following
    return BlockSet(entry_size, tuple(blocks), tuple(entries))
