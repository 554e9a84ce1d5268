"""Benchmark of every registered encoding on one preserved set (issue: competing encodings).

The set: 4,194,304 random order-0 pages (16 GiB) preserved on a 64 GiB machine booted
with the default ``kho_scratch=200%``, drawn from its page allocator so that metadata
pages never collide with them.  For every encoding: bytes written (metadata pages and
FDT property bytes), encode and decode seconds (median of ``--runs``), whether folio
orders survive, and the numbers of DESIGN.md section 5 to check the sizes against.

It also measures the two framings considered for the instruction stream on the same
records: the packed layout kho uses, and msgpack (one array per record, bitmap words as
``bin``), on this set and on a set of folios of mixed orders where records dominate.

Run: ``python bench/bench_encodings.py [--runs N] [--json] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import msgpack
import numpy as np

from kho.currentkernel.machine import Machine
from kho.currentkernel.tracker import Tracker
from kho.encodings import get_encoding, load_all
from kho.encodings.chunklist import chunk_capacity, read_chunk_list
from kho.encodings.common import read_map_pointer
from kho.encodings.instructions import (
    OP_BITMAP,
    OP_SHIFT,
    RECORD,
    STREAM_HEADER,
    WORD,
    build_stream,
    stream_bytes,
    walk,
)
from kho.encodings.ranges_packed import CHUNK_MAGIC, PACKED_ENTRY
from kho.simulation.preserved_sets import generate

RAM = 64 << 30
PRESERVED = 16 << 30
#: DESIGN.md section 5.
DESIGN_RANGES_BYTES = 48 << 20
DESIGN_PACKED_BUDGET = 512 << 10
TARGET_S = {"maple": 2.0}
DEFAULT_TARGET_S = 0.5


def setup(pattern: str, seed: int):
    machine = Machine.boot(RAM, seed=seed)
    phys, order = generate(pattern, machine.allocator, PRESERVED, seed=seed)
    tracker = Tracker(machine.memory)
    tracker.preserve_many(phys, order)
    tracker.finalize()
    return machine, tracker


def release(machine: Machine, pages: np.ndarray) -> None:
    """Give an encoding's pages back so that repeated runs start from the same state."""
    for page in pages.tolist():
        machine.memory.discard(page, machine.memory.page_size)
        machine.allocator.free_pages(page, 0)


def bench_encoding(name: str, machine: Machine, tracker: Tracker, runs: int) -> dict:
    enc = get_encoding(name, machine.memory.page_size)
    enc_s, dec_s, enc_cpu, dec_cpu = [], [], [], []
    for run in range(runs):
        start, cpu = time.perf_counter(), time.process_time()
        encoded = enc.encode(tracker, machine.allocator)
        enc_s.append(time.perf_counter() - start)
        enc_cpu.append(time.process_time() - cpu)
        start, cpu = time.perf_counter(), time.process_time()
        decoded = get_encoding(name, machine.memory.page_size, **encoded.options).decode(machine.memory, encoded.props)
        dec_s.append(time.perf_counter() - start)
        dec_cpu.append(time.process_time() - cpu)
        if run == 0:
            check = decoded.nr_pages() == tracker.nr_pages
            if enc.keeps_orders:
                phys, order = tracker.units_array()
                check = check and np.array_equal(decoded.phys, phys) and np.array_equal(decoded.order, order)
            if not check:
                raise SystemExit(f"{name}: decoded map differs from the preserved set")
            result = {
                "encoding": name, "keeps_orders": enc.keeps_orders, "metadata_pages": int(encoded.metadata_pages.size),
                "metadata_bytes": encoded.metadata_bytes, "fdt_bytes": encoded.fdt_bytes, "total_bytes": encoded.total_bytes,
                "decoded_units": len(decoded),
            }
            result.update(details(name, encoded, machine))
        if run < runs - 1:
            release(machine, encoded.metadata_pages)
    target = TARGET_S.get(name, DEFAULT_TARGET_S)
    result.update({"encode_s": statistics.median(enc_s), "decode_s": statistics.median(dec_s), "target_s": target,
                   "encode_cpu_s": statistics.median(enc_cpu), "decode_cpu_s": statistics.median(dec_cpu)})
    return result


def details(name: str, encoded, machine: Machine) -> dict:
    """Encoding-specific figures for the size checks."""
    if name == "ranges":
        return {"ranges": encoded.nr_ranges, "fdt_min_bytes": encoded.fdt_min_bytes, "fits_in_fdt_page": encoded.fits_in_fdt_page}
    if name == "ranges-packed":
        chunks = read_chunk_list(machine.memory, read_map_pointer(encoded.props), PACKED_ENTRY.itemsize, CHUNK_MAGIC, "bench")
        entries = int(chunks.counts.sum())
        ps = machine.memory.page_size
        return {"entries": entries, "entry_bytes": entries * PACKED_ENTRY.itemsize,
                "budget_entries": DESIGN_PACKED_BUDGET // ps * chunk_capacity(ps, PACKED_ENTRY.itemsize)}
    if name == "maple":
        return {"height": encoded.height, "nodes": encoded.nr_nodes}
    if name == "instructions":
        walked = walk(machine.memory, encoded.props)
        return {"records": walked.nr_records, "bitmap_words": walked.nr_words, "free_runs": int(walked.free_start_pfn.size)}
    return {}


# -- instruction-stream framing: packed layout vs msgpack ---------------------------------------
def msgpack_frame(records: np.ndarray, words: np.ndarray) -> bytes:
    """The msgpack framing: ``[page_shift, [[op, start, order|kind, arg] | [op, start, order, nbits, bin], ...]]``."""
    head = records["head"].astype(np.uint64)
    op = (head >> np.uint64(OP_SHIFT)).tolist()
    field = ((head >> np.uint64(52)) & np.uint64(0xFF)).tolist()
    start = (head & np.uint64((1 << 52) - 1)).tolist()
    arg = records["arg"].tolist()
    out, cursor = [], 0
    raw = words.astype(WORD).tobytes()
    for o, f, s, a in zip(op, field, start, arg):
        if o == OP_BITMAP:
            n = (a + 63) // 64
            out.append([o, s, f, a, raw[cursor * 8:(cursor + n) * 8]])
            cursor += n
        else:
            out.append([o, s, f, a])
    return msgpack.packb([12, out])


def msgpack_parse(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Back to the record and word arrays the walker works on."""
    _, items = msgpack.unpackb(data, use_list=True)
    records = np.empty(len(items), dtype=RECORD)
    heads, args, chunks = [], [], []
    for item in items:
        heads.append((item[0] << OP_SHIFT) | (item[2] << 52) | item[1])
        args.append(item[3])
        if len(item) == 5:
            chunks.append(item[4])
    records["head"] = np.array(heads, dtype=np.uint64)
    records["arg"] = np.array(args, dtype=np.uint64)
    return records, np.frombuffer(b"".join(chunks), dtype=WORD)


def packed_parse(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    header = np.frombuffer(data[:STREAM_HEADER.itemsize].tobytes(), dtype=STREAM_HEADER)[0]
    body = data[STREAM_HEADER.itemsize:]
    n = int(header["nr_records"]) * RECORD.itemsize
    return body[:n].view(RECORD), body[n:].view(WORD)


def bench_framing(machine: Machine, tracker: Tracker, runs: int, label: str) -> dict:
    records, words = build_stream(machine.memory, *tracker.units_array())
    out = {"set": label, "units": len(tracker), "records": int(records.size), "bitmap_words": int(words.size)}
    for framing, frame, parse in (("packed", lambda: stream_bytes(machine.memory, records, words), packed_parse),
                                  ("msgpack", lambda: msgpack_frame(records, words), msgpack_parse)):
        frame_s, parse_s = [], []
        for _ in range(runs):
            start = time.perf_counter()
            data = frame()
            frame_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            got_records, got_words = parse(data)
            parse_s.append(time.perf_counter() - start)
        assert np.array_equal(got_records["head"], records["head"]) and np.array_equal(got_words, words)
        out[framing] = {"bytes": len(data), "frame_s": statistics.median(frame_s), "parse_s": statistics.median(parse_s)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", nargs="*", help="encodings to run (default: every registered one)")
    args = parser.parse_args()
    registry = load_all()
    names = args.only or sorted(registry)
    unknown = set(names) - set(registry)
    if unknown:
        raise SystemExit(f"unknown encodings: {', '.join(sorted(unknown))}")
    machine, tracker = setup("random", args.seed)
    results = [bench_encoding(name, machine, tracker, args.runs) for name in names]
    framing = [bench_framing(machine, tracker, args.runs, "random order-0, 4,194,304 units")]
    mixed_machine, mixed_tracker = setup("mixed", args.seed)
    framing.append(bench_framing(mixed_machine, mixed_tracker, args.runs, f"mixed orders, {len(mixed_tracker):,} units"))
    if args.json:
        json.dump({"ram_bytes": RAM, "units": len(tracker), "encodings": results, "stream_framing": framing}, sys.stdout, indent=2)
        print()
        return
    print(f"{len(tracker):,} random order-0 units ({PRESERVED >> 30} GiB) in {RAM >> 30} GiB, median of {args.runs} runs")
    print("(seconds: wall clock, and this process's CPU time in brackets, which other load on the machine does not inflate)")
    print(f"{'encoding':15} {'orders':>7} {'metadata B':>13} {'FDT B':>12} {'total B':>13} {'encode s':>16} {'decode s':>16} {'target':>7}")
    for r in results:
        ok = "ok" if max(r["encode_s"], r["decode_s"]) <= r["target_s"] else "SLOW"
        print(f"{r['encoding']:15} {'kept' if r['keeps_orders'] else 'LOST':>7} {r['metadata_bytes']:>13,} {r['fdt_bytes']:>12,} "
              f"{r['total_bytes']:>13,} {r['encode_s']:>7.3f} ({r['encode_cpu_s']:.3f}) {r['decode_s']:>7.3f} ({r['decode_cpu_s']:.3f}) "
              f"{r['target_s']:>5.1f} {ok}")
    by_name = {r["encoding"]: r for r in results}
    if "ranges" in by_name:
        r = by_name["ranges"]
        print(f"ranges: {r['ranges']:,} merged ranges x 16 B = {r['fdt_bytes'] / 2**20:.1f} MiB in the FDT property 'mem' "
              f"(DESIGN section 5: about {DESIGN_RANGES_BYTES >> 20} MiB, 3.1 M ranges); the FDT would be at least "
              f"{r['fdt_min_bytes']:,} B: {'fits' if r['fits_in_fdt_page'] else 'does NOT fit'} the kernel's one-page KHO FDT")
    if "ranges-packed" in by_name:
        r = by_name["ranges-packed"]
        print(f"ranges-packed: {r['entries']:,} entries x 8 B = {r['entry_bytes'] / 2**20:.1f} MiB; 512 KiB of chunks hold "
              f"{r['budget_entries']:,} ranges (DESIGN section 5: 65k, 256 MiB of isolated 4 KiB pages): this set needs "
              f"{r['entries'] / r['budget_entries']:.0f} times that")
    if "maple" in by_name:
        r = by_name["maple"]
        print(f"maple: height {r['height']}, {r['nodes']:,} nodes of 256 B")
    if "instructions" in by_name:
        r = by_name["instructions"]
        print(f"instructions: {r['records']:,} records, {r['bitmap_words']:,} bitmap words, walk yields {r['free_runs']:,} free runs")
    print("instruction-stream framing (same records; frame = serialize, parse = back to record and word arrays):")
    for f in framing:
        print(f"  {f['set']}: {f['records']:,} records, {f['bitmap_words']:,} words")
        for framing_name in ("packed", "msgpack"):
            x = f[framing_name]
            print(f"    {framing_name:8} {x['bytes']:>12,} B  frame {x['frame_s']:.4f} s  parse {x['parse_s']:.4f} s")


if __name__ == "__main__":
    main()
