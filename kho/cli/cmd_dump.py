"""``kho dump IMAGE``: what a handover image holds — machine, ABI, KHO FDT, sub-trees, the map
(units and pages per order, metadata pages and bytes) — or the KHO FDT as DTS (``--dts``),
or everything as JSON (``--json``)."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from rich.console import Console
from rich.table import Table

from kho.cli.imageio import emit
from kho.devicetree.layout import FDT_HEADER, fdt_totalsize
from kho.handover.imagefile import load_image


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dump", help="summarize a handover image",
                       description="Read a handover image, check its KHO FDT as the next kernel would, decode the "
                                   "preserved-memory map and summarize it.")
    p.add_argument("image", metavar="IMAGE", help="handover image (.kho)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--dts", action="store_true", help="print the KHO FDT as DTS")
    how.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--lenient", action="store_true",
                   help="read the FDT and decode the map as leniently as the Linux kernel does (spec/hardening.md)")
    p.set_defaults(func=run)


def summary(path: str, strict: bool = True) -> tuple[dict, str]:
    """The dump of image ``path`` as a JSON-friendly dict, and the KHO FDT as DTS;
    ``strict=False`` reads it as leniently as the kernel does."""
    image = load_image(path)
    memory = image.memory
    fdt = image.kho_fdt(strict=strict)
    decoded = image.decode(strict=strict)
    orders, counts = np.unique(decoded.order, return_counts=True)
    per_order = [{"order": int(o), "units": int(c), "pages": int(c) << int(o)} for o, c in zip(orders, counts)]
    ps = memory.page_size
    fdt_blob = memory.read(image.fdt_phys, image.fdt_size)
    subtrees = []
    for name, phys in fdt.subtrees().items():
        subtrees.append({"name": name, "phys": phys, "size": fdt.subtree_size(name)})
    report = {
        "image": path, "image_bytes": os.path.getsize(path), "format_version": image.version,
        "page_size": ps,
        "banks": [{"start": b.start, "size": b.size, "node": b.node} for b in memory.banks],
        "ram_bytes": memory.ram_size,
        "scratch": [{"addr": a.addr, "size": a.size, "kind": a.kind} for a in memory.scratch],
        "abi": image.encoding, "options": image.options, "compatible": fdt.compatible,
        "fdt_phys": image.fdt_phys, "fdt_size": image.fdt_size,
        "fdt_bytes": fdt_totalsize(fdt_blob) if len(fdt_blob) >= FDT_HEADER.size else 0,
        "fdt_props": {name: value.hex() for name, value in fdt.props.items()},
        "scratch_array_phys": image.scratch_phys, "scratch_array_bytes": image.scratch_size,
        "boot_dtb_bytes": len(image.boot_dtb),
        "subtrees": subtrees,
        "units": len(decoded), "preserved_pages": decoded.nr_pages(), "preserved_bytes": decoded.nr_pages() * ps,
        "per_order": per_order,
        "exact_orders": decoded.exact_orders,
        "metadata_pages": int(decoded.metadata_pages.size), "metadata_bytes": int(decoded.metadata_pages.size) * ps,
    }
    return report, fdt.to_dts()


def _size(n: int) -> str:
    """Bytes in binary units, two decimals (``1 GiB``, ``1.50 MiB``, ``512 B``)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):,.2f}".removesuffix(".00") + f" {unit}"
    return f"{n:,} B"


def run(args) -> int:
    report, dts = summary(args.image, strict=not args.lenient)
    if args.dts:
        emit([dts])
        return 0
    if args.json:
        emit([json.dumps(report, indent=2), "\n"])
        return 0
    console = Console()
    table = Table(title=f"{report['image']}: {report['abi']} handover image", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("image", f"{report['image_bytes']:,} bytes, format version {report['format_version']}")
    table.add_row("RAM", f"{_size(report['ram_bytes'])} in {len(report['banks'])} bank(s), {report['page_size']}-byte pages")
    for bank in report["banks"]:
        table.add_row("  bank", f"{bank['start']:#x} + {_size(bank['size'])} (node {bank['node']})")
    for area in report["scratch"]:
        table.add_row(f"  scratch {area['kind']}", f"{area['addr']:#x} + {_size(area['size'])}")
    options = ", ".join(f"{k}={v}" for k, v in report["options"].items()) or "no options"
    table.add_row("ABI", f"{report['abi']} ({options}), compatible \"{report['compatible']}\"")
    table.add_row("KHO FDT", f"{report['fdt_phys']:#x}, {report['fdt_bytes']:,} of {report['fdt_size']:,} bytes")
    table.add_row("scratch array", f"{report['scratch_array_phys']:#x}, {report['scratch_array_bytes']} bytes "
                                   f"({report['scratch_array_bytes'] // 16} areas)")
    for sub in report["subtrees"]:
        size = "" if sub["size"] is None else f", {sub['size']:,} bytes"
        table.add_row(f"  sub-tree {sub['name']}", f"{sub['phys']:#x}{size}")
    table.add_row("preserved", f"{report['units']:,} units, {report['preserved_pages']:,} pages ({_size(report['preserved_bytes'])})")
    for row in report["per_order"]:
        table.add_row(f"  order {row['order']}", f"{row['units']:,} units, {row['pages']:,} pages")
    if not report["exact_orders"]:
        table.add_row("orders", "LOST: this encoding keeps ranges only; units are the greedy split of merged ranges")
    table.add_row("metadata", f"{report['metadata_pages']:,} pages ({report['metadata_bytes']:,} bytes)")
    console.print(table)
    return 0
