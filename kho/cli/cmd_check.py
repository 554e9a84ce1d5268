"""``kho check PATH``: the lint to run before a live update, on a memory dump or a kho image.

Finds the handover (:mod:`kho.dumps`) and checks that everything it references is preserved
(:mod:`kho.dumps.check`).  Exit status: 0 clean, 1 findings, 3 unreadable (one ``kho:``
line).  ``--json``: ``ok``, ``findings`` (``kind``, ``phys``, ``size``, ``message``),
``unreferenced``, ``notes`` and the dump's ``source``.
"""

from __future__ import annotations

import argparse
import json

from kho.cli.imageio import emit
from kho.cli.options import page_size_arg
from kho.dumps import open_dump
from kho.dumps.check import check_dump
from kho.dumps.debugfs import DebugfsHandover
from kho.dumps.open import parse_ranges
from kho.errors import KHOError

#: Exit status when the check found problems.
EXIT_FINDINGS = 1
#: Unreferenced units printed in the text report (all of them with --json).
SHOWN_UNREFERENCED = 16


def address_arg(text: str) -> int:
    """argparse type: a physical address (``0x...`` or decimal)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address") from None


def ranges_arg(text: str) -> list[tuple[int, int]]:
    """argparse type: RAM ranges (see :func:`~kho.dumps.open.parse_ranges`)."""
    try:
        return parse_ranges(text)
    except KHOError as err:
        raise argparse.ArgumentTypeError(err.message) from None


def add_dump_options(p: argparse.ArgumentParser) -> None:
    """PATH and the options of opening a dump, shared with ``kho extract``."""
    p.add_argument("path", metavar="PATH", help="a raw or zstd-compressed raw memory dump, an ELF core "
                                                "(QEMU dump-guest-memory, kdump vmcore) or a kho image")
    p.add_argument("--fdt", type=address_arg, metavar="ADDR", help="the KHO FDT's physical address, when several decode")
    p.add_argument("--base", type=address_arg, metavar="ADDR", help="physical address of a raw dump's first byte (default 0)")
    p.add_argument("--ram", type=ranges_arg, metavar="RANGES",
                   help="RAM as START-END (inclusive, as /proc/iomem) or START+SIZE, comma-separated "
                        "(default: what the dump covers)")
    p.add_argument("--page-size", type=page_size_arg, default=4096, help="the dumped kernel's page size (default 4K)")


def open_args(args):
    """The dump the options name (KHOError for a debugfs directory: no memory to read)."""
    dump = open_dump(args.path, base=args.base, ram=args.ram, page_size=args.page_size)
    if isinstance(dump, DebugfsHandover):
        raise KHOError("EINVAL", f"{args.path}: a debugfs directory holds no memory map to check (kho extract reads it)")
    return dump


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check a dump's handover before a live update",
                       description="Find the KHO handover in a memory dump and check that every physical range "
                                   "reachable from its FDT is preserved, that units are disjoint and outside "
                                   "scratch, and that every sub-node decodes.  Exit 0 clean, 1 findings, 3 unreadable.")
    add_dump_options(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def text_report(dump, report) -> str:
    lines = [f"{dump.path}: {dump.description}",
             f"KHO FDT {report.fdt_phys:#x} [{report.compatible}]: {report.units} preserved units, "
             f"{report.references} referenced ranges"]
    if report.ok:
        lines.append("ok: every referenced range is preserved")
    else:
        lines.append(f"{len(report.findings)} finding(s):")
        lines += [f"  {f.kind}: {f.message}" for f in report.findings]
    if report.unreferenced:
        shown = ", ".join(f"{p:#x}/{o}" for p, o in report.unreferenced[:SHOWN_UNREFERENCED])
        more = f", ... ({len(report.unreferenced) - SHOWN_UNREFERENCED} more)" if len(report.unreferenced) > SHOWN_UNREFERENCED else ""
        lines.append(f"{len(report.unreferenced)} preserved unit(s) no known structure references (phys/order): {shown}{more}")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    with open_args(args) as dump:
        report = check_dump(dump, fdt=args.fdt)
        if args.json:
            emit([json.dumps({"source": {"path": dump.path, "format": dump.format, "description": dump.description},
                              **report.to_json()}, indent=1) + "\n"])
        else:
            emit([text_report(dump, report)])
    return 0 if report.ok else EXIT_FINDINGS
