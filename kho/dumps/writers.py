"""Writing a :class:`~kho.memory.physical.PhysicalMemory` as a memory dump: a sparse raw file,
a zstd-compressed raw file, an ELF core laid out as QEMU's ``dump-guest-memory`` writes
it (ELF64 little-endian ``ET_CORE``, one ``PT_LOAD`` a segment with ``p_paddr`` its physical
address, data page-aligned in the file), or a kdump-compressed vmcore as makedumpfile
writes it (:mod:`kho.dumps.kdump`).

Only the pages the memory holds (stored or generated) are written: a raw or ELF file keeps
holes sparse (seek, never zeros written), a zstd stream compresses zeros in
:data:`ZERO_CHUNK`-byte pieces.  Host memory is one page run at a time.  Used to cut
fixtures from real dumps (only the pages a handover references) and by the tests.
"""

from __future__ import annotations

import os
import zlib
from contextlib import contextmanager
from itertools import chain
from typing import BinaryIO, Iterator

import cramjam
import lzallright
import numpy as np
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
from kho.dumps.kdump import (
    DISK_DUMP_HEADER,
    DUMP_DH_COMPRESSED_LZO,
    DUMP_DH_COMPRESSED_SNAPPY,
    DUMP_DH_COMPRESSED_ZLIB,
    DUMP_DH_COMPRESSED_ZSTD,
    KDUMP_SIGNATURE,
    KDUMP_SUB_HEADER,
    PAGE_DESC,
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


#: ``NT_PRSTATUS`` and the size of an x86_64 ``struct elf_prstatus``: the CORE note a vmcore
#: opens with (zeros here: no CPU state is modelled).
NT_PRSTATUS, PRSTATUS_BYTES = 1, 336
#: How :func:`write_kdump` compresses a page, and the ``page_desc.flags`` that says so.
KDUMP_COMPRESSORS = {
    "raw": (None, 0),
    "zlib": (zlib.compress, DUMP_DH_COMPRESSED_ZLIB),
    "lzo": (lambda page: lzallright.LZOCompressor().compress(page), DUMP_DH_COMPRESSED_LZO),
    "snappy": (lambda page: bytes(cramjam.snappy.compress_raw(page)), DUMP_DH_COMPRESSED_SNAPPY),
    "zstd": (lambda page: zstandard.ZstdCompressor().compress(page), DUMP_DH_COMPRESSED_ZSTD),
}


def elf_note(name: bytes, note_type: int, desc: bytes) -> bytes:
    """One ELF note (``Elf64_Nhdr``: namesz, descsz, type; then the NUL-terminated name and
    the descriptor, each padded to 4 bytes), as a ``PT_NOTE`` or a kdump header holds it."""
    name += b"\0"
    return (len(name).to_bytes(4, "little") + len(desc).to_bytes(4, "little") + note_type.to_bytes(4, "little")
            + name.ljust(-(-len(name) // 4) * 4, b"\0") + desc.ljust(-(-len(desc) // 4) * 4, b"\0"))


def write_kdump(memory: PhysicalMemory, out: PathOrFile, *, compression: str = "zlib", excluded=(),
                dump_level: int = 1, vmcoreinfo: bytes = b"", release: str = "7.3.0-rc7",
                machine: str = "x86_64", split: tuple[int, int] | None = None) -> int:
    """A kdump-compressed vmcore (header version 6) as makedumpfile writes it: the RAM banks
    in the first bitmap, every RAM page but the ``excluded`` pfns in the second, the zero pages
    sharing one stored page, the others compressed with ``compression`` (raw, zlib, lzo,
    snappy, zstd; stored raw when that does not make them smaller); after the sub-header the
    ELF notes (a CORE prstatus and ``vmcoreinfo`` as a VMCOREINFO note, when given), as
    makedumpfile lays them out.  ``split``: the ``[start, end)`` pfns of one file of a
    ``makedumpfile --split`` set (the bitmaps are the whole dump's, the pages only those of
    the range).  Returns the file size in bytes.  O(RAM pages) descriptors, host memory one
    page of data at a time."""
    compress, flag = KDUMP_COMPRESSORS[compression]
    ps = memory.page_size
    max_mapnr = memory.banks[-1].end // ps
    ram = np.zeros(max_mapnr, bool)
    for bank in memory.banks:
        ram[bank.start // ps:bank.end // ps] = True
    dumped = ram.copy()
    dumped[np.asarray(list(excluded), np.int64)] = False
    in_file = dumped.copy()  # a split file holds the descriptors of its range; its bitmaps are the whole dump's
    if split is not None:
        in_file[:split[0]] = in_file[split[1]:] = False
    core = elf_note(b"CORE", NT_PRSTATUS, bytes(PRSTATUS_BYTES)) if vmcoreinfo else b""
    notes = core + elf_note(b"VMCOREINFO", 0, vmcoreinfo) if vmcoreinfo else b""
    notes_at = ps + KDUMP_SUB_HEADER.itemsize
    sub_blocks = -(-(KDUMP_SUB_HEADER.itemsize + len(notes)) // ps)
    bitmap_bytes = -(-(-(-max_mapnr // 8)) // ps) * ps
    desc_at = (1 + sub_blocks) * ps + 2 * bitmap_bytes
    pfns = np.flatnonzero(in_file)
    descs = np.zeros(pfns.size, PAGE_DESC)
    data_at = desc_at + pfns.size * PAGE_DESC.itemsize
    descs["offset"], descs["size"] = data_at, ps  # the zero page, stored first
    stored = [bytes(ps)]
    at = data_at + ps
    for phys, run in page_runs(memory):
        for k in range(0, len(run), ps):
            pfn = (phys + k) // ps
            index = int(np.searchsorted(pfns, pfn))
            page = run[k:k + ps]
            if index == pfns.size or pfns[index] != pfn or not any(page):
                continue
            packed = compress(page) if compress else page
            page_flag = flag if len(packed) < ps else 0
            packed = packed if page_flag else page
            descs[index] = (at, len(packed), page_flag, 0)
            stored.append(packed)
            at += len(packed)
    header = np.zeros(1, DISK_DUMP_HEADER)
    for key, value in (("signature", KDUMP_SIGNATURE), ("header_version", 6), ("sysname", b"Linux"),
                       ("nodename", b"kho"), ("release", release.encode()), ("version", b"#1 SMP"),
                       ("domainname", b"(none)"),
                       ("machine", machine.encode()), ("block_size", ps), ("sub_hdr_size", sub_blocks),
                       ("bitmap_blocks", 2 * bitmap_bytes // ps), ("max_mapnr", min(max_mapnr, 0xFFFFFFFF)),
                       ("nr_cpus", 1)):
        header[key] = value
    header["status"] = flag
    sub = np.zeros(1, KDUMP_SUB_HEADER)
    for key, value in (("dump_level", dump_level), ("max_mapnr_64", max_mapnr)):
        sub[key] = value
    if split is not None:
        sub["split"], sub["start_pfn_64"], sub["end_pfn_64"] = 1, split[0], split[1]
    if vmcoreinfo:  # the VMCOREINFO note's descriptor: past the CORE note, its header and name
        sub["offset_note"], sub["size_note"] = notes_at, len(notes)
        sub["offset_vmcoreinfo"], sub["size_vmcoreinfo"] = notes_at + len(core) + 12 + 12, len(vmcoreinfo)
    bitmaps = b"".join(np.packbits(b, bitorder="little").tobytes().ljust(bitmap_bytes, b"\0") for b in (ram, dumped))
    with _output(out) as f:
        origin = f.tell()
        f.write(header.tobytes().ljust(ps, b"\0") + (sub.tobytes() + notes).ljust(sub_blocks * ps, b"\0"))
        f.write(bitmaps + descs.tobytes())
        for chunk in stored:
            f.write(chunk)
        return f.tell() - origin
