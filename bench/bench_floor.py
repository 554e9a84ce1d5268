"""Benchmark (issue 16): every hot stage beside its numpy floor, in one process.

The set: 4,194,304 random order-0 pages (16 GiB preserved) drawn from the page allocator
of a 64 GiB machine with 4 KiB pages and the default scratch areas.  For each stage, kho's
code and a *floor* (the shortest numpy, or for single calls plain Python, version of the
same work written here) run alternately, ``--runs`` times each; the table gives the
medians of CPU and wall seconds and the ratio kho / floor (CPU).

Stages and their floors:

* ``preserve_many`` (6.16 :class:`~kho.currentkernel.tracker.Tracker` and 7.x
  :class:`~kho.currentkernel.radix_tracker.RadixTracker`): floor = range check, a bool per
  RAM page set at the units, one count for duplicates, ``packbits`` into page bitmaps
  (and for the radix tracker one page write per leaf).
* ``preserve_folio`` (calls/s over 200,000 pages): floor = a dict of ``bytearray``
  bitmaps, one bit test and set per call.
* kho-v1 / kho-v2 decode: floor = read the bitmap pages, ``unpackbits``,
  ``flatnonzero``, add the bitmaps' first page.
* free lists, instruction path: the next kernel's ``deserialize`` + ``free_lists`` stages
  on the instruction stream; floor = read the stream's bitmap pages, invert them into the
  free-page mask, apply scratch and memblock's few reservations, the page states
  (preserved, reserved, free) and the heads' ``private``, cut the maximal aligned blocks
  per order.
* free lists, memblock path (kho-v2): the same stages on the memblock path; floor = the
  decode floor, one adjacent-merge pass into reserved regions, the free-page mask from the
  regions, the page states, ``private``, the blocks.

Run: ``python bench/bench_floor.py [--runs 5] [--ram 64G] [--preserve 16G]``; writes
``bench/results/floor.{json,md}`` (``--no-write`` to only print).

``--scale`` (default 1 TiB of RAM, 256 GiB of random order-0 pages): generate + preserve +
encode + decode + next-kernel boot, once per path in its own process (instruction path:
the instruction stream booted on its own path; memblock path: kho-v2 booted on the
memblock path), wall seconds per stage and peak RSS; writes ``floor_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

from kho.abi.kexec_handover import KHO_FDT_MEMORY_MAP_PROP_NAME, KHO_PAGE_INFO_DTYPE, KHO_PAGE_MAGIC
from kho.benchmark.environment import machine_info
from kho.benchmark.scale import peak_rss
from kho.currentkernel.machine import Machine
from kho.currentkernel.radix_tracker import RadixTracker
from kho.currentkernel.tracker import Tracker
from kho.encodings import get_encoding
from kho.handover.outgoing import KHO
from kho.nextkernel.boot import boot
from kho.nextkernel.memblock import MemblockFlag
from kho.nextkernel.memmap import PRESERVED, RESERVED
from kho.sizes import parse_size
from kho.simulation.preserved_sets import generate

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
FOLIO_CALLS = 200_000


def timed(fn):
    """``(CPU seconds, wall seconds, result)`` of ``fn()``."""
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, out


def side_by_side(kho_fn, floor_fn, runs: int) -> dict:
    """Medians of ``runs`` alternating runs of both functions."""
    k, f = [], []
    for _ in range(runs):
        k.append(timed(kho_fn)[:2])
        f.append(timed(floor_fn)[:2])
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    out = {"kho_cpu_s": med(k, 0), "kho_wall_s": med(k, 1), "floor_cpu_s": med(f, 0), "floor_wall_s": med(f, 1)}
    out["ratio_cpu"] = out["kho_cpu_s"] / out["floor_cpu_s"]
    out["ratio_wall"] = out["kho_wall_s"] / out["floor_wall_s"]
    return out


# -- floors -------------------------------------------------------------------------------
def floor_preserve_many(phys: np.ndarray, nr_pages: int, page_shift: int, bitmap_bytes: int,
                        scratch: list[tuple[int, int]] = ()) -> dict:
    """Order-0 units into page bitmaps: ``{bitmap index: packed bytes}``.  Checks: in RAM,
    aligned, and (one count) neither twice nor in a scratch area (pfn ranges ``scratch``),
    whose pages are set in the same mask first."""
    if phys.size and int(phys.max()) >> page_shift >= nr_pages:
        raise ValueError("outside RAM")
    if np.any(phys & np.uint64((1 << page_shift) - 1)):
        raise ValueError("misaligned")
    mask = np.zeros(nr_pages, dtype=bool)
    for s, e in scratch:
        mask[s:e] = True
    before = np.count_nonzero(mask) if scratch else 0
    mask[(phys >> np.uint64(page_shift)).view(np.int64)] = True
    if np.count_nonzero(mask) != phys.size + before:
        raise ValueError("duplicate or in scratch")
    for s, e in scratch:
        mask[s:e] = False
    packed = np.packbits(mask, bitorder="little").reshape(-1, bitmap_bytes)
    return {int(i): packed[i] for i in np.flatnonzero(packed.any(axis=1)).tolist()}


def floor_radix_preserve_many(memory, phys: np.ndarray, nr_pages: int, scratch) -> int:
    """The preserve_many floor plus one page write per leaf."""
    leaves = floor_preserve_many(phys, nr_pages, memory.page_shift, memory.page_size, scratch)
    for index, bits in leaves.items():
        memory.write(index << memory.page_shift, bits)  # any page: the cost of a write
    return len(leaves)


def floor_folio_calls(pages: list[int], page_shift: int, bits_log2: int) -> None:
    """Minimal pure Python: a dict of bytearray bitmaps."""
    maps: dict[int, bytearray] = {}
    mask = (1 << bits_log2) - 1
    nbytes = (1 << bits_log2) >> 3
    for phys in pages:
        key = phys >> page_shift
        bm = maps.get(key >> bits_log2)
        if bm is None:
            bm = maps[key >> bits_log2] = bytearray(nbytes)
        bit = key & mask
        byte, m = bm[bit >> 3], 1 << (bit & 7)
        if byte & m:
            raise ValueError("EEXIST")
        bm[bit >> 3] = byte | m


def read_bitmaps(memory, pages: np.ndarray) -> np.ndarray:
    return np.frombuffer(b"".join(memory.read(int(p), memory.page_size) for p in pages.tolist()), dtype=np.uint8)


def floor_decode(memory, leaf_phys: np.ndarray, leaf_first_pfn: np.ndarray) -> np.ndarray:
    """Page bitmaps (one per leaf, covering pfns from ``leaf_first_pfn``) into unit phys."""
    bits = memory.page_size * 8
    pos = np.flatnonzero(np.unpackbits(read_bitmaps(memory, leaf_phys), bitorder="little").view(bool))
    first = leaf_first_pfn.astype(np.int64)
    if (np.diff(first) == bits).all():  # consecutive bitmaps: one offset
        pfn = pos + first[0]
    else:
        pfn = first[pos >> (bits.bit_length() - 1)] + (pos & (bits - 1))
    return pfn.view(np.uint64) << np.uint64(memory.page_shift)


def floor_blocks(free: np.ndarray, max_order: int) -> list[np.ndarray]:
    """Maximal aligned free blocks per order of a page mask starting at pfn 0 (whole
    max-order blocks long): one halving pass per order."""
    out, level = [], free
    for order in range(max_order):
        pairs = level.view(np.uint16)
        out.append(np.flatnonzero((pairs & ~pairs.byteswap()).view(bool)).astype(np.uint64) << np.uint64(order))
        level = pairs == 0x0101
    out.append(np.flatnonzero(level).astype(np.uint64) << np.uint64(max_order))
    return out


def floor_private(pfn: np.ndarray) -> tuple[np.ndarray, int]:
    """``private`` of the order-0 heads, kept as kho keeps it: the heads and one word."""
    head = np.zeros(1, KHO_PAGE_INFO_DTYPE)
    head["magic"] = KHO_PAGE_MAGIC
    return pfn, int(head.view(np.uint64)[0])


def floor_instruction_path(memory, leaf_phys, leaf_first_pfn, scratch, reserved, max_order):
    """Stream bitmaps -> free mask (inverted words) -> reservations -> private -> blocks."""
    n = memory.nr_pages
    bits = memory.page_size * 8
    words = np.full(-(-n // bits) * (bits // 8), 0, dtype=np.uint8)
    maps = read_bitmaps(memory, leaf_phys).reshape(-1, bits // 8)
    rows = (leaf_first_pfn // bits).astype(np.int64)
    words.reshape(-1, bits // 8)[rows] = maps
    preserved = np.unpackbits(words, bitorder="little").view(bool)[:n]
    info = floor_private(np.flatnonzero(preserved))  # order-0 units: every set bit is a head
    state = preserved.view(np.uint8) * np.uint8(PRESERVED)  # the memory map: preserved, else free
    free = np.logical_not(preserved, out=preserved)
    for s, e in scratch:
        free[s:e] = True
    for s, e in reserved:
        free[s:e] = False
        state[s:e] = RESERVED
    return info, state, floor_blocks(free, max_order)


def floor_memblock_path(memory, leaf_phys, leaf_first_pfn, reserved, max_order):
    """Decode floor -> adjacent-merge regions -> free mask -> private -> blocks."""
    n = memory.nr_pages
    pfn = floor_decode(memory, leaf_phys, leaf_first_pfn) >> np.uint64(memory.page_shift)
    pfn = pfn.view(np.int64)
    starts = np.flatnonzero(np.concatenate([[True], pfn[1:] != pfn[:-1] + 1]))
    ends = np.concatenate([starts[1:], [pfn.size]])
    reg_s, reg_e = pfn[starts], pfn[ends - 1] + 1
    toggle = np.zeros(n + 1, dtype=np.int8)
    toggle[reg_s] += 1
    toggle[reg_e] -= 1
    free = np.cumsum(toggle[:-1], dtype=np.int8) == 0
    state = np.empty(n, dtype=np.uint8)  # the memory map: free, reserved or preserved
    np.multiply(np.logical_not(free), np.uint8(RESERVED), out=state)
    state[pfn] = PRESERVED
    for s, e in reserved:
        free[s:e] = False
        state[s:e] = RESERVED
    info = floor_private(pfn)
    return info, state, floor_blocks(free, max_order)


def radix_leaves(memory, handover) -> np.ndarray:
    """The leaf pages of a kho-v2 map in key order (setup, not timed)."""
    nodes = [int.from_bytes(handover.encoded.props[KHO_FDT_MEMORY_MAP_PROP_NAME], "little")]
    for _ in range(5):
        nxt = []
        for node in nodes:
            table = np.frombuffer(memory.read(node, memory.page_size), dtype="<u8")
            nxt += table[table != 0].tolist()
        nodes = nxt
    return np.array(nodes, dtype=np.uint64)


# -- the run ------------------------------------------------------------------------------
def run(ram: int, preserve: int, runs: int, seed: int) -> dict:
    machine = Machine.boot(ram, seed=seed)
    memory, allocator = machine.memory, machine.allocator
    shift, nr_pages, max_order = memory.page_shift, memory.nr_pages, memory.geometry.max_order
    phys, order = generate("random", allocator, preserve, seed=seed)
    assert not order.any()
    stages: dict[str, dict] = {}
    scratch = [(a.addr >> shift, (a.addr + a.size) >> shift) for a in memory.scratch]

    stages["preserve_many"] = side_by_side(lambda: Tracker(memory).preserve_many(phys, 0),
                                           lambda: floor_preserve_many(phys, nr_pages, shift, memory.page_size, scratch), runs)

    def radix_many():
        tracker = RadixTracker(memory, allocator)
        tracker.preserve_many(phys, 0)
        return tracker

    radix = []
    stages["radix preserve_many"] = side_by_side(lambda: radix.append(radix_many()),
                                                 lambda: floor_radix_preserve_many(memory, phys, nr_pages, scratch), runs)
    for tracker in radix:
        for page in tracker.radix_pages().tolist():
            memory.discard(page, memory.page_size)
            allocator.free_pages(page, 0)
    del radix

    calls = phys[:FOLIO_CALLS].tolist()

    def folio(make):
        tracker = make()
        def go():
            for p in calls:
                tracker.preserve_folio(p, 0)
        return go

    for name, make in (("preserve_folio", lambda: Tracker(memory)), ("radix preserve_folio", lambda: RadixTracker(memory, allocator))):
        k, f = [], []
        made = []
        for _ in range(runs):
            tracker_go = folio(lambda: made.append(make()) or made[-1])
            k.append(timed(tracker_go)[:2])
            f.append(timed(lambda: floor_folio_calls(calls, shift, shift + 3))[:2])
        for t in made:
            if isinstance(t, RadixTracker):
                for page in t.radix_pages().tolist():
                    memory.discard(page, memory.page_size)
                    allocator.free_pages(page, 0)
        kc, kw = statistics.median(x[0] for x in k), statistics.median(x[1] for x in k)
        fc, fw = statistics.median(x[0] for x in f), statistics.median(x[1] for x in f)
        stages[name] = {"kho_calls_per_s": FOLIO_CALLS / kw, "kho_calls_per_cpu_s": FOLIO_CALLS / kc,
                        "floor_calls_per_s": FOLIO_CALLS / fw, "floor_calls_per_cpu_s": FOLIO_CALLS / fc,
                        "kho_cpu_s": kc, "kho_wall_s": kw, "floor_cpu_s": fc, "floor_wall_s": fw,
                        "ratio_cpu": kc / fc, "ratio_wall": kw / fw}
        del made

    tracker = Tracker(memory)
    tracker.preserve_many(phys, 0)
    tracker.finalize()
    first_pfn = lambda t: np.array([i * memory.page_size * 8 for _, i, _ in t.bitmaps()], dtype=np.uint64)  # noqa: E731
    leaf_first = first_pfn(tracker)
    handovers = {}
    for name in ("kho-v1", "kho-v2", "instructions"):
        kho = KHO(memory, allocator, name)
        kho.tracker = tracker
        handovers[name] = kho.finalize()
    v2_leaves = radix_leaves(memory, handovers["kho-v2"])
    for name in ("kho-v1", "kho-v2"):
        h = handovers[name]
        reader = get_encoding(name, memory.page_size, **h.options)
        leaves = v2_leaves
        stages[f"{name} decode"] = side_by_side(lambda: reader.decode(memory, h.encoded.props),
                                                lambda: floor_decode(memory, leaves, leaf_first), runs)
        decoded = reader.decode(memory, h.encoded.props)
        assert np.array_equal(decoded.phys, phys) and np.array_equal(floor_decode(memory, leaves, leaf_first), phys)

    ps = memory.page_size

    def own_reservations(nk) -> list[tuple[int, int]]:
        """memblock's own reservations (pfn ranges): every reserved region but the preserved units."""
        regions = nk.memblock.reserved.regions
        own = regions[(regions["flags"] & MemblockFlag.RSRV_NOINIT) == 0]
        return [(s // ps, -(-(s + n) // ps)) for s, n in zip(own["base"].tolist(), own["size"].tolist())]

    for label, name, path in (("free lists, instruction path", "instructions", "instructions"),
                              ("free lists, memblock path (kho-v2)", "kho-v2", "memblock")):
        h = handovers[name]
        dtb = h.boot_dtb()
        probe = boot(memory, dtb, path, encoding_options=h.options)
        reserved = own_reservations(probe)
        free_pages = probe.allocator.nr_free_pages + probe.allocator.nr_free_scratch_pages
        del probe
        if path == "instructions":
            floor = lambda: floor_instruction_path(memory, v2_leaves, leaf_first, scratch, reserved, max_order)  # noqa: E731
        else:
            floor = lambda: floor_memblock_path(memory, v2_leaves, leaf_first, reserved, max_order)  # noqa: E731
        k, f = [], []
        for _ in range(runs):
            gc.collect()
            nk = boot(memory, dtb, path, encoding_options=h.options)
            k.append((nk.cpu_timings["deserialize"] + nk.cpu_timings["free_lists"],
                      nk.timings["deserialize"] + nk.timings["free_lists"]))
            del nk
            f.append(timed(floor)[:2])
        _, _, blocks = floor()
        assert sum(int(b.size) << o for o, b in enumerate(blocks)) == free_pages, label
        med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
        stages[label] = {"kho_cpu_s": med(k, 0), "kho_wall_s": med(k, 1), "floor_cpu_s": med(f, 0),
                         "floor_wall_s": med(f, 1)}
        stages[label]["ratio_cpu"] = stages[label]["kho_cpu_s"] / stages[label]["floor_cpu_s"]
        stages[label]["ratio_wall"] = stages[label]["kho_wall_s"] / stages[label]["floor_wall_s"]
    return {"ram_bytes": ram, "preserved_bytes": preserve, "units": int(phys.size), "runs": runs, "seed": seed,
            "stages": stages}


# -- the 1 TiB end-to-end run ------------------------------------------------------------------
SCALE_PATHS = {"instruction": ("instructions", "instructions"), "memblock": ("kho-v2", "memblock")}


def scale_child(path: str, ram: int, preserve: int, seed: int) -> dict:
    """generate + preserve + encode + decode + boot on one path, in this process: the wall
    seconds of each stage, the peak RSS after it, the free pages the boot left."""
    encoding, boot_path = SCALE_PATHS[path]
    stages = []
    started = time.perf_counter()
    last = [started]

    def done(name):
        now = time.perf_counter()
        stages.append({"stage": name, "wall_s": now - last[0], "peak_rss_bytes": peak_rss()})
        last[0] = now

    machine = Machine.boot(ram, seed=seed)
    phys, order = generate("random", machine.allocator, preserve, seed=seed)
    done("generate")
    kho = KHO(machine.memory, machine.allocator, encoding)
    kho.tracker.preserve_many(phys, order)
    done("preserve")
    handover = kho.finalize()
    done("encode")
    decoded = get_encoding(encoding, machine.memory.page_size, **handover.options).decode(machine.memory,
                                                                                           handover.encoded.props)
    assert np.array_equal(decoded.phys, phys)
    del decoded, phys, order
    done("decode")
    nk = boot(machine.memory, handover.boot_dtb(), boot_path, encoding_options=handover.options)
    free = nk.allocator.nr_free_pages + nk.allocator.nr_free_scratch_pages
    done("boot")
    return {"path": path, "encoding": encoding, "boot_path": boot_path, "ram_bytes": ram, "preserved_bytes": preserve,
            "units": preserve // machine.memory.page_size, "stages": stages,
            "wall_s": time.perf_counter() - started, "peak_rss_bytes": peak_rss(), "free_pages": free,
            "boot_stage_s": nk.timings, "memblock_reserved_regions": len(nk.memblock.reserved)}


def run_scale(ram: int, preserve: int, seed: int) -> list[dict]:
    """:func:`scale_child` for each path in its own process (its own peak RSS)."""
    out = []
    for path in SCALE_PATHS:
        proc = subprocess.run([sys.executable, __file__, "--scale-child", path, "--ram", str(ram), "--preserve",
                               str(preserve), "--seed", str(seed)], capture_output=True, text=True)
        if proc.returncode:
            out.append({"path": path, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            out.append(json.loads(proc.stdout))
    return out


def scale_markdown(runs: list[dict]) -> str:
    lines = ["| path | " + " | ".join(s["stage"] for s in runs[0]["stages"]) + " | total wall | peak RSS |",
             "|---|" + "---:|" * (len(runs[0]["stages"]) + 2)]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['path']} | {r['error']} |")
            continue
        cells = " | ".join(f"{s['wall_s']:.2f} s" for s in r["stages"])
        lines.append(f"| {r['path']} ({r['encoding']}, {r['boot_path']} boot) | {cells} | {r['wall_s']:.1f} s | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    lines = [f"{result['units']:,} random order-0 pages ({result['preserved_bytes'] >> 30} GiB preserved in "
             f"{result['ram_bytes'] >> 30} GiB, 4 KiB pages); median of {result['runs']}, CPU seconds (wall in brackets)",
             "", "| stage | kho | numpy floor | kho / floor (CPU) | kho / floor (wall) |", "|---|---:|---:|---:|---:|"]
    for name, s in result["stages"].items():
        if "kho_calls_per_s" in s:
            kho = f"{s['kho_calls_per_cpu_s']:,.0f} calls/s ({s['kho_calls_per_s']:,.0f})"
            floor = f"{s['floor_calls_per_cpu_s']:,.0f} calls/s ({s['floor_calls_per_s']:,.0f})"
        else:
            kho = f"{s['kho_cpu_s']:.3f} s ({s['kho_wall_s']:.3f})"
            floor = f"{s['floor_cpu_s']:.3f} s ({s['floor_wall_s']:.3f})"
        lines.append(f"| `{name}` | {kho} | {floor} | {s['ratio_cpu']:.2f}x | {s['ratio_wall']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram", default="64G")
    parser.add_argument("--preserve", default="16G")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--scale", action="store_true",
                        help="the end-to-end run instead (default 1T RAM, 256G preserved), one process per path")
    parser.add_argument("--scale-child", choices=sorted(SCALE_PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scale_child:
        json.dump(scale_child(args.scale_child, int(args.ram), int(args.preserve), args.seed), sys.stdout)
        return 0
    if args.scale:
        ram = parse_size(args.ram if args.ram != "64G" else "1T")
        preserve = parse_size(args.preserve if args.preserve != "16G" else "256G")
        runs = run_scale(ram, preserve, args.seed)
        result = {"ram_bytes": ram, "preserved_bytes": preserve, "seed": args.seed, "runs": runs, "machine": machine_info()}
        text = scale_markdown(runs)
        name = "floor_scale"
    else:
        result = run(parse_size(args.ram), parse_size(args.preserve), args.runs, args.seed)
        result["machine"] = machine_info()
        text = markdown(result)
        name = "floor"
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
