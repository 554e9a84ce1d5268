"""``kho check PATH``: the lint to run before a live update, on a memory dump or a kho image.

Finds the handover (:mod:`kho.dumps`) and checks that everything it references is preserved
(:mod:`kho.dumps.check`).  Exit status: 0 clean, 1 findings, 3 unreadable (one ``kho:``
line).  ``--json``: ``ok``, ``findings`` (``kind``, ``phys``, ``size``, ``message``),
``unreferenced``, ``notes`` and the dump's ``source``.
"""

from __future__ import annotations

import argparse
import json

from kho.cli.imageio import add_path_options, add_scratch_option, emit, open_memory_dump
from kho.dumps.check import check_dump

#: Exit status when the check found problems.
EXIT_FINDINGS = 1
#: Unreferenced units printed in the text report (all of them with --json).
SHOWN_UNREFERENCED = 16


def open_args(args):
    """The dump the options name (KHOError for a debugfs directory: no memory to read)."""
    return open_memory_dump(args, "check")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check a dump's handover before a live update",
                       description="Find the KHO handover in a memory dump and check that every physical range "
                                   "reachable from its FDT is preserved, that units are disjoint and outside "
                                   "scratch, and that every sub-node decodes.  Exit 0 clean, 1 findings, 3 unreadable.")
    add_path_options(p)
    add_scratch_option(p, "the units are checked against them when the dump holds no handoff")
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
        report = check_dump(dump, fdt=args.fdt, scratch=args.scratch)
        if args.json:
            emit([json.dumps({"source": {"path": dump.path, "format": dump.format, "description": dump.description},
                              **report.to_json()}, indent=1) + "\n"])
        else:
            emit([text_report(dump, report)])
    return 0 if report.ok else EXIT_FINDINGS
