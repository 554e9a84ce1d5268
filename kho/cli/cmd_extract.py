"""``kho extract PATH --out DIR``: a handover as files for dtc, fdtdump, fdtget and hexdump.

From a memory dump, a kho image or a debugfs ``kho/out`` / ``kho/in`` directory:
``fdt.dtb``, ``sub_fdts/<node>.dtb|.bin``, ``scratch.bin`` and ``units.txt``
(:mod:`kho.dumps.extract`).  Prints one line per file written.
"""

from __future__ import annotations

import argparse

from kho.cli.imageio import add_path_options, emit, open_path
from kho.dumps.debugfs import DebugfsHandover
from kho.dumps.extract import extract


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="write a handover's FDT, sub-node blobs, scratch array and units as files",
                       description="Write the KHO FDT (fdt.dtb), every sub-node blob (sub_fdts/), the scratch array "
                                   "(scratch.bin) and the preserved units (units.txt) of a dump, kho image or "
                                   "debugfs kho/out or kho/in directory into DIR.")
    add_path_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write into (created if needed)")
    p.set_defaults(func=run)


def run(args) -> int:
    source = open_path(args)
    if isinstance(source, DebugfsHandover):
        written = extract(source, None, args.out)
        notes = source.notes
    else:
        with source as dump:
            handover = dump.handover(fdt=args.fdt)
            written = extract(handover, dump.memory, args.out)
            notes = handover.notes
    emit([f"{path}\n" for path in written] + [f"note: {n}\n" for n in notes])
    return 0
