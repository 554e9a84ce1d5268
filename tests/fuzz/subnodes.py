"""Fuzz targets and seeds for the sub-nodes a Linux 7.3 kernel writes (:mod:`kho.subsystems`).

A *sub-node input* is ``u64 blob phys || u32 blob size || pages`` (little-endian): the pages
are written into the arena of :mod:`tests.fuzz.samples` (a partial last page zero-padded,
anything beyond the arena ignored) and the reader is given the blob's phys and size.  For
``memfd`` the blob is the ``struct memfd_luo_ser`` and bit 0 of the size selects memfd-v1.
Seeds are real sub-nodes written by kho with an allocator confined to the arena, so every
pointer they hold points into it.

Each target reads in strict and kernel-compatible mode; a success must have a JSON-ready
``to_json()`` and non-empty referenced ranges, inside RAM when read strictly.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

from kho.abi.memfd import MEMFD_LUO_FH_COMPATIBLE, MEMFD_LUO_FH_COMPATIBLE_V1
from kho.currentkernel.tracker import Tracker
from kho.errors import KHOFormatError
from kho.memory.physical import PhysicalMemory
from kho.subsystems.kexec_metadata import read_kexec_metadata, write_kexec_metadata
from kho.subsystems.kho_test import read_kho_test, write_kho_test
from kho.subsystems.luo import OutgoingLuo, read_luo
from kho.subsystems.memblock import read_memblock, write_memblock
from kho.subsystems.memfd import preserve_memfd, read_memfd

from .samples import ARENA, ARENA_PAGES, PS, ArenaAllocator, machine

#: The input header: blob phys and size.
HEADER = struct.Struct("<QI")
#: Longest sub-node input: the header and a full arena.
MAX_SUBNODE_INPUT = HEADER.size + ARENA_PAGES * PS
#: Both decoding modes, strict first.
MODES = (True, False)


def load(data: bytes) -> tuple[PhysicalMemory, int, int]:
    """A fresh machine with ``data``'s pages in the arena; the blob's phys and size."""
    memory = machine()
    head = data[:HEADER.size].ljust(HEADER.size, b"\0")
    pages = data[HEADER.size:MAX_SUBNODE_INPUT]
    if pages:
        memory.write(ARENA, pages + bytes(-len(pages) % PS))
    phys, size = HEADER.unpack(head)
    return memory, phys, size


def _check(memory: PhysicalMemory, result, strict: bool, ranges) -> None:
    json.dumps(result.to_json())
    for r in ranges:
        assert r.size > 0, r
        assert not strict or memory.in_ram(r.phys, r.size), r


def _target(read: Callable, ranges: Callable) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        memory, phys, size = load(data)
        for strict in MODES:
            try:
                result = read(memory, phys, size, strict)
            except KHOFormatError:
                continue
            _check(memory, result, strict, ranges(result))
    return run


def _memfd_compatible(size: int) -> str:
    return MEMFD_LUO_FH_COMPATIBLE_V1 if size & 1 else MEMFD_LUO_FH_COMPATIBLE


kexec_metadata_target = _target(lambda m, p, s, strict: read_kexec_metadata(m, p, s, strict=strict),
                                lambda r: r.referenced_ranges(PS))
memblock_target = _target(lambda m, p, s, strict: read_memblock(m, p, s, strict=strict), lambda r: r.referenced_ranges(PS))
kho_test_target = _target(lambda m, p, s, strict: read_kho_test(m, p, s, strict=strict), lambda r: r.referenced_ranges(PS))
luo_target = _target(lambda m, p, s, strict: read_luo(m, p, s, strict=strict), lambda r: r.referenced_ranges(PS))
memfd_target = _target(lambda m, p, s, strict: read_memfd(m, p, _memfd_compatible(s), strict=strict),
                       lambda r: r.referenced_ranges(PS))


# -- seeds ---------------------------------------------------------------------------------------
def _input(memory: PhysicalMemory, allocator: ArenaAllocator, phys: int, size: int) -> bytes:
    return HEADER.pack(phys, size) + memory.read(ARENA, allocator.next - ARENA)


def _writer() -> tuple[PhysicalMemory, ArenaAllocator, Tracker]:
    memory = machine()
    return memory, ArenaAllocator(memory), Tracker(memory)


def _kexec_metadata_seeds() -> list[bytes]:
    memory, allocator, tracker = _writer()
    blob = write_kexec_metadata(memory, allocator, tracker, "7.3.0-rc7", 1)
    return [_input(memory, allocator, blob.phys, blob.size)]


def _memblock_seeds() -> list[bytes]:
    out = []
    for regions in ([("realk_small", 12 << 20, 8 * PS)], [("a", 12 << 20, PS), ("b", 14 << 20, 3 * PS)]):
        memory, allocator, tracker = _writer()
        blob = write_memblock(memory, allocator, tracker, regions)
        out.append(_input(memory, allocator, blob.phys, blob.size))
    return out


def _kho_test_seeds() -> list[bytes]:
    memory, allocator, tracker = _writer()
    written = write_kho_test(memory, allocator, tracker, 24 * PS, seed=3)
    return [_input(memory, allocator, written.phys, written.size)]


def _luo_seeds() -> list[bytes]:
    out = []
    for sessions in ((), (("vm", 2),), (("a", 1), ("b", 0))):
        memory, allocator, tracker = _writer()
        luo = OutgoingLuo(memory, allocator, tracker, 1)
        for name, files in sessions:
            luo.create_session(name)
            for token in range(files):
                luo.preserve_memfd(name, token, b"memfd" * 900 * (token + 1), seals=1)
        luo.set_flb("flb-v1", 9, 1)
        luo.serialize()
        out.append(_input(memory, allocator, luo.phys, luo.blob.size))
    return out


def _memfd_seeds() -> list[bytes]:
    out = []
    for compatible, size_bit in ((MEMFD_LUO_FH_COMPATIBLE, 0), (MEMFD_LUO_FH_COMPATIBLE_V1, 1)):
        memory, allocator, tracker = _writer()
        phys = preserve_memfd(memory, allocator, tracker, b"x" * 9000, compatible=compatible)
        out.append(_input(memory, allocator, phys, size_bit))
    return out


#: Seed generators by target name.
SUBNODE_SEEDS: dict[str, Callable[[], list[bytes]]] = {
    "kexec-metadata": _kexec_metadata_seeds, "memblock": _memblock_seeds, "kho-test": _kho_test_seeds,
    "luo": _luo_seeds, "memfd": _memfd_seeds,
}
