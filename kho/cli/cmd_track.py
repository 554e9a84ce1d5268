"""``kho track``: preserve random memory in a modelled machine and report the tracker."""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.table import Table

from kho.cli.options import add_machine_options, size_arg
from kho.currentkernel.machine import Machine
from kho.currentkernel.tracker import Tracker
from kho.currentkernel.xarray import XA_NODE_BYTES
from kho.errors import KHOError
from kho.sizes import format_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("track", help="preserve random pages and report the preservation tracker's kernel memory",
                       description="Boot a modelled machine, preserve random folios with the kernel's tracker "
                                   "(per-order bitmaps in XArrays) and report what it costs.")
    add_machine_options(p, ram_default="64G")
    p.add_argument("--preserve-random", type=size_arg, default=None, metavar="SIZE",
                   help="bytes to preserve as random units (default: a quarter of RAM)")
    p.add_argument("--order", type=int, default=0, help="order of every unit (default 0)")
    p.add_argument("--bitmap-bytes", choices=["512", "page"], default="page",
                   help="bitmap size: 512 (Linux 6.16) or page (later kernels; default)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    machine = Machine.boot(args.ram, args.page_size, args.kho_scratch, args.seed)
    max_order = machine.memory.geometry.max_order
    if not 0 <= args.order <= max_order:
        raise KHOError("EINVAL", f"--order {args.order} is outside 0..{max_order} (MAX_PAGE_ORDER)")
    preserve = args.preserve_random if args.preserve_random is not None else args.ram // 4
    unit = args.page_size << args.order
    if preserve % unit:
        raise KHOError("EINVAL", f"--preserve-random {preserve} is not a multiple of the unit size {unit}")
    tracker = Tracker(machine.memory, 4096 if args.bitmap_bytes == "512" else "page")
    start = time.perf_counter()
    phys = machine.allocator.alloc_many(preserve // unit, args.order)
    allocated = time.perf_counter()
    tracker.preserve_many(phys, args.order)
    done = time.perf_counter()
    mem = tracker.kernel_memory()
    report = {
        "ram_bytes": machine.memory.ram_size,
        "page_size": args.page_size,
        "scratch": [{"addr": a.addr, "size": a.size, "kind": a.kind} for a in machine.memory.scratch],
        "units": len(tracker),
        "preserved_pages": tracker.nr_pages,
        "preserve_bits": tracker.preserve_bits,
        "bitmaps": mem.nr_bitmaps,
        "bitmap_bytes": mem.bitmaps,
        "xarray_nodes": mem.nr_xarray_nodes,
        "xarray_bytes": mem.xarray_nodes,
        "tracker_bytes": mem.total,
        "allocate_s": allocated - start,
        "preserve_s": done - allocated,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    table = Table(title=f"KHO tracker: {report['units']:,} units of order {args.order} in {format_size(args.ram)}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for area in machine.memory.scratch:
        table.add_row(f"scratch {area.kind}", f"{area.addr:#x} + {format_size(area.size)}")
    table.add_row("preserved pages", f"{tracker.nr_pages:,}")
    table.add_row(f"bitmaps ({tracker.preserve_bits} bits)", f"{mem.nr_bitmaps:,} = {format_size(mem.bitmaps)}")
    table.add_row(f"XArray nodes ({XA_NODE_BYTES} B)", f"{mem.nr_xarray_nodes:,} = {format_size(mem.xarray_nodes)}")
    table.add_row("tracker kernel memory", format_size(mem.total))
    table.add_row("preserve_many", f"{report['preserve_s']:.3f} s")
    Console().print(table)
    return 0
