"""Benchmark of the preservation tracker (issue: foundation).

Measures, on a 64 GiB machine with 4 KiB pages and no scratch (so the set spans all of
RAM as in the design discussion):
- ``preserve_many`` of 4,194,304 random order-0 pages (16 GiB preserved): seconds;
- single ``preserve_folio`` calls per second (200,000 random pages);
- the modelled kernel memory of that set (page-sized bitmaps + XArray nodes).

Run: ``python bench/bench_tracker.py [--json]``.  Prints the median of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from kho.currentkernel.tracker import Tracker
from kho.memory.physical import PhysicalMemory

RAM = 64 << 30
UNITS = 4 << 20
FOLIO_CALLS = 200_000


def random_pages(seed: int, count: int, ram: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(ram >> 12, size=count, replace=False).astype(np.uint64) << np.uint64(12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    memory = PhysicalMemory.single_bank(RAM)
    phys = random_pages(1, UNITS, RAM)
    many, folio = [], []
    for _ in range(args.runs):
        tracker = Tracker(memory)
        start = time.perf_counter()
        tracker.preserve_many(phys, 0)
        many.append(time.perf_counter() - start)
        single = Tracker(memory)
        calls = phys[:FOLIO_CALLS].tolist()
        start = time.perf_counter()
        for p in calls:
            single.preserve_folio(p, 0)
        folio.append(FOLIO_CALLS / (time.perf_counter() - start))
    mem = tracker.kernel_memory()
    result = {
        "ram_bytes": RAM, "units": UNITS,
        "preserve_many_s": statistics.median(many),
        "preserve_folio_per_s": statistics.median(folio),
        "bitmaps": mem.nr_bitmaps, "bitmap_bytes": mem.bitmaps,
        "xarray_nodes": mem.nr_xarray_nodes, "xarray_bytes": mem.xarray_nodes,
        "tracker_bytes": mem.total,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"preserve_many of {UNITS:,} random order-0 pages in 64 GiB: {result['preserve_many_s']:.3f} s (target <= 1 s)")
        print(f"preserve_folio: {result['preserve_folio_per_s']:,.0f} calls/s (target >= 200,000)")
        print(f"tracker memory: {mem.nr_bitmaps} bitmaps = {mem.bitmaps:,} B + {mem.nr_xarray_nodes} XArray nodes = "
              f"{mem.xarray_nodes:,} B; total {mem.total:,} B")


if __name__ == "__main__":
    main()
