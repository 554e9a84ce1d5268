"""``kho serialize``: preserve units in a modelled machine, finalize KHO, write a handover image.

Units come from a file (``PHYS ORDER`` per line, PHYS in hex ``0x...`` or decimal, ``#``
starts a comment; errors name the line) or are drawn at random from the running kernel's
page allocator (``--preserve-random SIZE`` with ``--order N`` or ``mixed``, the kernel
self-test's random orders), so the map's metadata pages never collide with them.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np

from kho.abi.kho_v1 import PRESERVE_BITS_6_16
from kho.abi.versions import DEFAULT_KERNEL, KERNEL_VERSIONS, kernel_version
from kho.benchmark.progress import progress
from kho.cli.options import add_machine_options, add_quiet_option, show_progress, size_arg
from kho.currentkernel.machine import Machine
from kho.currentkernel.tracker import Tracker
from kho.encodings import load_all
from kho.errors import KHOError
from kho.files import read_bounded
from kho.handover.imagefile import save_image
from kho.handover.outgoing import ARCH_ARM64, ARCHES, KHO
from kho.simulation.preserved_sets import generate
from kho.sizes import format_size

#: Largest units file read (1 GiB: some 50M lines).
MAX_UNITS_FILE_BYTES = 1 << 30
#: A units-file line: PHYS (hex with 0x, or decimal) and ORDER (decimal).
_UNIT_LINE = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)\s+([0-9]+)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serialize", help="preserve memory, hand over KHO and write a handover image",
                       description="Boot a modelled machine, preserve the given or random units with the chosen "
                                   "kernel's KHO (Linux 7.1 and later: the live radix tree; before: the tracker and a "
                                   "map written at finalize), hand over (KHO FDT, scratch array) and save the image.")
    add_machine_options(p)
    p.add_argument("--kernel", default=DEFAULT_KERNEL, choices=[v.version for v in KERNEL_VERSIONS], metavar="VERSION",
                   help=f"the Linux version whose KHO writes the handover (default {DEFAULT_KERNEL}; "
                        f"{', '.join(v.version for v in KERNEL_VERSIONS)})")
    p.add_argument("--arch", choices=ARCHES, default=ARCH_ARM64,
                   help="the next kernel's architecture: arm64 (a boot DTB's /chosen; default) or x86_64 "
                        "(boot_params with a SETUP_KEXEC_KHO setup_data node)")
    p.add_argument("--abi", choices=sorted(load_all()), default=None,
                   help="encoding of the preserved-memory map (default: what --kernel writes; another one is "
                        "written at finalize by kho's encode-at-finalize model)")
    p.add_argument("--bitmap-bytes", choices=["512", "page"], default=None,
                   help="bitmap size of the 6.16-style tracker: 512 (Linux 6.16 .. 6.18) or page (6.19, 7.0); "
                        "default what --kernel uses, else page; kho-v1 records it")
    units = p.add_mutually_exclusive_group(required=True)
    units.add_argument("--units", metavar="FILE", help="file of 'PHYS ORDER' lines ('#' comments)")
    units.add_argument("--preserve-random", type=size_arg, metavar="SIZE", help="bytes to preserve as random units")
    p.add_argument("--order", default="0", metavar="N|mixed",
                   help="order of the random units, or 'mixed' for random orders as the kernel self-test (default 0)")
    p.add_argument("--out", required=True, metavar="IMAGE",
                   help="handover image to write (.kho; replaced atomically: a failed write leaves the old file whole)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_quiet_option(p)
    p.set_defaults(func=run)


def read_units_file(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(phys uint64, order uint8, line number int64)`` of a units file; EINVAL naming the line.
    A regular file of at most :data:`MAX_UNITS_FILE_BYTES` (checked before it is read)."""
    phys, orders, lines = [], [], []
    data = read_bounded(path, MAX_UNITS_FILE_BYTES, "units file").decode("utf-8", errors="replace")
    for number, line in enumerate(data.splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = _UNIT_LINE.fullmatch(text)
        if not match:
            raise KHOError("EINVAL", f"{path} line {number}: expected 'PHYS ORDER' (hex 0x... or decimal), found {text!r}")
        digits = match.group(1)
        value = int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 10)
        order = int(match.group(2))
        if value >= 1 << 64 or order > 255:
            raise KHOError("EINVAL", f"{path} line {number}: {text!r} is out of range")
        phys.append(value)
        orders.append(order)
        lines.append(number)
    if not phys:
        raise KHOError("EINVAL", f"{path}: no units")
    return np.array(phys, dtype=np.uint64), np.array(orders, dtype=np.uint8), np.array(lines, dtype=np.int64)


def preserve_file_units(kho: KHO, machine: Machine, path: str) -> None:
    """Preserve the units of ``path`` and take their pages from the allocator (all or nothing)."""
    phys, orders, lines = read_units_file(path)
    try:
        kho.tracker.preserve_many(phys, orders)
    except KHOError as err:
        # Find the first line that fails on its own or against the lines before it.
        probe = Tracker(machine.memory, getattr(kho.tracker, "preserve_bits", "page"), strict=kho.tracker.strict)
        limit = machine.memory.geometry.max_order
        for p, o, n in zip(phys.tolist(), orders.tolist(), lines.tolist()):
            try:
                probe.preserve_folio(p, min(o, limit) if kho.live else o)  # 7.x takes larger units
            except KHOError as line_err:
                raise KHOError(line_err.errno_name, f"{path} line {n}: {line_err.message}") from None
        raise err
    shift = machine.memory.page_shift
    counts = np.left_shift(1, orders.astype(np.int64))
    unit_of_page = np.repeat(np.arange(phys.size), counts)
    index_in_unit = np.arange(unit_of_page.size) - np.repeat(np.cumsum(counts) - counts, counts)
    pfn = (phys >> np.uint64(shift)).astype(np.int64)[unit_of_page] + index_in_unit
    pages = pfn.astype(np.uint64) << np.uint64(shift)
    claimed = machine.allocator.claim_pages(pages)
    if claimed.size != pages.size:
        for page in claimed.tolist():
            machine.allocator.free_pages(page, 0)
        missing = np.flatnonzero(~np.isin(pages, claimed, assume_unique=True))[0]
        unit = unit_of_page[missing]
        raise KHOError("EINVAL", f"{path} line {lines[unit]}: unit {int(phys[unit]):#x} order {int(orders[unit])} "
                                 f"overlaps memory the running kernel uses itself")


def preserve_random_units(kho: KHO, machine: Machine, size: int, order: str, seed: int) -> None:
    """Draw units from the allocator: ``size`` bytes of ``order`` (an int) or of mixed orders."""
    if order == "mixed":
        phys, orders = generate("mixed", machine.allocator, size, seed)
        kho.tracker.preserve_many(phys, orders)
        return
    if not order.isdigit():
        raise KHOError("EINVAL", f"--order must be a number or 'mixed', not {order!r}")
    order_n = int(order)
    if order_n > machine.memory.geometry.max_order:
        raise KHOError("EINVAL", f"--order {order_n} is above MAX_PAGE_ORDER {machine.memory.geometry.max_order}")
    unit = machine.memory.page_size << order_n
    if size <= 0 or size % unit:
        raise KHOError("EINVAL", f"--preserve-random {size} is not a positive multiple of the unit size {unit}")
    kho.tracker.preserve_many(machine.allocator.alloc_many(size // unit, order_n), order_n)


def run(args) -> int:
    with progress(len(STAGES), show_progress(args)) as step:
        summary, line = _run(args, step)
    print(json.dumps(summary, indent=2) if args.json else line)
    return 0


#: The stages the progress display names, in order.
STAGES = ("boot the machine", "preserve", "finalize", "save the image")


def _run(args, step) -> tuple[dict, str]:
    """Boot, preserve, finalize, save (calling ``step`` as each stage starts); the JSON
    summary and the one-line text summary."""
    start = time.perf_counter()
    step(STAGES[0])
    machine = Machine.boot(args.ram, args.page_size, args.kho_scratch, args.seed)
    booted = time.perf_counter()
    step(STAGES[1])
    options, preserve_bits = {}, None
    if args.bitmap_bytes is not None:
        preserve_bits = PRESERVE_BITS_6_16 if args.bitmap_bytes == "512" else "page"
        if (args.abi or kernel_version(args.kernel).compatible) == "kho-v1":
            options["bitmap_bytes"] = 512 if args.bitmap_bytes == "512" else "page"
    kho = KHO(machine.memory, machine.allocator, args.abi, kernel=args.kernel, arch=args.arch, preserve_bits=preserve_bits,
              **options)
    if args.units is not None:
        preserve_file_units(kho, machine, args.units)
    else:
        preserve_random_units(kho, machine, args.preserve_random, args.order, args.seed)
    preserved = time.perf_counter()
    step(STAGES[2])
    handover = kho.finalize()
    finalized = time.perf_counter()
    step(STAGES[3])
    image_bytes = save_image(args.out, handover)
    saved = time.perf_counter()
    summary = {
        "image": args.out, "image_bytes": image_bytes, "kernel": args.kernel, "arch": handover.arch, "abi": handover.encoding,
        "options": handover.options,
        "ram_bytes": machine.memory.ram_size, "page_size": machine.memory.page_size,
        "units": len(kho.tracker), "preserved_pages": kho.tracker.nr_pages,
        "metadata_pages": int(handover.encoded.metadata_pages.size), "metadata_bytes": handover.encoded.metadata_bytes,
        "fdt_phys": handover.fdt_phys, "fdt_size": handover.fdt_size,
        "boot_s": booted - start, "preserve_s": preserved - booted, "finalize_s": finalized - preserved, "save_s": saved - finalized,
    }
    line = (f"{args.out}: Linux {args.kernel} {handover.encoding} map of {summary['units']:,} units "
            f"({summary['preserved_pages']:,} pages) in {format_size(machine.memory.ram_size)}; metadata "
            f"{summary['metadata_pages']:,} pages ({format_size(summary['metadata_bytes'])}); KHO FDT at "
            f"{handover.fdt_phys:#x}; image {format_size(image_bytes)}")
    return summary, line
