"""Benchmark: the next kernel's boot after a KHO kexec, memblock path vs instruction path.

64 GiB of RAM, 16 GiB of random order-0 pages preserved (4,194,304 units), the map
written as the kernel's kho-v2 radix tree and as kho's instruction stream.  For each
handover the next kernel boots with each path it can read, and the stage times are
reported: ``deserialize`` (decode + one memblock_reserve per unit, or the stream walk)
and ``free_lists`` (memory minus reservations, or the stream's free runs, through the
kernel's greedy split into free_area[order]) make the "build the free lists" figure.

Usage: python bench/bench_boot.py [--ram 64G] [--preserve 16G] [--repeat 3] [--json]
Target: the instruction path builds the free lists in <= 1 s and faster than memblock.
Times are the best of ``--repeat`` boots (wall clock; process CPU time alongside, as the
host may be shared).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from kho.currentkernel.machine import Machine
from kho.handover.outgoing import KHO
from kho.nextkernel.boot import boot
from kho.sizes import parse_size

CASES = (("kho-v2", "memblock"), ("instructions", "memblock"), ("instructions", "instructions"))


def run_case(ram: int, preserve: int, encoding: str, paths: list[str], repeat: int, seed: int) -> list[dict]:
    machine = Machine.boot(ram, seed=seed)
    kho = KHO(machine.memory, machine.allocator, encoding)
    started = time.perf_counter()
    kho.tracker.preserve_many(machine.allocator.alloc_many(preserve >> 12, 0), 0)
    handover = kho.finalize()
    setup = time.perf_counter() - started
    dtb = handover.boot_dtb()
    out = []
    for path in paths:
        best = None
        for _ in range(repeat):
            nk = boot(machine.memory, dtb, path, encoding_options=handover.options, seed=seed)
            t, cpu = nk.timings, nk.cpu_timings
            build = t["deserialize"] + t["free_lists"]
            if best is None or build < best["build_s"]:
                report = nk.report()
                best = {"encoding": encoding, "path": path, "build_s": build, "boot_s": sum(t.values()),
                        "build_cpu_s": cpu["deserialize"] + cpu["free_lists"],
                        "timings_s": t, "cpu_s": cpu, "free_pages": report["free_pages"] + report["free_scratch_pages"],
                        "free_blocks": sum(sum(v) for v in report["free_blocks"].values()),
                        "preserved_units": report["preserved_units"],
                        "memblock_reserve_calls": report["memblock_reserve_calls"],
                        "memblock_reserved_regions": report["memblock_reserved_regions"],
                        "free_lists": [a.copy() for a in nk.allocator.free_lists()]}
            del nk
        best["setup_s"] = setup
        out.append(best)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram", default="64G")
    parser.add_argument("--preserve", default="16G")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    ram, preserve = parse_size(args.ram), parse_size(args.preserve)
    results = []
    for encoding in dict.fromkeys(e for e, _ in CASES):
        paths = [p for e, p in CASES if e == encoding]
        results += run_case(ram, preserve, encoding, paths, args.repeat, args.seed)
    by = {(r["encoding"], r["path"]): r for r in results}
    same = all(np.array_equal(a, b) for a, b in zip(by[("instructions", "memblock")]["free_lists"],
                                                     by[("instructions", "instructions")]["free_lists"]))
    for r in results:
        del r["free_lists"]
    mb, ins = by[("instructions", "memblock")]["build_s"], by[("instructions", "instructions")]["build_s"]
    summary = {"ram": ram, "preserved": preserve, "identical_free_lists": same,
               "memblock_over_instructions": mb / ins, "instruction_path_within_1s": ins <= 1.0, "results": results}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{ram >> 30} GiB RAM, {preserve >> 30} GiB of random order-0 pages preserved "
              f"({preserve >> 12:,} units); best of {args.repeat}")
        print(f"{'encoding':<14}{'path':<14}{'deserialize':>12}{'free_lists':>12}{'build':>9}{'(cpu)':>9}{'boot':>9}"
              f"{'reserve calls':>15}{'rsv regions':>13}{'free blocks':>13}")
        for r in results:
            t = r["timings_s"]
            print(f"{r['encoding']:<14}{r['path']:<14}{t['deserialize']:>11.3f}s{t['free_lists']:>11.3f}s"
                  f"{r['build_s']:>8.3f}s{r['build_cpu_s']:>8.3f}s{r['boot_s']:>8.3f}s{r['memblock_reserve_calls']:>15,}"
                  f"{r['memblock_reserved_regions']:>13,}{r['free_blocks']:>13,}")
        print(f"same instruction stream: memblock path / instruction path = {summary['memblock_over_instructions']:.2f}x; "
              f"identical free lists: {same}; instruction path <= 1 s: {summary['instruction_path_within_1s']}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
