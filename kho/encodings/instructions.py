"""``instructions``: a linear, address-sorted stream the next kernel's free-list builder walks once.

The stream (proposed on the list, never built in the kernel) tells the next kernel, from
the first RAM bank's start to the last bank's end, what to do with every page: give it
to the buddy allocator, keep it (preserved), or leave it alone (a scratch area, which the
next kernel handles itself, or a hole between banks).  No memblock range is needed.

Layout (one logical byte stream, little-endian; see spec/encodings.md):

* :data:`STREAM_HEADER` (24 bytes): magic ``KHOI``, version, page shift, number of
  records, number of bitmap words;
* the records, :data:`RECORD` (16 bytes each), sorted by address and tiling the span
  exactly: ``head = op << 60 | kind << 56 | order << 52 | start pfn`` and ``arg``:

  ========  ==========================================================================
  FREE      pages ``[start, start + arg)`` are free
  SKIP      pages ``[start, start + arg)`` are not touched; kind 0 = hole, 1 = scratch
  UNIT      the unit ``(start, order)`` is preserved, then ``arg`` pages are free
  BITMAP    ``arg`` units of ``order`` from ``start``: bit set = preserved, clear = free;
            the bits are the next ``ceil(arg / 64)`` words of the bitmap section
  ========  ==========================================================================

* the bitmap section: u64 words, consumed in record order (bit ``b`` of a slice is bit
  ``b % 64`` of its word ``b // 64``); bits past ``arg`` in the last word are 0.

The walker keeps two cursors, one in the records and one in the bitmap words, and moves
each forward only.  The stream is stored in a chunk list (magic ``KHIS``, 8-byte entries,
so records and words may straddle chunks); ``preserved-memory-map`` holds the first
chunk's phys.  The stream's own pages and the KHO FDT page are not preserved: they lie in
FREE ranges, to be freed once read.

The encoder groups address-consecutive units of one order in one usable segment (RAM
between scratch areas) into a cluster while the gap to the next unit is at most
:data:`GAP_BITS` units, and writes each cluster as one BITMAP (+ FREE) or as UNIT
records, whichever is fewer bytes.  Random order-0 pages therefore become a few large
bitmaps (~1 bit a page, like kho-v1), isolated folios 16 bytes each (like ``ranges``,
but orders survive).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Mapping

import numpy as np

from kho.abi.kexec_handover import KHO_FDT_MEMORY_MAP_PROP_NAME
from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.devicetree.layout import pack_u64
from kho.encodings.base import DecodedMap, EncodedMap, Encoding, register
from kho.encodings.chunklist import (
    ChunkList,
    magic_of,
    read_chunk_list,
    write_chunk_list,
)
from kho.encodings.common import check_metadata_disjoint, check_page_size, read_map_pointer
from kho.errors import KHOFormatError
from kho.memory import intervals
from kho.memory.physical import PhysicalMemory

#: The stream header (24 bytes).
STREAM_HEADER = np.dtype([("magic", "<u4"), ("version", "<u2"), ("page_shift", "<u2"),
                          ("nr_records", "<u8"), ("nr_words", "<u8")])
#: One record (16 bytes): packed ``head`` and ``arg``.
RECORD = np.dtype([("head", "<u8"), ("arg", "<u8")])
#: Bitmap words.
WORD = np.dtype("<u8")
STREAM_MAGIC = magic_of(b"KHOI")
STREAM_VERSION = 1
CHUNK_MAGIC = magic_of(b"KHIS")

#: Fields of ``head``: start pfn in bits 0..51, order 52..55, kind 56..59, op 60..63.
PFN_BITS = 52
ORDER_SHIFT, KIND_SHIFT, OP_SHIFT = 52, 56, 60
FIELD_MASK = 0xF
PFN_MASK = (1 << PFN_BITS) - 1
OP_FREE, OP_SKIP, OP_UNIT, OP_BITMAP = 1, 2, 3, 4
OP_NAMES = {OP_FREE: "FREE", OP_SKIP: "SKIP", OP_UNIT: "UNIT", OP_BITMAP: "BITMAP"}
SKIP_HOLE, SKIP_SCRATCH = 0, 1
#: Largest page count an ``arg`` may hold (the pfn space).
MAX_ARG = 1 << PFN_BITS
#: Bitmap words the walker expands at a time (2**20 words: 64 Mi bits, 64 MiB unpacked).
WALK_WORDS = 1 << 20
#: Up to this many BITMAP records, the walker expands them one by one (no per-word tables).
FEW_BITMAPS = 64
#: Set bits of every byte value.
_POPCOUNT8 = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint8)
#: A gap of more units than this between two units of one order ends a bitmap slice
#: (256 bits = 32 bytes, the cost of a FREE record plus a new BITMAP record).
GAP_BITS = 256


@dataclass
class StreamWalk:
    """What one pass over the stream yields (pfns int64, half-open; phys uint64).

    ``skip_*``: the SKIP records; ``unit_phys``/``unit_order``: the preserved units by
    address (``unit_pfn``: the same as pfns, int64); ``metadata_pages``: phys of the stream's own chunk pages (sorted; they lie in
    free runs unless the allocator put them in scratch).  ``free_*`` (computed on first
    use, O(units)): the runs to free, sorted, coalesced within each RAM bank, never
    touching a scratch area or a hole; every usable page (RAM outside the scratch areas)
    that no unit covers, so a page mask needs only the units (the next kernel's boot).
    """

    skip_start_pfn: np.ndarray
    skip_end_pfn: np.ndarray
    unit_phys: np.ndarray
    unit_order: np.ndarray
    metadata_pages: np.ndarray
    nr_records: int
    nr_words: int
    memory: PhysicalMemory
    unit_pfn: np.ndarray

    @cached_property
    def _free_runs(self) -> tuple[np.ndarray, np.ndarray]:
        return _free_gaps(self.memory, *intervals.of_units(self.unit_pfn, self.unit_order))

    @property
    def free_start_pfn(self) -> np.ndarray:
        return self._free_runs[0]

    @property
    def free_end_pfn(self) -> np.ndarray:
        return self._free_runs[1]


def _head(op: int, start: np.ndarray, order: np.ndarray | int = 0, kind: np.ndarray | int = 0) -> np.ndarray:
    return ((np.uint64(op) << np.uint64(OP_SHIFT)) | (np.asarray(kind, dtype=np.uint64) << np.uint64(KIND_SHIFT))
            | (np.asarray(order, dtype=np.uint64) << np.uint64(ORDER_SHIFT)) | np.asarray(start, dtype=np.int64).astype(np.uint64))


def _spans(first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Concatenated index ranges ``[first[i], first[i] + count[i])`` (int64)."""
    total = int(count.sum())
    return np.repeat(first - (np.cumsum(count) - count), count) + np.arange(total, dtype=np.int64)


@dataclass(frozen=True)
class _Units:
    """The units to encode, sorted by address: ``pfn`` int64 and ``order`` (one int64 when
    every unit has the same order, ``uniform``, so that per-unit work stays scalar)."""

    pfn: np.ndarray
    order: np.ndarray | np.int64
    uniform: bool

    @classmethod
    def of(cls, memory: PhysicalMemory, phys: np.ndarray, order: np.ndarray) -> "_Units":
        pfn = np.asarray(phys, dtype=np.uint64).view(np.int64) >> memory.page_shift
        uniform = bool(pfn.size) and bool((order == order[0]).all())
        return cls(pfn, np.int64(order[0]) if uniform else np.asarray(order, dtype=np.int64), uniform)

    def order_at(self, idx: np.ndarray):
        """The orders of the units ``idx`` (the one order when uniform)."""
        return self.order if self.uniform else self.order[idx]


class _RecordList:
    """Records gathered stage by stage, in any order; :meth:`sorted` lays them out."""

    def __init__(self):
        self.starts: list[np.ndarray] = []
        self.heads: list[np.ndarray] = []
        self.args: list[np.ndarray] = []

    def emit(self, op: int, start: np.ndarray, arg, order: np.ndarray | int = 0, kind: int = 0) -> None:
        """Records of ``op`` at pfns ``start`` (arg, order broadcast to it).  O(records)."""
        start = np.asarray(start, dtype=np.int64)
        self.starts.append(start)
        self.heads.append(np.broadcast_to(_head(op, start, order, kind), start.shape))
        self.args.append(np.broadcast_to(np.asarray(arg, dtype=np.int64), start.shape))

    def sorted(self) -> np.ndarray:
        """Every record (:data:`RECORD`) by start pfn.  O(r log r)."""
        start = np.concatenate(self.starts)
        sort = np.argsort(start, kind="stable")
        records = np.empty(start.size, dtype=RECORD)
        records["head"] = np.concatenate(self.heads)[sort]
        records["arg"] = np.concatenate(self.args)[sort].astype(np.uint64)
        return records


@dataclass(frozen=True)
class _Clusters:
    """Address-consecutive units of one order in one usable segment (see the module
    docstring), one entry per cluster: its units ``first..last`` (indexes, ``count``), its
    ``order``, pfns ``[start, end)``, usable segment ``seg``, the pfn its free pages run to
    (``boundary``: the next cluster of the segment, or the segment's end), the ``nbits`` and
    ``words`` a BITMAP of it takes, and whether that is cheaper than UNIT records."""

    first: np.ndarray
    last: np.ndarray
    count: np.ndarray
    order: np.ndarray
    start: np.ndarray
    end: np.ndarray
    seg: np.ndarray
    boundary: np.ndarray
    nbits: np.ndarray
    words: np.ndarray
    use_bitmap: np.ndarray


def _clusters(units: _Units, seg_start: np.ndarray, seg_end: np.ndarray) -> _Clusters:
    """Cut non-empty units into clusters: a break on a change of order or segment, or a gap
    above :data:`GAP_BITS` units.  O(units)."""
    pfn, ords, n = units.pfn, units.order, units.pfn.size
    if units.uniform:
        brk = (pfn[1:] - pfn[:-1]) > ((GAP_BITS + 1) << ords)
    else:
        brk = (ords[1:] != ords[:-1]) | (((pfn[1:] - pfn[:-1] - np.left_shift(1, ords[:-1])) >> ords[1:]) > GAP_BITS)
    cuts = np.searchsorted(pfn, seg_start[1:])
    cuts = cuts[(cuts > 0) & (cuts < n)]
    brk[cuts - 1] = True
    first = np.concatenate([[0], np.flatnonzero(brk) + 1])
    last = np.concatenate([first[1:] - 1, [n - 1]])
    order = units.order_at(first)
    start = pfn[first]
    end = pfn[last] + np.left_shift(1, units.order_at(last))
    seg = np.searchsorted(seg_start, start, side="right") - 1
    count = last - first + 1
    same_seg = np.concatenate([seg[1:] == seg[:-1], [False]])
    boundary = np.where(same_seg, np.concatenate([start[1:], [0]]), seg_end[seg])
    nbits = (end - start) >> order
    words = (nbits + 63) >> 6
    bitmap_cost = RECORD.itemsize * (1 + (end < boundary)) + WORD.itemsize * words
    return _Clusters(first, last, count, np.broadcast_to(order, start.shape), start, end, seg, boundary, nbits, words,
                     bitmap_cost < RECORD.itemsize * count)


def _emit_unit_records(out: _RecordList, units: _Units, c: _Clusters) -> None:
    """UNIT records of the clusters that do not use a bitmap, each followed by the free pages
    up to the next unit or the cluster's boundary.  O(their units)."""
    um = np.flatnonzero(~c.use_bitmap)
    if not um.size:
        return
    pfn = units.pfn
    idx = _spans(c.first[um], c.count[um])
    following = np.concatenate([pfn[1:], [0]])[idx]
    is_last = np.zeros(pfn.size, dtype=bool)
    is_last[c.last[um]] = True
    following[is_last[idx]] = c.boundary[um]
    u_order = units.order_at(idx)
    out.emit(OP_UNIT, pfn[idx], following - pfn[idx] - np.left_shift(1, u_order), u_order)


def _emit_bitmap_records(out: _RecordList, c: _Clusters) -> None:
    """BITMAP records, each followed by a FREE record up to its boundary.  O(clusters)."""
    bm = np.flatnonzero(c.use_bitmap)
    out.emit(OP_BITMAP, c.start[bm], c.nbits[bm], c.order[bm])
    tail = c.use_bitmap & (c.end < c.boundary)
    out.emit(OP_FREE, c.end[tail], (c.boundary - c.end)[tail])


def _bitmap_words(units: _Units, c: _Clusters) -> np.ndarray:
    """The bitmap section (uint64): one bit per unit position of each BITMAP slice, slices
    in address order.  O(bitmap bits)."""
    bm = np.flatnonzero(c.use_bitmap)
    if not bm.size:
        return np.empty(0, dtype=np.uint64)
    bm_words = c.words[bm]
    bit_base = (np.cumsum(bm_words) - bm_words) * 64 - (c.start[bm] >> c.order[bm])
    if bm.size == c.first.size:
        unit_pfn, unit_order = units.pfn, units.order
    else:
        idx = _spans(c.first[bm], c.count[bm])
        unit_pfn, unit_order = units.pfn[idx], units.order_at(idx)
    bits = np.zeros(int(bm_words.sum()) * 64, dtype=bool)
    bit = unit_pfn >> unit_order
    bit += np.repeat(bit_base, c.count[bm])
    bits[bit] = True
    return np.packbits(bits, bitorder="little").view(WORD).astype(np.uint64)


def build_stream(memory: PhysicalMemory, phys: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The records (:data:`RECORD`, sorted) and bitmap words (uint64) for units sorted by
    phys.  Stages: SKIP records for the holes between banks and the scratch areas, the
    units' clusters as UNIT or BITMAP (+ FREE) records, then each usable segment's free
    pages before its first cluster.  Vectorized: O(units + bitmap bits) numpy work, with
    per-unit work kept to a few passes (a set of one order uses a scalar order throughout)."""
    units = _Units.of(memory, phys, order)
    seg_start, seg_end = intervals.usable(memory)
    out = _RecordList()
    hole_start, hole_end = intervals.gaps(*intervals.banks(memory, np.int64))
    out.emit(OP_SKIP, hole_start, hole_end - hole_start, kind=SKIP_HOLE)
    skip_start, skip_end = intervals.scratch(memory, np.int64)
    out.emit(OP_SKIP, skip_start, skip_end - skip_start, kind=SKIP_SCRATCH)
    lead_end = seg_end.copy()  # where each segment's leading free pages end
    words = np.empty(0, dtype=np.uint64)
    if units.pfn.size:
        c = _clusters(units, seg_start, seg_end)
        _emit_unit_records(out, units, c)
        _emit_bitmap_records(out, c)
        words = _bitmap_words(units, c)
        seg_first = np.flatnonzero(np.concatenate([[True], c.seg[1:] != c.seg[:-1]]))
        lead_end[c.seg[seg_first]] = c.start[seg_first]
    lead = lead_end > seg_start
    out.emit(OP_FREE, seg_start[lead], (lead_end - seg_start)[lead])
    return out.sorted(), words


def stream_bytes(memory: PhysicalMemory, records: np.ndarray, words: np.ndarray) -> np.ndarray:
    """The whole stream (header, records, words) as uint8."""
    header = np.zeros(1, dtype=STREAM_HEADER)
    header["magic"], header["version"], header["page_shift"] = STREAM_MAGIC, STREAM_VERSION, memory.page_shift
    header["nr_records"], header["nr_words"] = records.size, words.size
    return np.concatenate([header.view(np.uint8), records.view(np.uint8), words.astype(WORD).view(np.uint8)])


# -- walking ----------------------------------------------------------------------------------
class _Stream:
    """The parsed sections of a stream read from its chunk list, with error locations."""

    def __init__(self, memory: PhysicalMemory, chunks: ChunkList):
        self.chunks = chunks
        payload = chunks.payload
        if payload.size < STREAM_HEADER.itemsize:
            raise KHOFormatError("instructions.header", f"stream of {payload.size} bytes is shorter than its header",
                                 self.location(0) if payload.size else int(chunks.pages[0]))
        header = np.frombuffer(payload[:STREAM_HEADER.itemsize].tobytes(), dtype=STREAM_HEADER)[0]
        for ok, field, message in (
            (int(header["magic"]) == STREAM_MAGIC, "magic", f"{int(header['magic']):#010x}, expected {STREAM_MAGIC:#010x}"),
            (int(header["version"]) == STREAM_VERSION, "version", f"{int(header['version'])}, expected {STREAM_VERSION}"),
            (int(header["page_shift"]) == memory.page_shift, "page_shift",
             f"{int(header['page_shift'])}, but the machine's pages are {memory.page_size} bytes"),
        ):
            if not ok:
                raise KHOFormatError(f"instructions.header.{field}", message, self.location(0))
        self.nr_records, self.nr_words = int(header["nr_records"]), int(header["nr_words"])
        expected = STREAM_HEADER.itemsize + RECORD.itemsize * self.nr_records + WORD.itemsize * self.nr_words
        if expected != payload.size:
            raise KHOFormatError("instructions.header", f"{self.nr_records} records and {self.nr_words} words need "
                                 f"{expected} bytes, the chunks hold {payload.size}", self.location(0))
        body = payload[STREAM_HEADER.itemsize:]
        self.records = body[:RECORD.itemsize * self.nr_records].view(RECORD)
        self.words = body[RECORD.itemsize * self.nr_records:].view(WORD).astype(np.uint64)

    def location(self, offset: int) -> int:
        """Phys of stream byte ``offset`` (a multiple of 8)."""
        return self.chunks.location(offset // 8)

    def record_location(self, i: int) -> int:
        return self.location(STREAM_HEADER.itemsize + RECORD.itemsize * i)

    def word_location(self, i: int) -> int:
        return self.location(STREAM_HEADER.itemsize + RECORD.itemsize * self.nr_records + WORD.itemsize * i)


def _popcount(words: np.ndarray) -> int:
    """Set bits in ``words`` (uint64): ``np.bitwise_count`` where numpy has it (2.0+), else
    a byte table.  O(words)."""
    count = getattr(np, "bitwise_count", None)
    if count is not None:
        return int(count(words).sum(dtype=np.int64))
    return int(_POPCOUNT8[words.view(np.uint8)].sum(dtype=np.int64))


def _bitmap_units(stream: _Stream, start: np.ndarray, order: np.ndarray, nbits: np.ndarray, records: np.ndarray):
    """Check the bitmap section against the BITMAP records (``records``: their indices) and
    return the units ``(pfn, order)`` their set bits keep, by address.  O(bitmap bits)."""
    words_per = (nbits + 63) >> 6
    woff = np.cumsum(words_per) - words_per
    total = int(words_per.sum()) if nbits.size else 0
    if total != stream.nr_words:
        raise KHOFormatError("instructions.bitmap", f"the BITMAP records need {total} words, the header says {stream.nr_words}",
                             stream.location(0))
    if not nbits.size:
        return np.empty(0, np.int64), np.empty(0, np.uint8)
    rem = nbits & 63
    partial = np.flatnonzero(rem)
    last_word = stream.words[(woff + words_per - 1)[partial]]
    pad_mask = ~((np.uint64(1) << rem[partial].astype(np.uint64)) - np.uint64(1))
    bad = (last_word & pad_mask) != 0
    if bad.any():
        i = int(partial[np.argmax(bad)])
        raise KHOFormatError("instructions.bitmap", f"bits beyond the {int(nbits[i])} of BITMAP record {int(records[i])} are set",
                             stream.word_location(int(woff[i] + words_per[i] - 1)))
    # Expanded WALK_WORDS words at a time into arrays sized by the set bits: temporaries
    # bounded whatever the stream's size.
    uniform = bool((order == order[0]).all())
    total = _popcount(stream.words)
    unit_pfn = np.empty(total, dtype=np.int64)
    unit_order = np.full(total, order[0], dtype=np.uint8) if uniform else np.empty(total, dtype=np.uint8)
    at = 0
    if nbits.size <= FEW_BITMAPS:  # record by record: bit b of a record is (b << order) + start
        for first, count, o, base in zip(woff.tolist(), words_per.tolist(), order.tolist(), start.tolist()):
            for w0 in range(first, first + count, WALK_WORDS):
                words = stream.words[w0:min(w0 + WALK_WORDS, first + count)]
                pos = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little").view(bool))
                out = unit_pfn[at:at + pos.size]
                np.left_shift(pos + ((w0 - first) << 6), o, out=out)
                out += base
                if not uniform:
                    unit_order[at:at + pos.size] = o
                at += pos.size
        return unit_pfn, unit_order
    # Many records: unit of bit b of word w is pfn = (b_in_slice << order) + start =
    # (b << order) + w_base, with per-word tables (one entry per word, not per bit).
    word_order = np.repeat(order.astype(np.uint8), words_per)
    word_base = np.repeat(start - ((woff * 64) << order), words_per)
    for w0 in range(0, stream.words.size, WALK_WORDS):
        pos = np.flatnonzero(np.unpackbits(stream.words[w0:w0 + WALK_WORDS].view(np.uint8), bitorder="little").view(bool))
        pos += w0 << 6
        word = pos >> 6
        out = unit_pfn[at:at + pos.size]
        if uniform:
            np.left_shift(pos, int(order[0]), out=out)
        else:
            unit_order[at:at + pos.size] = word_order[word]
            np.left_shift(pos, unit_order[at:at + pos.size], out=out)
        out += word_base[word]
        at += pos.size
    return unit_pfn, unit_order


def _free_gaps(memory: PhysicalMemory, unit_start: np.ndarray, unit_end: np.ndarray):
    """The usable pages no unit covers, as maximal ``[start, end)`` pfn runs, sorted: the
    gaps between consecutive units of one usable segment, plus each segment's edges
    (before its first unit, after its last, or all of it when it has none).  O(units)."""
    seg_start, seg_end = intervals.usable(memory)
    first = np.searchsorted(unit_start, seg_start)  # each segment's first unit (units lie inside segments)
    last = np.searchsorted(unit_start, seg_end) - 1  # and its last
    inner = unit_start[1:] > unit_end[:-1]
    cuts = first[(first > 0) & (first < unit_start.size)]
    inner[cuts - 1] = False  # no gap across a segment boundary
    gap_start, gap_end = unit_end[:-1][inner], unit_start[1:][inner]
    has = last >= first
    edge_start = np.concatenate([seg_start, np.where(has, unit_end[np.maximum(last, 0)] if unit_end.size else 0, seg_end)])
    edge_end = np.concatenate([np.where(has, unit_start[np.minimum(first, unit_start.size - 1)] if unit_start.size else 0,
                                        seg_end), seg_end])
    edge = np.flatnonzero(edge_end > edge_start)
    edge = edge[np.argsort(edge_start[edge], kind="stable")]
    edge_start, edge_end = edge_start[edge], edge_end[edge]
    where = np.searchsorted(gap_start, edge_start)
    return np.insert(gap_start, where, edge_start), np.insert(gap_end, where, edge_end)


@dataclass(frozen=True)
class _Records:
    """The stream's records as field arrays (int64, one entry per record): ``op``,
    ``kind``, ``order``, ``start`` pfn, ``count`` (``arg``) and the ``end`` pfn of the
    pages each one covers (a BITMAP's slice, a UNIT's unit and free pages)."""

    stream: _Stream
    op: np.ndarray
    kind: np.ndarray
    order: np.ndarray
    start: np.ndarray
    count: np.ndarray
    end: np.ndarray

    def check(self, bad: np.ndarray, field: str, message: str) -> None:
        """KHOFormatError at the first record flagged in ``bad``.  O(records)."""
        if bad.any():
            i = int(np.argmax(bad))
            name = OP_NAMES.get(int(self.op[i]), f"op {int(self.op[i])}")
            raise KHOFormatError(f"instructions.record.{field}", f"record {i} ({name}): {message}", self.stream.record_location(i))


def _read_records(memory: PhysicalMemory, stream: _Stream) -> _Records:
    """Unpack the records' fields and check each record on its own: a known op, its kind,
    order and arg in range, a unit or slice aligned to its order.  O(records)."""
    if not stream.nr_records:
        raise KHOFormatError("instructions.header", "the stream has no records", stream.location(0))
    head, arg = stream.records["head"].astype(np.uint64), stream.records["arg"].astype(np.uint64)
    op = (head >> np.uint64(OP_SHIFT)).astype(np.int64)
    kind = ((head >> np.uint64(KIND_SHIFT)) & np.uint64(FIELD_MASK)).astype(np.int64)
    order = ((head >> np.uint64(ORDER_SHIFT)) & np.uint64(FIELD_MASK)).astype(np.int64)
    start = (head & np.uint64(PFN_MASK)).astype(np.int64)
    count = arg.astype(np.int64)
    is_skip, is_unit, is_bitmap = op == OP_SKIP, op == OP_UNIT, op == OP_BITMAP
    keeps = is_unit | is_bitmap
    end = start + np.where(is_bitmap, count << order, count) + np.where(is_unit, np.left_shift(1, order), 0)
    rec = _Records(stream, op, kind, order, start, count, end)
    max_order = memory.geometry.max_order
    rec.check(~((op == OP_FREE) | is_skip | keeps), "op", "unknown operation")
    rec.check((~is_skip & (kind != 0)) | (is_skip & (kind > SKIP_SCRATCH)), "kind", "invalid kind")
    rec.check(~keeps & (order != 0), "order", "must be 0")
    rec.check(keeps & (order > max_order), "order", f"above MAX_PAGE_ORDER {max_order}")
    rec.check(arg > np.uint64(MAX_ARG), "arg", "beyond the pfn space")
    rec.check(~is_unit & (count == 0), "arg", "an empty span")
    rec.check(keeps & ((start & (np.left_shift(1, order) - 1)) != 0), "start", "not aligned to the order")
    rec.check(is_bitmap & (count > (MAX_ARG >> order)), "arg", "slice beyond the pfn space")
    return rec


def _check_tiling(memory: PhysicalMemory, rec: _Records) -> None:
    """The records tile ``[first bank start, last bank end)`` in address order; FREE, UNIT
    and BITMAP spans lie inside one bank outside the scratch areas, hole SKIPs hold no RAM
    and scratch SKIPs lie inside one scratch area.  O(records log (banks + areas))."""
    bank_start, bank_end = intervals.banks(memory, np.int64)
    first, stop = int(bank_start[0]), int(bank_end[-1])
    start, end = rec.start, rec.end
    rec.check(np.concatenate([[start[0] != first], start[1:] != end[:-1]]), "start",
              "does not start where the previous record ends (the records must tile RAM in address order)")
    if end[-1] != stop:
        raise KHOFormatError("instructions.record.arg", f"the last record ends at pfn {int(end[-1]):#x}, RAM at {stop:#x}",
                             rec.stream.record_location(rec.stream.nr_records - 1))
    is_skip = rec.op == OP_SKIP
    rec.check(~is_skip & ~intervals.within(*intervals.usable(memory), start, end), "start",
              "not inside one RAM bank outside the scratch areas")
    rec.check(is_skip & (rec.kind == SKIP_HOLE) & intervals.overlaps(bank_start, bank_end, start, end), "kind", "a hole holds RAM")
    rec.check(is_skip & (rec.kind == SKIP_SCRATCH) & ~intervals.within(*intervals.scratch(memory, np.int64), start, end),
              "kind", "not inside one scratch area")


def _kept_units(rec: _Records) -> tuple[np.ndarray, np.ndarray]:
    """The preserved units ``(pfn int64, order uint8)`` of the UNIT records and the BITMAP
    records' set bits (the bitmap section checked against them), by address.
    O(units log units + bitmap bits)."""
    is_unit = rec.op == OP_UNIT
    bm = np.flatnonzero(rec.op == OP_BITMAP)
    bm_pfn, bm_order = _bitmap_units(rec.stream, rec.start[bm], rec.order[bm], rec.count[bm], bm)
    unit_pfn, unit_order = rec.start[is_unit], rec.order[is_unit]
    if unit_pfn.size and bm_pfn.size:
        unit_pfn = np.concatenate([unit_pfn, bm_pfn])
        sort = np.argsort(unit_pfn, kind="stable")
        unit_pfn, unit_order = unit_pfn[sort], np.concatenate([unit_order, bm_order])[sort]
    elif bm_pfn.size:
        unit_pfn, unit_order = bm_pfn, bm_order
    return unit_pfn, unit_order.astype(np.uint8, copy=False)


def walk(memory: PhysicalMemory, props: Mapping[str, bytes], *, strict: bool = True) -> StreamWalk:
    """Read the stream from ``preserved-memory-map`` and walk it once, vectorized.

    Strict: every record field, the exact tiling of ``[first bank start, last bank end)``,
    FREE/UNIT/BITMAP spans inside one bank and outside scratch, SKIP spans exactly holes
    or inside one scratch area, bitmap word counts and padding, and the stream's pages
    outside scratch and outside preserved units; KHOFormatError names the field and phys.
    ``strict=False`` only lets the stream's own pages lie in scratch or in preserved
    units: the records must tile RAM exactly for the walk to mean anything, so no kernel
    could read them more leniently.  Stages: the chunk list and header (:class:`_Stream`),
    the records (:func:`_read_records`, :func:`_check_tiling`), the kept units
    (:func:`_kept_units`), the free runs between them (:func:`_free_gaps`).
    O(records + bitmap bits) numpy work plus one read per chunk page.
    """
    chunks = read_chunk_list(memory, read_map_pointer(props), WORD.itemsize, CHUNK_MAGIC, "instructions.chunk", strict=strict)
    stream = _Stream(memory, chunks)
    rec = _read_records(memory, stream)
    _check_tiling(memory, rec)
    unit_pfn, unit_order = _kept_units(rec)
    # Every usable page is inside a FREE, UNIT or BITMAP span (checked above), and
    # everything those spans do not keep is free: the free runs are the gaps between units
    # (StreamWalk computes them when asked).
    unit_phys = (unit_pfn << memory.page_shift).view(np.uint64)
    metadata = np.sort(chunks.pages)
    if strict:
        check_metadata_disjoint(memory, metadata, unit_phys, unit_order, "instructions.chunk")
    is_skip = rec.op == OP_SKIP
    return StreamWalk(rec.start[is_skip], rec.end[is_skip], unit_phys, unit_order, metadata,
                      stream.nr_records, stream.nr_words, memory, unit_pfn)


@register
class Instructions(Encoding):
    """The deserialization instruction stream; keeps folio orders."""

    name = "instructions"
    compatible = "kho-instructions"
    keeps_orders = True

    def encode(self, tracker: Tracker, allocator: PageAllocator) -> EncodedMap:
        """Build the stream in one vectorized pass over the tracker's units, then write it
        into a chunk list.  The stream does not depend on where its pages land (they are
        inside FREE ranges), so it is built first and the pages allocated after."""
        memory = tracker.memory
        check_page_size(self.name, self.page_size, memory)
        records, words = build_stream(memory, *tracker.units_array())
        pages = write_chunk_list(memory, allocator, stream_bytes(memory, records, words), WORD.itemsize, CHUNK_MAGIC)
        props = {KHO_FDT_MEMORY_MAP_PROP_NAME: pack_u64(int(pages[0]))}
        return EncodedMap(self.name, self.compatible, props, np.sort(pages), self.page_size)

    def decode(self, memory: PhysicalMemory, props: Mapping[str, bytes], *, strict: bool = True) -> DecodedMap:
        """:func:`walk`, keeping the units."""
        check_page_size(self.name, self.page_size, memory)
        walked = walk(memory, props, strict=strict)
        return DecodedMap(walked.unit_phys, walked.unit_order, exact_orders=True, metadata_pages=walked.metadata_pages)
