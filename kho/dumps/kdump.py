"""makedumpfile's kdump-compressed vmcore (``makedumpfile -c``, ``-l``, ``-p``, ``-z``: what
the kdump services of Debian, Ubuntu, Fedora and RHEL write by default), read page by page.

The file, in blocks of ``block_size`` bytes (the dumped kernel's page size):

* block 0, ``struct disk_dump_header`` (:data:`DISK_DUMP_HEADER`): signature ``KDUMP   ``,
  version, the kernel's ``utsname``, ``block_size``, ``sub_hdr_size`` (blocks),
  ``bitmap_blocks``, ``max_mapnr`` (32-bit; ``max_mapnr_64`` from version 6);
* block 1, ``struct kdump_sub_header`` (:data:`KDUMP_SUB_HEADER`): ``phys_base``,
  ``dump_level``, ``split`` with the pfn range of a split file, where the VMCOREINFO is;
* then ``bitmap_blocks`` blocks: the first bitmap (a set bit = the pfn is RAM), then the
  second (a set bit = the page is in the dump; pages the dump level excludes — cache,
  user, free pages — are RAM but clear here), bit ``i`` of byte ``j`` for pfn ``8j + i``;
* then one ``struct page_desc`` (:data:`PAGE_DESC`: file offset, size, flags) per dumped
  page in pfn order, and the page data, each page compressed on its own with zlib, LZO,
  snappy or zstd (a flag says which) or stored raw (``size == block_size``); pages with the
  same contents (all the zero pages) may share one descriptor's data.

Only 64-bit little-endian dumps are read (KHO runs on x86_64 and arm64).  Libraries: zlib
(the standard library), LZO through ``lzallright`` (a wheel of the reference algorithm;
the ``python-lzo`` binding has no wheel), snappy through ``cramjam``, zstd through
``zstandard``.

Host memory: the second bitmap and a count of its set bits per 64-bit word (2 bits per
page of RAM: 4 MiB for 64 GiB), plus a few decompressed pages; descriptors and data are
read with ``pread`` when needed, the scan's in chunks of :data:`SCAN_DESCRIPTORS`.  A read of a page the dump level excluded is
a KHOFormatError naming the page and the level, never zeros taken for its contents.
Units: ``phys`` and sizes in bytes, ``pfn`` in pages.
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from typing import BinaryIO

import cramjam
import lzallright
import numpy as np
import zstandard

from kho.dumps.sources import SCAN_PREFIX_BYTES, PageScan, Source
from kho.errors import KHOError, KHOFormatError

#: ``KDUMP_SIGNATURE``: the first 8 bytes of a kdump-compressed file.
KDUMP_SIGNATURE = b"KDUMP   "
#: ``struct new_utsname``: six NUL-padded 65-byte strings.
UTSNAME_FIELDS = ("sysname", "nodename", "release", "version", "machine", "domainname")
#: ``struct disk_dump_header`` as a 64-bit kernel's makedumpfile writes it (``timestamp`` is
#: a ``struct timeval`` of two longs, aligned to 8 bytes).
DISK_DUMP_HEADER = np.dtype({
    "names": ["signature", "header_version", *UTSNAME_FIELDS, "tv_sec", "tv_usec", "status", "block_size",
              "sub_hdr_size", "bitmap_blocks", "max_mapnr", "total_ram_blocks", "device_blocks", "written_blocks",
              "current_cpu", "nr_cpus"],
    "formats": ["S8", "<i4", *["S65"] * 6, "<i8", "<i8", "<u4", "<i4", "<i4", "<u4", "<u4", "<u4", "<u4", "<u4",
                "<u4", "<i4"],
    "offsets": [0, 8, *range(12, 12 + 6 * 65, 65), 408, 416, 424, 428, 432, 436, 440, 444, 448, 452, 456, 460],
    "itemsize": 464,
})
#: ``struct kdump_sub_header`` (64-bit); fields past ``split`` exist from the header version
#: noted: ``start_pfn``/``end_pfn`` (2), ``offset_vmcoreinfo``/``size_vmcoreinfo`` (3),
#: ``offset_note``/``size_note`` (4), ``offset_eraseinfo``/``size_eraseinfo`` (5), the 64-bit
#: ``start_pfn_64``/``end_pfn_64``/``max_mapnr_64`` (6).
KDUMP_SUB_HEADER = np.dtype([
    ("phys_base", "<u8"), ("dump_level", "<i4"), ("split", "<i4"), ("start_pfn", "<u8"), ("end_pfn", "<u8"),
    ("offset_vmcoreinfo", "<i8"), ("size_vmcoreinfo", "<u8"), ("offset_note", "<i8"), ("size_note", "<u8"),
    ("offset_eraseinfo", "<i8"), ("size_eraseinfo", "<u8"), ("start_pfn_64", "<u8"), ("end_pfn_64", "<u8"),
    ("max_mapnr_64", "<u8"),
])
assert DISK_DUMP_HEADER.itemsize == 464 and KDUMP_SUB_HEADER.itemsize == 104
#: ``struct page_desc``: where a dumped page's data is, its size and how it is compressed.
PAGE_DESC = np.dtype([("offset", "<i8"), ("size", "<u4"), ("flags", "<u4"), ("page_flags", "<u8")])
assert PAGE_DESC.itemsize == 24
#: ``page_desc.flags``: the compression of a page (none of them: stored raw).
DUMP_DH_COMPRESSED_ZLIB = 0x1
DUMP_DH_COMPRESSED_LZO = 0x2
DUMP_DH_COMPRESSED_SNAPPY = 0x4
DUMP_DH_COMPRESSED_ZSTD = 0x20
COMPRESSIONS = {0: "raw", DUMP_DH_COMPRESSED_ZLIB: "zlib", DUMP_DH_COMPRESSED_LZO: "lzo",
                DUMP_DH_COMPRESSED_SNAPPY: "snappy", DUMP_DH_COMPRESSED_ZSTD: "zstd"}
#: Page descriptors read at once by the scan (bounds its host memory: 1.5 MiB).
SCAN_DESCRIPTORS = 1 << 16
#: Decompressed pages kept for reads.
CACHE_PAGES = 64
#: Most RAM ranges the first bitmap may describe (a machine has a few dozen; each becomes a
#: bank of the dump's memory, so this bounds what a small file can make kho hold).
MAX_RAM_RANGES = 1 << 16
#: Set bits in each byte value.
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


class KdumpSource(Source):
    """A kdump-compressed vmcore (see the module docstring); its page size is its block size
    (``page_size``, when given, must be that).  Opening reads the headers and
    the bitmaps (O(RAM pages / 8) bytes) and checks them; :meth:`read` decompresses the
    pages it touches (O(1) each); :meth:`scan` every dumped page's first bytes, once
    (O(dumped pages), zero pages once).  Malformed input is a KHOFormatError naming the
    field and its file offset."""

    format = "kdump"

    def __init__(self, path, page_size: int | None, file: BinaryIO):
        super().__init__(path, page_size or 0)
        self.file = file
        self.file_size = os.fstat(file.fileno()).st_size
        head = self._pread(0, DISK_DUMP_HEADER.itemsize, "disk_dump_header")
        h = np.frombuffer(head, DISK_DUMP_HEADER)[0]
        self.header_version = int(h["header_version"])
        self.utsname = {k: _text(bytes(h[k])) for k in UTSNAME_FIELDS}
        bs = int(h["block_size"])
        if bs not in (4096, 16384, 65536):
            raise KHOFormatError("disk_dump_header.block_size", f"{self.path}: {bs}-byte pages: kho reads 4K, 16K and "
                                 "64K pages", 428, where="offset")
        if page_size not in (None, bs):
            raise KHOError("EINVAL", f"{self.path}: a kdump-compressed vmcore of {bs}-byte pages, not {page_size}")
        self.page_size = bs
        if not 1 <= self.header_version <= 64:
            raise KHOFormatError("disk_dump_header.header_version", f"{self.path}: version {self.header_version}",
                                 8, where="offset")
        sub_blocks, bitmap_blocks = int(h["sub_hdr_size"]), int(h["bitmap_blocks"])
        if sub_blocks < 1 or (1 + sub_blocks) * bs > self.file_size:
            raise KHOFormatError("disk_dump_header.sub_hdr_size", f"{self.path}: {sub_blocks} blocks of sub-header "
                                 f"in a {self.file_size}-byte file", 432, where="offset")
        sub = np.frombuffer(self._pread(bs, KDUMP_SUB_HEADER.itemsize, "kdump_sub_header"), KDUMP_SUB_HEADER)[0]
        self.dump_level = int(sub["dump_level"])
        max_mapnr = int(sub["max_mapnr_64"]) if self.header_version >= 6 else int(h["max_mapnr"])
        bitmap_at = (1 + sub_blocks) * bs
        if bitmap_blocks < 2 or bitmap_blocks % 2 or bitmap_at + bitmap_blocks * bs > self.file_size:
            raise KHOFormatError("disk_dump_header.bitmap_blocks", f"{self.path}: {bitmap_blocks} bitmap blocks at "
                                 f"{bitmap_at:#x} in a {self.file_size}-byte file (two bitmaps of equal size)",
                                 436, where="offset")
        half = bitmap_blocks // 2 * bs
        if not 0 < max_mapnr <= half * 8:
            raise KHOFormatError("kdump_sub_header.max_mapnr", f"{self.path}: {max_mapnr} pages, the bitmaps hold "
                                 f"{half * 8}", bs + 96 if self.header_version >= 6 else 440, where="offset")
        words = -(-max_mapnr // 64)
        ram = self._bitmap(bitmap_at, words, max_mapnr)
        dumped = self._bitmap(bitmap_at + half, words, max_mapnr)
        self.split: tuple[int, int] | None = None
        if int(sub["split"]):  # one file of a makedumpfile --split set: the pages of its pfn range
            lo, hi = ((int(sub["start_pfn_64"]), int(sub["end_pfn_64"])) if self.header_version >= 6
                      else (int(sub["start_pfn"]), int(sub["end_pfn"])))
            self.split = (lo, min(hi, max_mapnr))
            dumped = _mask_outside(dumped, *self.split)
        # The descriptors follow the second bitmap as stored (a bit set there but not in the first
        # still has its descriptor, as libkdumpfile and crash count them); such a page is no RAM,
        # so it is never read, and the scan skips it.
        counts = _POPCOUNT8[dumped.view(np.uint8)].reshape(-1, 8).sum(axis=1, dtype=np.int64)
        self._rank = np.concatenate([[0], np.cumsum(counts)])  # dumped pages before each word
        self._dumped, self._ram = dumped, ram
        self.dumped_pages = int(self._rank[-1])
        self._desc_at = bitmap_at + bitmap_blocks * bs
        if self._desc_at + self.dumped_pages * PAGE_DESC.itemsize > self.file_size:
            raise KHOFormatError("page_desc", f"{self.path}: {self.dumped_pages} page descriptors from "
                                 f"{self._desc_at:#x} run past the {self.file_size}-byte file (truncated?)",
                                 self._desc_at, where="offset")
        self.extents = _runs(ram, bs, MAX_RAM_RANGES)
        if self.extents is None:
            raise KHOFormatError("kdump.bitmap", f"{self.path}: the first bitmap splits RAM into more than "
                                 f"{MAX_RAM_RANGES} ranges", bitmap_at, where="offset")
        if not self.extents:
            raise KHOFormatError("kdump.bitmap", f"{self.path}: the first bitmap marks no page as RAM", bitmap_at,
                                 where="offset")
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._scan: PageScan | None = None
        self._dctx = zstandard.ZstdDecompressor()
        ram_pages = sum(e - s for s, e in self.extents) // bs
        self.description = (f"kdump-compressed vmcore (makedumpfile header v{self.header_version}), "
                            f"{self.utsname['release'] or '?'} {self.utsname['machine'] or '?'}, dump level "
                            f"{self.dump_level}: {self.dumped_pages} of {ram_pages} RAM pages in the dump"
                            + (f" (split: pfns {self.split[0]:#x}-{self.split[1]:#x} in this file)" if self.split else ""))

    def _pread(self, offset: int, size: int, what: str) -> bytes:
        data = os.pread(self.file.fileno(), size, offset)
        if len(data) < size:
            raise KHOFormatError(what, f"{self.path}: truncated: {len(data)} of {size} bytes", offset, where="offset")
        return data

    def _bitmap(self, offset: int, words: int, bits: int) -> np.ndarray:
        """``bits`` bits of the bitmap at file ``offset`` as little-endian 64-bit words
        (bits past ``bits`` cleared).  O(bits / 8)."""
        raw = self._pread(offset, words * 8, "kdump.bitmap")
        return _mask_outside(np.frombuffer(raw, "<u8").copy(), 0, bits)

    def _is_dumped(self, pfn: int) -> bool:
        return bool((int(self._dumped[pfn >> 6]) >> (pfn & 63)) & 1)

    def _descriptor(self, pfn: int) -> np.void:
        """The page_desc of dumped ``pfn``: its rank among the dumped pages.  O(1)."""
        word = int(self._dumped[pfn >> 6])
        rank = int(self._rank[pfn >> 6]) + (word & ((1 << (pfn & 63)) - 1)).bit_count()
        at = self._desc_at + rank * PAGE_DESC.itemsize
        return np.frombuffer(self._pread(at, PAGE_DESC.itemsize, "page_desc"), PAGE_DESC)[0]

    def _page(self, pfn: int, desc: np.void, data: bytes | None = None, limit: int | None = None) -> bytes:
        """The contents of dumped ``pfn`` (its first ``limit`` bytes or more, when given).
        ``data``: its stored bytes when already read.  O(page)."""
        bs = self.page_size
        offset, size, flags = int(desc["offset"]), int(desc["size"]), int(desc["flags"])
        phys = pfn * bs
        kind = COMPRESSIONS.get(flags)
        if kind is None:
            raise KHOFormatError("page_desc.flags", f"{self.path}: page {phys:#x}: unknown compression {flags:#x}", phys)
        if offset < 0 or offset + size > self.file_size or size == 0 or size > bs or (kind == "raw" and size != bs):
            raise KHOFormatError("page_desc", f"{self.path}: page {phys:#x}: {size} {kind} bytes at file offset "
                                 f"{offset:#x} of a {self.file_size}-byte file", phys)
        if data is None:
            data = self._pread(offset, size, "page_desc.offset")
        try:
            page = self._decompress(kind, data, limit)
        except (zlib.error, lzallright.LZOError, cramjam.DecompressionError, zstandard.ZstdError) as err:
            raise KHOFormatError("page_desc", f"{self.path}: page {phys:#x}: damaged {kind} data: {err}", phys) from None
        if page is None:
            raise KHOFormatError("page_desc", f"{self.path}: page {phys:#x}: {kind} data that says it decompresses to "
                                 f"more than a {bs}-byte page", phys)
        if len(page) != bs and not (limit and kind == "zlib" and len(page) >= limit):
            raise KHOFormatError("page_desc", f"{self.path}: page {phys:#x}: {kind} data decompresses to {len(page)} "
                                 f"bytes, not a {bs}-byte page", phys)
        return page

    def _decompress(self, kind: str, data: bytes, limit: int | None) -> bytes | None:
        """One page from its stored bytes (``limit``: its first bytes suffice, zlib only);
        None when the data says it holds more than a page (checked before decompressing where
        the format states its size, so no claimed size is ever allocated).  O(page)."""
        bs = self.page_size
        if kind == "raw":
            return data
        if kind == "zlib":
            stream = zlib.decompressobj()
            page = stream.decompress(data, limit or bs)
            if limit:
                return page
            return None if stream.unconsumed_tail or stream.decompress(b"", 1) else page
        if kind == "zstd":
            if zstandard.frame_content_size(data) > bs:
                return None
            return self._dctx.decompress(data, max_output_size=bs)
        if kind == "snappy":
            if _uvarint(data) > bs:  # the raw format opens with the decompressed length
                return None
            return bytes(cramjam.snappy.decompress_raw(data))
        page = lzallright.LZOCompressor.decompress(data, output_size_hint=bs)  # LZO states no size
        return None if len(page) > bs else page

    def read(self, phys: int, size: int) -> bytes:
        """Bytes of dumped pages; a page the dump excluded is a KHOFormatError."""
        bs = self.page_size
        out = bytearray()
        for pfn in range(phys // bs, -(-(phys + size) // bs)):
            page = self._cache.get(pfn)
            if page is None:
                if not self._is_dumped(pfn):
                    if self.split and not self.split[0] <= pfn < self.split[1]:
                        why = (f"is in another file of this split dump (this one holds pfns "
                               f"{self.split[0]:#x}-{self.split[1]:#x})")
                    else:
                        why = f"was left out of the dump (makedumpfile dump level {self.dump_level})"
                    raise KHOFormatError("kdump.bitmap", f"{self.path}: page {pfn * bs:#x} {why}: its contents are "
                                         "unknown", pfn * bs)
                page = self._page(pfn, self._descriptor(pfn))
                self._cache[pfn] = page
                if len(self._cache) > CACHE_PAGES:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(pfn)
            out += page
        start = phys % bs
        return bytes(out[start:start + size])

    def scan(self) -> PageScan:
        """The first :data:`SCAN_PREFIX_BYTES` of every dumped page, :data:`SCAN_DESCRIPTORS`
        descriptors at a time (host memory: 1.5 MiB of descriptors, 33 KiB of prefixes); pages
        sharing stored data are decompressed once.  O(dumped pages)."""
        if self._scan is not None:
            return self._scan
        bs = self.page_size
        scan = PageScan()
        seen: dict[tuple[int, int], bytes] = {}
        for chunk, rank in _set_bits(self._dumped, self._rank):
            raw = self._pread(self._desc_at + rank * PAGE_DESC.itemsize, chunk.size * PAGE_DESC.itemsize, "page_desc")
            descs = np.frombuffer(raw, PAGE_DESC, count=chunk.size)
            # one decompression per distinct stored page (all the zero pages share one)
            keys, first, inverse = np.unique(descs["offset"], return_index=True, return_inverse=True)
            rows = np.zeros((keys.size, SCAN_PREFIX_BYTES), np.uint8)
            for k, i in enumerate(first.tolist()):
                key = (int(descs["offset"][i]), int(descs["size"][i]))
                prefix = seen.get(key)
                if prefix is None:
                    prefix = self._page(int(chunk[i]), descs[i], limit=SCAN_PREFIX_BYTES)[:SCAN_PREFIX_BYTES]
                    if len(seen) < 4096:  # shared data is the zero page, in practice: few keys
                        seen[key] = prefix
                rows[k] = np.frombuffer(prefix, np.uint8)
            prefixes = rows[inverse.reshape(-1)]
            if keys.size < chunk.size:  # shared data: every sharer must describe it the same way
                same = (descs["size"] == descs["size"][first][inverse.reshape(-1)]) & \
                       (descs["flags"] == descs["flags"][first][inverse.reshape(-1)])
                if not same.all():
                    bad = int(chunk[np.flatnonzero(~same)[0]]) * bs
                    raise KHOFormatError("page_desc", f"{self.path}: page {bad:#x} shares its data's offset with "
                                         "another page but not its size or compression", bad)
            in_ram = ((self._ram[chunk >> 6] >> (chunk & 63).astype(np.uint64)) & np.uint64(1)).astype(bool)
            scan.add_prefixes(chunk[in_ram].astype(np.uint64) * np.uint64(bs), prefixes[in_ram])
            scan.scanned_bytes += int(in_ram.sum()) * bs
        self._scan = scan
        return scan

    def close(self) -> None:
        self.file.close()


def _uvarint(data: bytes) -> int:
    """The unsigned LEB128 number ``data`` opens with (snappy's length prefix); -1 when it is
    cut short.  At most 10 bytes read."""
    value = 0
    for i, byte in enumerate(data[:10]):
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value
    return -1


def _mask_outside(words: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``words`` (a bitmap of 64-bit words) with the bits outside ``[lo, hi)`` cleared.  O(words)."""
    out = words.copy()
    lo, hi = max(lo, 0), max(hi, lo, 0)
    out[:lo // 64] = 0
    out[-(-hi // 64):] = 0
    if lo % 64 and lo // 64 < out.size:
        out[lo // 64] &= np.uint64(~((1 << (lo % 64)) - 1) & (2**64 - 1))
    if hi % 64 and hi // 64 < out.size:
        out[hi // 64] &= np.uint64((1 << (hi % 64)) - 1)
    return out


#: Words of a bitmap unpacked at once (65,536 pfns): bounds the host memory of the helpers below.
BITMAP_CHUNK_WORDS = SCAN_DESCRIPTORS // 64


def _set_bits(words: np.ndarray, rank: np.ndarray):
    """``(pfns, rank)`` for every :data:`BITMAP_CHUNK_WORDS` words holding set bits: their
    indices (int64, ascending) and how many set bits come before them (``rank``: set bits
    before each word).  O(bits / 8) in chunks."""
    for w in range(0, words.size, BITMAP_CHUNK_WORDS):
        part = words[w:w + BITMAP_CHUNK_WORDS]
        if part.any():
            pfns = np.flatnonzero(np.unpackbits(part.view(np.uint8), bitorder="little")).astype(np.int64) + w * 64
            yield pfns, int(rank[w])


def _runs(words: np.ndarray, page_size: int, limit: int | None = None) -> list[tuple[int, int]] | None:
    """The runs of set bits as ``[start, end)`` physical ranges in bytes; None once there are
    more than ``limit``.  O(bits / 8) in chunks."""
    runs: list[list[int]] = []
    for w in range(0, words.size, BITMAP_CHUNK_WORDS):
        bits = np.unpackbits(words[w:w + BITMAP_CHUNK_WORDS].view(np.uint8), bitorder="little").astype(np.int8)
        edges = (np.flatnonzero(np.diff(np.concatenate([[0], bits, [0]]))) + w * 64).tolist()
        for start, end in zip(edges[0::2], edges[1::2]):
            if runs and runs[-1][1] == start:
                runs[-1][1] = end  # a run across the chunk boundary
            else:
                runs.append([start, end])
        if limit is not None and len(runs) > limit:
            return None
    return [(start * page_size, end * page_size) for start, end in runs]
