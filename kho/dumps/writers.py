"""Writing a :class:`~kho.memory.physical.PhysicalMemory` as a memory dump: a sparse raw file,
a zstd-compressed raw file, or an ELF core laid out as QEMU's ``dump-guest-memory`` writes
it (ELF64 little-endian ``ET_CORE``, one ``PT_LOAD`` a segment with ``p_paddr`` its physical
address, data page-aligned in the file).

Only the pages the memory holds (stored or generated) are written: a raw or ELF file keeps
holes sparse (seek, never zeros written), a zstd stream compresses zeros in
:data:`ZERO_CHUNK`-byte pieces.  Host memory is one page run at a time.  Used to cut
fixtures from real dumps (only the pages a handover references) and by the tests.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from itertools import chain
from typing import BinaryIO, Iterator

import zstandard

from kho.abi.elf import (
    EI_NIDENT,
    ELF64_EHDR,
    ELF64_PHDR,
    ELFCLASS64,
    ELFDATA2LSB,
    ELFMAG,
    EM_X86_64,
    ET_CORE,
    EV_CURRENT,
    PF_R,
    PT_LOAD,
    PT_NOTE,
)
from kho.files import atomic_write
from kho.memory.physical import PhysicalMemory

#: Zeros handed to the zstd compressor at once.
ZERO_CHUNK = 8 << 20

PathOrFile = str | os.PathLike | BinaryIO


@contextmanager
def _output(out: PathOrFile) -> Iterator[BinaryIO]:
    """An open file as it is, or a path written atomically (:func:`~kho.files.atomic_write`)."""
    if hasattr(out, "write"):
        yield out
    else:
        with atomic_write(out) as f:
            yield f


def page_runs(memory: PhysicalMemory, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """``(phys, bytes)`` of the runs of pages the memory holds within ``[start, end)``, by
    address (stored pages one by one, generated runs whole)."""
    ps = memory.page_size
    end = memory.banks[-1].end if end is None else end
    runs = [(pfn * ps, ps) for pfn, _ in memory.stored_pages(start // ps, -(-end // ps))]
    runs += [(first * ps, (last - first) * ps) for first, last, _ in memory.generated_runs()]
    for phys, size in sorted(runs):
        lo, hi = max(phys, start), min(phys + size, end)
        if lo < hi:
            yield lo, memory.read(lo, hi - lo)


def write_raw(memory: PhysicalMemory, out: PathOrFile, *, base: int = 0, end: int | None = None) -> int:
    """A sparse raw dump of ``[base, end)`` (default: to the end of the last bank): file offset =
    ``phys - base``.  ``out`` must be seekable.  Returns the file size in bytes."""
    end = memory.banks[-1].end if end is None else end
    with _output(out) as f:
        origin = f.tell()
        for phys, data in page_runs(memory, base, end):
            f.seek(origin + phys - base)
            f.write(data)
        f.truncate(origin + end - base)
        f.seek(origin + end - base)
    return end - base


def write_zstd(memory: PhysicalMemory, out: PathOrFile, *, base: int = 0, end: int | None = None,
               level: int = 19) -> int:
    """A zstd-compressed raw dump of ``[base, end)`` (one frame, content size recorded).
    Returns the compressed size in bytes."""
    end = memory.banks[-1].end if end is None else end
    zeros = bytes(ZERO_CHUNK)
    with _output(out) as f:
        origin = f.tell()
        with zstandard.ZstdCompressor(level=level).stream_writer(f, size=end - base, closefd=False) as writer:
            pos = base
            for phys, data in chain(page_runs(memory, base, end), [(end, b"")]):
                while pos < phys:
                    n = min(ZERO_CHUNK, phys - pos)
                    writer.write(zeros[:n])
                    pos += n
                writer.write(data)
                pos += len(data)
        return f.tell() - origin


def write_elf_core(memory: PhysicalMemory, out: PathOrFile, *, segments: list[tuple[int, int]] | None = None,
                   e_type: int = ET_CORE, e_machine: int = EM_X86_64, note: bytes = b"") -> int:
    """An ELF64 core: a ``PT_NOTE`` holding ``note`` (when given) then one ``PT_LOAD`` per
    ``(phys, size)`` segment (default: the RAM banks).  ``out`` must be seekable.  Returns
    the file size in bytes."""
    ps = memory.page_size
    segments = [(b.start, b.size) for b in memory.banks] if segments is None else segments
    phnum = len(segments) + (1 if note else 0)
    headers_end = ELF64_EHDR.size + phnum * ELF64_PHDR.size
    offset = -(-(headers_end + len(note)) // ps) * ps
    ident = ELFMAG + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT])
    headers = [ELF64_EHDR.pack(ident.ljust(EI_NIDENT, b"\0"), e_type, e_machine, EV_CURRENT, 0, ELF64_EHDR.size, 0,
                               0, ELF64_EHDR.size, ELF64_PHDR.size, phnum, 0, 0, 0)]
    if note:
        headers.append(ELF64_PHDR.pack(PT_NOTE, 0, headers_end, 0, 0, len(note), 0, 0))
    placed = []
    for phys, size in segments:
        headers.append(ELF64_PHDR.pack(PT_LOAD, PF_R, offset, 0, phys, size, size, ps))
        placed.append((phys, size, offset))
        offset += -(-size // ps) * ps
    with _output(out) as f:
        origin = f.tell()
        f.write(b"".join(headers) + note)
        for start, size, file_offset in placed:
            for phys, data in page_runs(memory, start, start + size):
                f.seek(origin + file_offset + phys - start)
                f.write(data)
        f.truncate(origin + offset)
        f.seek(origin + offset)
    return offset
