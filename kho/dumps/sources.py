"""Where a dump's bytes come from: a raw file, a zstd-compressed raw file, an ELF core.

A source maps physical addresses to bytes and never holds the dump in host memory:

* :class:`RawSource`: file offset = ``phys - base``; read with ``pread``; the data extents
  of a sparse file are found with ``SEEK_DATA``/``SEEK_HOLE`` so a scan skips its holes.
* :class:`ElfSource`: the ``PT_LOAD`` segments of an ELF core (QEMU ``dump-guest-memory``,
  a kdump vmcore), by ``p_paddr``; bytes past ``p_filesz`` read as zeros; overlapping
  segments (a vmcore maps the kernel text twice) are cut so the first by address wins.
* :class:`ZstdSource`: one streaming decompression at open, :data:`ZSTD_BLOCK_PAGES` pages at
  a time: all-zero blocks are dropped, the others are recompressed (zstd level 1) into an
  anonymous temporary file (an index of their offsets stays in memory), and the page starts
  are scanned on the way (:meth:`Source.scan`): host memory is the index and one chunk,
  disk the compressed size of the non-zero content, time one decompression.  A read
  decompresses the blocks it touches (a few are cached).

Every source also scans its data for the page starts that hold an FDT header or an x86
``boot_params`` (:class:`PageScan`), in chunks of :data:`SCAN_CHUNK_BYTES` (numpy, vectorized
over the pages of a chunk).  Units: ``phys`` and sizes in bytes.
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import numpy as np
import zstandard
from elftools.common.exceptions import ELFError
from elftools.construct import ConstructError
from elftools.elf.elffile import ELFFile

from kho.abi.setup_data import BOOT_FLAG, BOOT_PARAMS_BOOT_FLAG_OFFSET, BOOT_PARAMS_HEADER_OFFSET, SETUP_HEADER_MAGIC
from kho.devicetree.layout import FDT_MAGIC
from kho.encodings.common import PHYS_ADDR_BITS
from kho.errors import KHOError, KHOFormatError

#: Bytes read at once when scanning a raw or ELF file (bounds the scan's host memory).
SCAN_CHUNK_BYTES = 16 << 20
#: Bytes at the start of a page the scan tests: the FDT magic at 0, an x86 boot_params'
#: ``boot_flag`` and ``header`` below this.
SCAN_PREFIX_BYTES = BOOT_PARAMS_HEADER_OFFSET + 4
#: Pages decompressed, tested for zeros and recompressed together by :class:`ZstdSource`.
ZSTD_BLOCK_PAGES = 64
#: Decompressed zstd blocks kept for reads.
ZSTD_CACHE_BLOCKS = 16
#: ``PT_LOAD``.
PT_LOAD = "PT_LOAD"
#: First four bytes of a zstd frame and of an ELF file.
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ELF_MAGIC = b"\x7fELF"
#: First bytes of makedumpfile's formats kho does not read: the older diskdump's header, and
#: the flattened format's (written to a pipe; ``makedumpfile -R`` rebuilds the dump).
KDUMP_SIGNATURES = {b"DISKDUMP": "diskdump vmcore", b"makedumpfile": "flattened makedumpfile vmcore"}


@dataclass
class PageScan:
    """Page starts (phys, uint64 ascending) holding an FDT magic (big-endian 0xd00dfeed) or an
    x86 ``boot_params`` signature (``boot_flag`` 0xAA55 and ``header`` "HdrS")."""

    fdt: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    boot_params: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    scanned_bytes: int = 0

    def add(self, phys: int, data: bytes | memoryview | mmap.mmap, page_size: int, offset: int = 0) -> None:
        """Scan the whole pages of ``data`` from byte ``offset`` on, the first at page-aligned
        ``phys``.  Only the first bytes of each page are touched.  O(pages), vectorized."""
        count = (len(data) - offset) // page_size
        if count <= 0:
            return
        words = np.frombuffer(data, dtype=np.uint8, count=count * page_size, offset=offset).reshape(count, page_size)
        starts = np.uint64(phys) + np.arange(count, dtype=np.uint64) * np.uint64(page_size)
        self.add_prefixes(starts, words)
        self.scanned_bytes += count * page_size
        del words  # no view of ``data`` outlives the call (an mmap can be closed)

    def add_prefixes(self, starts: np.ndarray, prefixes: np.ndarray) -> None:
        """Scan pages given by their phys ``starts`` (uint64) and their first bytes, one row of
        ``prefixes`` (uint8) each, :data:`SCAN_PREFIX_BYTES` or more (a row of fewer bytes is
        tested for the FDT magic only).  O(rows), vectorized."""
        magic = prefixes[:, :4].copy().view(">u4")[:, 0]
        hits = np.flatnonzero(magic == FDT_MAGIC)
        if hits.size:
            self.fdt = np.concatenate([self.fdt, starts[hits]])
        if prefixes.shape[1] >= SCAN_PREFIX_BYTES:
            header = prefixes[:, BOOT_PARAMS_HEADER_OFFSET:BOOT_PARAMS_HEADER_OFFSET + 4].copy().view("<u4")[:, 0]
            flag = prefixes[:, BOOT_PARAMS_BOOT_FLAG_OFFSET:BOOT_PARAMS_BOOT_FLAG_OFFSET + 2].copy().view("<u2")[:, 0]
            hits = np.flatnonzero((header == SETUP_HEADER_MAGIC) & (flag == BOOT_FLAG))
            if hits.size:
                self.boot_params = np.concatenate([self.boot_params, starts[hits]])


class Source:
    """Bytes by physical address.  Subclasses set :attr:`format`, :attr:`extents` (the
    ``[start, end)`` phys ranges the dump covers, page-aligned, ascending, disjoint) and
    :attr:`description`."""

    format: str = ""

    def __init__(self, path: str | os.PathLike, page_size: int):
        self.path = os.fspath(path)
        self.page_size = page_size
        self.extents: list[tuple[int, int]] = []
        self.description = ""

    def read(self, phys: int, size: int) -> bytes:
        """``size`` bytes from ``phys`` (the caller keeps the range inside :attr:`extents`)."""
        raise NotImplementedError

    def scan(self) -> PageScan:
        """The page starts holding an FDT or boot_params (computed once).  O(data bytes)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file."""


def _page_floor(value: int, page_size: int) -> int:
    return value & ~(page_size - 1)


def _page_ceil(value: int, page_size: int) -> int:
    return (value + page_size - 1) & ~(page_size - 1)


class _FileSource(Source):
    """A source backed by an open file read with ``pread``; :attr:`pieces` map phys to file
    offsets: ``(phys start, phys end, file offset of start, bytes in the file)``."""

    def __init__(self, path, page_size: int, file: BinaryIO):
        super().__init__(path, page_size)
        self.file = file
        self.file_size = os.fstat(file.fileno()).st_size
        self.pieces: list[tuple[int, int, int, int]] = []
        self._piece_starts: list[int] = []
        self._scan: PageScan | None = None

    def _set_pieces(self, pieces: list[tuple[int, int, int, int]]) -> None:
        self.pieces = sorted(pieces)
        self._piece_starts = [p[0] for p in self.pieces]

    def read(self, phys: int, size: int) -> bytes:
        """Bytes of the pieces read straight into the result (``preadv``); holes, the part of
        a segment past its file bytes and anything past the end of the file read as zeros."""
        out = bytearray(size)
        view = memoryview(out)
        end = phys + size
        fd = self.file.fileno()
        i = max(bisect_right(self._piece_starts, phys) - 1, 0)
        while i < len(self.pieces) and self.pieces[i][0] < end:
            start, stop, offset, in_file = self.pieces[i]
            lo, hi = max(start, phys), min(stop, end, start + in_file)
            if lo < hi:
                os.preadv(fd, [view[lo - phys:hi - phys]], offset + lo - start)
            i += 1
        return bytes(out)

    def _file_data_ranges(self, offset: int, size: int) -> Iterator[tuple[int, int]]:
        """Data ranges ``[lo, hi)`` of the file within ``[offset, offset + size)``, holes skipped
        (``SEEK_DATA``/``SEEK_HOLE`` where the file system has them)."""
        fd = self.file.fileno()
        end = min(offset + size, self.file_size)
        pos = offset
        while pos < end:
            try:
                lo = os.lseek(fd, pos, os.SEEK_DATA)
                hi = os.lseek(fd, lo, os.SEEK_HOLE)
            except OSError as err:
                if err.errno == errno.ENXIO:  # no data after pos
                    return
                lo, hi = pos, end  # the file system cannot tell: read everything
            if lo >= end:
                return
            yield lo, min(hi, end)
            pos = hi

    def scan(self) -> PageScan:
        """Scan the whole pages in the file's data (holes skipped), once: each window of
        :data:`SCAN_CHUNK_BYTES` is mapped, its page starts read, and unmapped (so neither
        copies nor resident pages accumulate).  O(data pages)."""
        if self._scan is None:
            ps = self.page_size
            scan = PageScan()
            for start, stop, offset, in_file in self.pieces:
                held = min(in_file, stop - start, self.file_size - offset)  # bytes of the piece in the file
                limit = _page_floor(start + held, ps)  # pages wholly in the file: never map past its end
                for lo, hi in self._file_data_ranges(offset, held):
                    phys = _page_ceil(start + lo - offset, ps)  # a page starting before lo starts in a hole
                    end = min(_page_ceil(start + hi - offset, ps), limit)
                    while phys < end:
                        n = min(SCAN_CHUNK_BYTES, end - phys)
                        at = offset + phys - start
                        self._scan_window(scan, phys, at, n)
                        phys += n
            self._scan = scan
        return self._scan

    def _scan_window(self, scan: PageScan, phys: int, at: int, n: int) -> None:
        """Add the ``n`` bytes at file offset ``at`` (phys ``phys``) to ``scan``: mapped, or
        read into a buffer when the file cannot be mapped (``/proc/kcore``).  O(n)."""
        base = at - at % mmap.ALLOCATIONGRANULARITY
        try:
            window = mmap.mmap(self.file.fileno(), at - base + n, access=mmap.ACCESS_READ, offset=base)
        except OSError:
            scan.add(phys, os.pread(self.file.fileno(), n, at).ljust(n, b"\0"), self.page_size)
            return
        with window:
            scan.add(phys, window, self.page_size, at - base)

    def close(self) -> None:
        self.file.close()


class RawSource(_FileSource):
    """A raw physical-memory dump: byte ``i`` of the file is phys ``base + i``.

    The dump covers ``[base, base + file size)`` rounded down to whole pages (a partial last
    page is ignored and :attr:`description` says so)."""

    format = "raw"

    def __init__(self, path, page_size: int, base: int, file: BinaryIO):
        super().__init__(path, page_size, file)
        if base < 0 or base % page_size:
            raise KHOError("EINVAL", f"base {base:#x} is not a page-aligned address")
        whole = _page_floor(self.file_size, page_size)
        if whole == 0:
            raise KHOFormatError("dump", f"{self.path}: raw dump of {self.file_size} bytes: less than one {page_size}-byte page",
                                 0, where="offset")
        self.extents = [(base, base + whole)]
        self._set_pieces([(base, base + whole, 0, whole)])
        tail = f" ({self.file_size - whole} trailing bytes ignored)" if whole != self.file_size else ""
        self.description = f"raw dump, {whole} bytes at phys {base:#x}{tail}"


class ElfSource(_FileSource):
    """An ELF core's ``PT_LOAD`` segments, by physical address (``p_paddr``).  Its page size
    is its VMCOREINFO note's ``PAGESIZE`` when it has one (a vmcore, ``/proc/kcore``;
    ``page_size``, when given, must agree), else ``page_size`` or 4096."""

    format = "elf"

    def __init__(self, path, page_size: int | None, file: BinaryIO):
        super().__init__(path, page_size or 0, file)
        try:
            elf = ELFFile(file)
            kind = elf.header["e_type"]
            little_endian = elf.little_endian
            loads = [seg.header for seg in elf.iter_segments() if seg.header["p_type"] == PT_LOAD]
            self.vmcoreinfo = _vmcoreinfo(elf)
        except (ELFError, ConstructError, ValueError, KeyError, OSError, AssertionError) as err:
            raise KHOFormatError("elf", f"{self.path}: an ELF header, but unreadable: {err}", 0, where="offset") from None
        self.page_size = _elf_page_size(self.path, self.vmcoreinfo, page_size)
        if kind != "ET_CORE":
            raise KHOFormatError("elf.e_type", f"{self.path}: an ELF file of type {kind}, not a core dump", 16, where="offset")
        if not little_endian:
            raise KHOFormatError("elf.e_ident", f"{self.path}: a big-endian core; KHO's structures are read "
                                                "little-endian (arm64, x86_64)", 5, where="offset")
        segments = []
        unmapped = 0
        for h in loads:
            paddr, memsz, offset, filesz = (int(h[k]) for k in ("p_paddr", "p_memsz", "p_offset", "p_filesz"))
            if filesz > memsz or offset + filesz > self.file_size:
                raise KHOFormatError("elf.p_filesz", f"{self.path}: PT_LOAD at paddr {paddr:#x}: {filesz} bytes at file offset "
                                     f"{offset:#x} run past the segment or the {self.file_size}-byte file",
                                     offset, where="offset")
            if paddr + memsz > 1 << PHYS_ADDR_BITS:  # /proc/kcore's vmalloc and text segments: p_paddr -1
                unmapped += 1
            elif memsz:
                segments.append((paddr, paddr + memsz, offset, filesz))
        if not segments:
            raise KHOFormatError("elf.phdr", f"{self.path}: an ELF core without PT_LOAD segments of physical memory"
                                             f"{f' ({unmapped} beyond the physical address space)' if unmapped else ''}",
                                 0, where="offset")
        pieces = []
        covered = 0  # segments sorted by address; each keeps only what no earlier one covers
        for start, stop, offset, filesz in sorted(segments, key=lambda s: (s[0], -s[1])):
            lo = max(start, covered)
            if lo < stop:
                pieces.append((lo, stop, offset + lo - start, max(0, filesz - (lo - start))))
                covered = stop
        self._set_pieces(pieces)
        self.extents = _merge_page_ranges([(p[0], p[1]) for p in pieces], self.page_size)
        if not self.extents:
            raise KHOFormatError("elf.phdr", f"{self.path}: no PT_LOAD segment holds a whole page", 0, where="offset")
        skipped = f" ({unmapped} without a physical address skipped)" if unmapped else ""
        self.description = (f"ELF core, {len(segments)} PT_LOAD segments{skipped}, "
                            f"{sum(e - s for s, e in self.extents)} bytes of RAM")


#: Bytes of notes read from an ELF core (a kernel's are a few KiB: prstatus per CPU, VMCOREINFO).
MAX_NOTES_BYTES = 1 << 20


def _vmcoreinfo(elf: ELFFile) -> dict[str, str]:
    """The ``KEY=value`` lines of the core's VMCOREINFO note (empty without one, or when the
    notes cannot be parsed: damaged notes do not keep the memory from being read).  Notes
    past :data:`MAX_NOTES_BYTES` are not read.  O(notes)."""
    try:
        for segment in elf.iter_segments():
            if segment.header["p_type"] != "PT_NOTE" or segment.header["p_filesz"] > MAX_NOTES_BYTES:
                continue
            for note in segment.iter_notes():
                if note["n_name"] == "VMCOREINFO" and isinstance(note["n_desc"], bytes):
                    lines = note["n_desc"].decode("ascii", "replace").splitlines()
                    return dict(line.split("=", 1) for line in lines if "=" in line)
    except (ELFError, ConstructError, ValueError, KeyError, AssertionError, OSError):
        pass
    return {}


def _elf_page_size(path: str, vmcoreinfo: dict[str, str], given: int | None) -> int:
    """The page size of an ELF core: VMCOREINFO's ``PAGESIZE`` (``given`` must agree), else
    ``given`` or 4096.  KHOError(EINVAL) for a disagreement or a size kho does not read."""
    said = vmcoreinfo.get("PAGESIZE", "").strip()
    if not said:
        return given or 4096
    if said not in ("4096", "16384", "65536"):
        raise KHOFormatError("VMCOREINFO.PAGESIZE", f"{path}: PAGESIZE={said[:20]}: kho reads 4K, 16K and 64K pages",
                             None)
    if given not in (None, int(said)):
        raise KHOError("EINVAL", f"{path}: its VMCOREINFO says PAGESIZE={said}, not {given}")
    return int(said)


def _merge_page_ranges(ranges: list[tuple[int, int]], page_size: int) -> list[tuple[int, int]]:
    """Ranges shrunk to whole pages, adjacent or overlapping ones merged, empty ones dropped."""
    out: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        start, stop = _page_ceil(start, page_size), _page_floor(stop, page_size)
        if start >= stop:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


class ZstdSource(Source):
    """A zstd-compressed raw dump (byte ``i`` of the decompressed stream is phys ``base + i``).

    Opening decompresses the stream once (every frame, in order), scanning it and keeping the
    non-zero blocks recompressed; see the module docstring.  Damaged or truncated input is a
    KHOFormatError naming the compressed offset reached."""

    format = "zstd"

    def __init__(self, path, page_size: int, base: int, file: BinaryIO):
        super().__init__(path, page_size)
        if base < 0 or base % page_size:
            raise KHOError("EINVAL", f"base {base:#x} is not a page-aligned address")
        self.base = base
        self.block_bytes = ZSTD_BLOCK_PAGES * page_size
        self.blocks: dict[int, tuple[int, int]] = {}  # block number -> (offset, length) in the spill file
        self._spill = tempfile.TemporaryFile(prefix="kho-zstd-blocks-")
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._dctx = zstandard.ZstdDecompressor()
        compressed_size = os.fstat(file.fileno()).st_size
        self._scan = PageScan()
        total = self._index(file)
        whole = _page_floor(total, page_size)
        if whole == 0:
            raise KHOFormatError("zstd", f"{self.path}: decompresses to {total} bytes: less than one {page_size}-byte page",
                                 0, where="offset")
        self.size = whole
        self.extents = [(base, base + whole)]
        self._spill.flush()
        self.stored_bytes = self._spill.tell()
        tail = f" ({total - whole} trailing bytes ignored)" if whole != total else ""
        self.description = (f"zstd-compressed raw dump, {compressed_size} bytes -> {whole} bytes at phys {base:#x}"
                            f"{tail}; {len(self.blocks)} non-zero {self.block_bytes >> 10} KiB blocks kept recompressed "
                            f"in {self.stored_bytes} bytes of a temporary file")
        file.close()

    def _index(self, file: BinaryIO) -> int:
        """Decompress the whole stream once; returns its decompressed size in bytes."""
        cctx = zstandard.ZstdCompressor(level=1)
        reader = self._dctx.stream_reader(file, read_size=1 << 20, read_across_frames=True)
        pos = 0
        block = self.block_bytes
        chunk_blocks = max(1, SCAN_CHUNK_BYTES // block)
        try:
            while True:
                data = _read_full(reader, chunk_blocks * block)
                if not data:
                    break
                whole = _page_floor(len(data), self.page_size)
                self._scan.add(self.base + pos, memoryview(data)[:whole], self.page_size)
                n = -(-len(data) // block)
                padded = data if len(data) == n * block else data + bytes(n * block - len(data))
                nonzero = np.frombuffer(padded, dtype="<u8").reshape(n, block // 8).any(axis=1)
                first = pos // block
                view = memoryview(padded)
                for k in np.flatnonzero(nonzero).tolist():
                    packed = cctx.compress(view[k * block:(k + 1) * block])
                    self.blocks[first + k] = (self._spill.tell(), len(packed))
                    self._spill.write(packed)
                pos += len(data)
                if len(data) % block:
                    break
        except zstandard.ZstdError as err:
            raise KHOFormatError("zstd", f"{self.path}: damaged or truncated after {pos} decompressed bytes: {err}",
                                 file.tell(), where="offset") from None
        if pos == 0:
            raise KHOFormatError("zstd", f"{self.path}: a zstd frame that decompresses to nothing", 0, where="offset")
        return pos

    def _block(self, number: int) -> bytes | None:
        if number in self._cache:
            self._cache.move_to_end(number)
            return self._cache[number]
        where = self.blocks.get(number)
        if where is None:
            return None
        data = self._dctx.decompress(os.pread(self._spill.fileno(), where[1], where[0]), max_output_size=self.block_bytes)
        self._cache[number] = data
        if len(self._cache) > ZSTD_CACHE_BLOCKS:
            self._cache.popitem(last=False)
        return data

    def read(self, phys: int, size: int) -> bytes:
        out = bytearray(size)
        pos = phys - self.base
        end = pos + size
        block = self.block_bytes
        for number in range(pos // block, -(-end // block)):
            data = self._block(number)
            if data is None:
                continue
            lo, hi = max(pos, number * block), min(end, (number + 1) * block)
            out[lo - pos:hi - pos] = data[lo - number * block:hi - number * block]
        return bytes(out)

    def scan(self) -> PageScan:
        """Computed while indexing."""
        return self._scan

    def close(self) -> None:
        self._spill.close()


def _read_full(reader, size: int) -> bytes:
    """Read ``size`` bytes from a stream reader (fewer only at the end of the stream)."""
    parts = []
    got = 0
    while got < size:
        part = reader.read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)
