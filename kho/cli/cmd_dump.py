"""``kho dump IMAGE``: what a handover image holds — machine, ABI, KHO FDT, the map (units and
pages per order, metadata pages and bytes) and every sub-node decoded (kexec-metadata,
``reserve_mem`` regions, LUO sessions -> files -> memfds, the self-test's folios with their
checksum recomputed) — or the KHO FDT as DTS with the sub-FDTs nested (``--dts``), or
everything as JSON (``--json``, fields in ``spec/image-format.md``).

Sub-nodes are read by :func:`kho.dumps.find.read_subnodes` (the readers of
:mod:`kho.subsystems.registry`); one that does not decode is shown with its error, the rest
of the dump goes on.  Every string taken from the image is escaped before rich renders it."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from kho.abi.memfd import (
    F_SEAL_EXEC,
    F_SEAL_FUTURE_WRITE,
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
)
from kho.cli.imageio import add_path_options, emit, open_path
from kho.devicetree.flat import parse_fdt, prop_bytes, string_list
from kho.devicetree.layout import FDT_HEADER, U64_PROP, fdt_totalsize
from kho.dumps import DebugfsHandover, Dump, ImageDump
from kho.dumps.find import SubNode, read_subnodes
from kho.nextkernel.dumpboot import dump_arch
from kho.errors import KHOError
from kho.handover.outgoing import ARCH_X86_64
from kho.subsystems.checksum import CSUM_OF_ARCH
from kho.subsystems.kho_test import KhoTest


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dump", help="summarize a handover image or the handover in a memory dump",
                       description="Read a handover image, or find the handover in a memory dump, an ELF core or "
                                   "the running kernel (--live), check its KHO FDT as the next kernel would, decode "
                                   "the preserved-memory map and every sub-node, and summarize them.")
    add_path_options(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--dts", action="store_true", help="print the KHO FDT as DTS")
    how.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--lenient", action="store_true",
                   help="read a kho image's FDT and map as leniently as the Linux kernel does (spec/hardening.md); "
                        "a dump is always read so")
    p.set_defaults(func=run)


def summary(dump: Dump, *, fdt: int | None = None, strict: bool = True) -> tuple[dict, str]:
    """What ``dump`` holds as a JSON-friendly dict, and the KHO FDT as DTS with the sub-FDTs
    nested: :func:`image_summary` for a kho image, :func:`dump_summary` for a memory dump
    (``fdt``: the KHO FDT to choose; read as leniently as the kernel does)."""
    if isinstance(dump, ImageDump):
        return image_summary(dump, strict=strict)
    return dump_summary(dump, fdt=fdt)


def image_summary(dump: ImageDump, strict: bool = True) -> tuple[dict, str]:
    """The dump of a kho image as a JSON-friendly dict, and the KHO FDT as DTS with the
    sub-FDTs nested; ``strict=False`` reads it as leniently as the kernel does.  KHOError
    when the KHO FDT or the map is refused (a sub-node that does not decode is reported in
    its entry's ``error``).  O(image + sub-node blobs + the self-test's folio bytes)."""
    image, path = dump.image, dump.path
    memory = image.memory
    fdt = image.kho_fdt(strict=strict)
    decoded = image.decode(strict=strict)
    orders, counts = np.unique(decoded.order, return_counts=True)
    per_order = [{"order": int(o), "units": int(c), "pages": int(c) << int(o)} for o, c in zip(orders, counts)]
    ps = memory.page_size
    fdt_blob = memory.read(image.fdt_phys, image.fdt_size)
    nodes = read_subnodes(memory, fdt, strict=strict)
    report = {
        "image": path, "image_bytes": os.path.getsize(path), "format_version": image.version,
        "source": dump.source_json(),
        "arch": image.arch, "page_size": ps,
        "banks": [{"start": b.start, "size": b.size, "node": b.node} for b in memory.banks],
        "ram_bytes": memory.ram_size,
        "scratch": [{"addr": a.addr, "size": a.size, "kind": a.kind} for a in memory.scratch],
        "abi": image.encoding, "options": image.options, "compatible": fdt.compatible,
        "fdt_phys": image.fdt_phys, "fdt_size": image.fdt_size,
        "fdt_bytes": fdt_totalsize(fdt_blob) if len(fdt_blob) >= FDT_HEADER.size else 0,
        "fdt_props": {name: value.hex() for name, value in fdt.props.items()},
        "scratch_array_phys": image.scratch_phys, "scratch_array_bytes": image.scratch_size,
        "boot_dtb_bytes": len(image.boot_dtb),
        "subtrees": [_subtree_json(memory, node, image.arch) for node in nodes],
        "units": len(decoded), "preserved_pages": decoded.nr_pages(), "preserved_bytes": decoded.nr_pages() * ps,
        "units_by_order": {str(row["order"]): row["units"] for row in per_order},
        "per_order": per_order,
        "exact_orders": decoded.exact_orders,
        "metadata_pages": int(decoded.metadata_pages.size), "metadata_bytes": int(decoded.metadata_pages.size) * ps,
    }
    return report, nested_dts(fdt.to_dts(), nodes)


def dump_summary(dump: Dump, *, fdt: int | None = None) -> tuple[dict, str]:
    """The handover found in a memory dump (:meth:`kho.dumps.Dump.handover`, kernel-compatible
    decoding) as a JSON-friendly dict — ``source``, the RAM, everything of
    :meth:`~kho.dumps.find.DumpHandover.to_json` (``fdt_phys``, ``compatible``,
    ``units_by_order``, ``subtrees``, ``candidates``, ...), pages per order — and its KHO FDT
    as DTS with the sub-FDTs nested.  O(page starts scanned + map + sub-node blobs)."""
    handover = dump.handover(fdt=fdt)
    memory, decoded = dump.memory, handover.decoded
    ps = memory.page_size
    arch = dump_arch(handover)
    orders, counts = np.unique(decoded.order, return_counts=True)
    per_order = [{"order": int(o), "units": int(c), "pages": int(c) << int(o)} for o, c in zip(orders, counts)]
    report = {
        "source": dump.source_json(), "arch": arch, "page_size": ps,
        "banks": [{"start": b.start, "size": b.size, "node": b.node} for b in memory.banks],
        "ram_bytes": memory.ram_size,
        **handover.to_json(),
        "subtrees": [_subtree_json(memory, node, arch) for node in handover.subnodes],
        "preserved_pages": decoded.nr_pages(), "preserved_bytes": decoded.nr_pages() * ps,
        "per_order": per_order,
        "metadata_pages": int(decoded.metadata_pages.size), "metadata_bytes": int(decoded.metadata_pages.size) * ps,
    }
    return report, nested_dts(handover.fdt.to_dts(), handover.subnodes)


def debugfs_summary(handover: DebugfsHandover) -> tuple[dict, str]:
    """A debugfs ``kho/out`` or ``kho/in`` directory as a JSON-friendly dict (its
    :meth:`~kho.dumps.debugfs.DebugfsHandover.to_json`, with ``fdt_phys`` and
    ``units_by_order`` null: debugfs holds no address and no map), and its FDT as DTS with the
    sub-FDTs nested (KHOError when the ``fdt`` file is truncated or invalid).  O(files)."""
    report = {**handover.to_json(), "fdt_phys": None, "units_by_order": None}
    if handover.fdt is None:
        return report, ""
    return report, nested_dts(handover.fdt.to_dts(), handover.subnodes)


def _subtree_json(memory, node: SubNode, arch: str | None) -> dict:
    """A sub-node's JSON (``name``, ``phys``, ``size``, ``format``, ``compatible``, ``decoded``,
    ``error``); the self-test's also gets ``checksum``: the ``csum_partial`` of its folios
    recomputed with ``arch``'s implementation (x86_64's when unknown), and whether it matches ``csum``."""
    out = node.to_json()
    if isinstance(node.decoded, KhoTest):
        impl = CSUM_OF_ARCH.get(arch or ARCH_X86_64, CSUM_OF_ARCH[ARCH_X86_64])
        try:
            computed = node.decoded.checksum(memory, impl)
        except KHOError as err:
            out["checksum"] = {"implementation": impl, "computed": None, "ok": False, "error": str(err)}
        else:
            out["checksum"] = {"implementation": impl, "computed": computed, "ok": computed == node.decoded.csum}
    return out


# -- DTS -------------------------------------------------------------------------------------


def _dts_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _dts_value(value: bytes) -> tuple[str, str]:
    """A property's `` = value`` (strings quoted, else bytes) and a comment giving the
    little-endian number of a 4- or 8-byte value."""
    if not value:
        return "", ""
    strings = string_list(value)
    if strings is not None:
        return " = " + ", ".join(f'"{_dts_string(s)}"' for s in strings), ""
    note = f" /* LE {int.from_bytes(value, 'little'):#x} */" if len(value) in (4, U64_PROP.size) else ""
    return " = [" + " ".join(f"{b:02x}" for b in value) + "]", note


def _dts_name(name: str) -> str:
    """A node or property name with anything a DTS name cannot hold as ``\\xNN``."""
    return "".join(c if c.isascii() and (c.isalnum() or c in ",._+-#?@") else f"\\x{ord(c):02x}" for c in name) or "?"


def _node_dts(node, indent: str, name: str) -> list[str]:
    """DTS lines of ``node`` (a parsed FDT node) and its children, at most 32 levels deep (parse_fdt's bound)."""
    lines = [f"{indent}{name} {{"]
    for prop in node.props:
        value, note = _dts_value(prop_bytes(prop) or b"")
        lines.append(f"{indent}\t{_dts_name(prop.name)}{value};{note}")
    for child in node.nodes:
        lines.append("")
        lines += _node_dts(child, indent + "\t", _dts_name(child.name))
    lines.append(f"{indent}}};")
    return lines


def nested_dts(root_dts: str, nodes: list[SubNode]) -> str:
    """The KHO FDT's DTS with each sub-node whose blob is an FDT (memblock, kho_test) shown
    inside that sub-node as a child ``blob`` node, after a comment saying where it was read
    (the blob is not part of the KHO FDT: recompiling this text adds those nodes).  A blob
    that does not parse gets a comment.  O(DTS + blobs)."""
    lines = root_dts.splitlines()
    for node in nodes:
        if node.format != "fdt" or node.data is None:
            continue
        head = f"\t{node.name} {{"
        if head not in lines:
            continue
        at = lines.index(head)
        close = lines.index("\t};", at)
        try:
            tree = parse_fdt(node.data, node.name, strict=False)
        except KHOError as err:
            nested = [f"\t\t/* the FDT at {node.phys:#x} does not parse: {_comment(str(err))} */"]
        else:
            note = (f"\t\t/* {_comment(node.name)}: the FDT at {node.phys:#x} ({len(node.data)} bytes), "
                    "shown as a nested node */")
            nested = ["", note, *_node_dts(tree.root, "\t\t", "blob")]
        lines[close:close] = nested
    return "\n".join(lines) + "\n"


def _comment(text: str) -> str:
    return text.replace("*/", "*\\/")


def _size(n: int) -> str:
    """Bytes in binary units, two decimals (``1 GiB``, ``1.50 MiB``, ``512 B``)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):,.2f}".removesuffix(".00") + f" {unit}"
    return f"{n:,} B"


#: ``F_SEAL_*`` names, for memfd seals.
SEAL_NAMES = ((F_SEAL_SEAL, "SEAL"), (F_SEAL_SHRINK, "SHRINK"), (F_SEAL_GROW, "GROW"), (F_SEAL_WRITE, "WRITE"),
              (F_SEAL_FUTURE_WRITE, "FUTURE_WRITE"), (F_SEAL_EXEC, "EXEC"))


def _seals(seals: int) -> str:
    names = [name for bit, name in SEAL_NAMES if seals & bit]
    return f"{seals:#x}" + (f" ({'|'.join(names)})" if names else "")


def _decoded_lines(decoded: dict, sub: dict, tree: Tree) -> None:
    """Add the decoded sub-node's contents to ``tree`` (every input string escaped)."""
    e = escape
    if "kexec_count" in decoded:
        tree.add(f"version {decoded['version']}, previous_release \"{e(decoded['previous_release'])}\", "
                 f"kexec_count {decoded['kexec_count']}")
    elif "regions" in decoded:
        regions = tree.add(f"{e(decoded['compatible'])}: {len(decoded['regions'])} reserve_mem region(s), revived at "
                           "the same address by the next kernel")
        for r in decoded["regions"]:
            regions.add(f"{e(r['name'])}: {r['start']:#x} + {_size(r['size'])}")
    elif "sessions" in decoded:
        tree.add(f"{e(decoded['compatible'])}, liveupdate_num {decoded['liveupdate_num']}, "
                 f"sessions_pa {decoded['sessions_pa']:#x}"
                 + (" (not serialized yet: LUO writes its sessions at reboot)" if not decoded["sessions_pa"] else "")
                 + f", flbs_pa {decoded['flbs_pa']:#x}")
        for session in decoded["sessions"]:
            branch = tree.add(f"session \"{e(session['name'])}\": {len(session['files'])} file(s)")
            for f in session["files"]:
                leaf = branch.add(f"file token {f['token']:#x}, {e(f['compatible'])}, data {f['data']:#x}")
                memfd = f.get("memfd")
                if memfd is not None:
                    leaf.add(f"memfd ({e(memfd['compatible'])}): size {memfd['size']:,} bytes, pos {memfd['pos']}, "
                             f"seals {_seals(memfd['seals'])}, {memfd['nr_folios']} folio(s)")
        for flb in decoded["flbs"]:
            tree.add(f"FLB \"{e(flb['name'])}\": data {flb['data']:#x}, {flb['count']} file(s)")
    elif "folios" in decoded and "csum" in decoded:
        orders: dict[int, int] = {}
        for folio in decoded["folios"]:
            orders[folio["order"]] = orders.get(folio["order"], 0) + 1
        spread = ", ".join(f"order {o}: {n}" for o, n in sorted(orders.items()))
        tree.add(f"{e(decoded['compatible'])}, magic {decoded['magic']:#x}, {decoded['nr_folios']} folio(s) ({spread}); "
                 f"folios_info: {decoded['folios_info']['total_pages']} vmalloc page(s)")
        check = sub.get("checksum")
        if check is not None:
            verdict = "[green]verified[/]" if check["ok"] else "[red]MISMATCH[/]"
            got = "-" if check["computed"] is None else f"{check['computed']:#010x}"
            tree.add(f"csum {decoded['csum']:#010x}; recomputed over the folios (csum_partial, {check['implementation']}): "
                     f"{got}, {verdict}" + (f": {e(check['error'])}" if check.get("error") else ""))
    else:
        tree.add(e(json.dumps(decoded)))


def subnode_tree(subtrees: list[dict]) -> Tree:
    """The sub-nodes of a dump's JSON (:func:`summary`) as a rich tree: where each blob is,
    its format, what it decodes to, or why it does not."""
    tree = Tree(f"[bold]sub-nodes[/] ({len(subtrees)})")
    for sub in subtrees:
        where = "?" if sub["phys"] is None else f"{sub['phys']:#x}"
        size = "" if sub["size"] is None else f", {sub['size']:,} bytes"
        what = "" if sub["format"] is None else f", {sub['format']}" + (f" \"{escape(sub['compatible'])}\"" if sub["compatible"] else "")
        branch = tree.add(f"[bold]{escape(sub['name'])}[/] at {where}{size}{what}")
        if sub["decoded"] is not None:
            _decoded_lines(sub["decoded"], sub, branch)
        if sub["error"] is not None:
            branch.add(f"[red]error: {escape(sub['error'])}[/]")
        elif sub["decoded"] is None:
            branch.add("not decoded: kho has no reader for this sub-node")
    return tree


def run(args) -> int:
    source = open_path(args)
    if isinstance(source, DebugfsHandover):
        report, dts = debugfs_summary(source)
    else:
        with source as dump:
            report, dts = summary(dump, fdt=args.fdt, strict=not args.lenient)
    if args.dts:
        if not dts:
            raise KHOError("EINVAL", f"{args.path}: the debugfs fdt is truncated or invalid: no DTS (--json lists "
                                     "what was recovered)")
        emit([dts])
        return 0
    if args.json:
        emit([json.dumps(report, indent=2), "\n"])
        return 0
    if report["source"]["format"] == "debugfs":
        _print_debugfs(report)
        return 0
    if report["source"]["format"] != "kho":
        _print_dump(report)
        return 0
    console = Console()
    table = Table(title=escape(f"{report['image']}: {report['abi']} handover image ({report['arch']})"), show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("image", f"{report['image_bytes']:,} bytes, format version {report['format_version']}")
    table.add_row("RAM", f"{_size(report['ram_bytes'])} in {len(report['banks'])} bank(s), {report['page_size']}-byte pages")
    for bank in report["banks"]:
        table.add_row("  bank", f"{bank['start']:#x} + {_size(bank['size'])} (node {bank['node']})")
    for area in report["scratch"]:
        table.add_row(f"  scratch {escape(area['kind'])}", f"{area['addr']:#x} + {_size(area['size'])}")
    options = ", ".join(f"{k}={v}" for k, v in report["options"].items()) or "no options"
    table.add_row("ABI", escape(f"{report['abi']} ({options}), compatible \"{report['compatible']}\""))
    table.add_row("KHO FDT", f"{report['fdt_phys']:#x}, {report['fdt_bytes']:,} of {report['fdt_size']:,} bytes")
    table.add_row("scratch array", f"{report['scratch_array_phys']:#x}, {report['scratch_array_bytes']} bytes "
                                   f"({report['scratch_array_bytes'] // 16} areas)")
    table.add_row("preserved", f"{report['units']:,} units, {report['preserved_pages']:,} pages ({_size(report['preserved_bytes'])})")
    for row in report["per_order"]:
        table.add_row(f"  order {row['order']}", f"{row['units']:,} units, {row['pages']:,} pages")
    if not report["exact_orders"]:
        table.add_row("orders", "LOST: this encoding keeps ranges only; units are the greedy split of merged ranges")
    table.add_row("metadata", f"{report['metadata_pages']:,} pages ({report['metadata_bytes']:,} bytes)")
    console.print(table)
    console.print(subnode_tree(report["subtrees"]))
    return 0


def _print_dump(report: dict) -> None:
    """The text summary of a memory dump's handover (:func:`dump_summary`)."""
    console = Console()
    source = report["source"]
    table = Table(title=escape(f"{source['path']}: {source['description']}"), show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("RAM", f"{_size(report['ram_bytes'])} in {len(report['banks'])} range(s), {report['page_size']}-byte pages"
                         + (f", {report['arch']}" if report["arch"] else ""))
    table.add_row("KHO FDT", escape(f"{report['fdt_phys']:#x}, {report['fdt_size']:,} bytes, \"{report['compatible']}\" "
                                    f"({report['encoding']})"))
    handoff = report["handoff"]
    if handoff is None:
        table.add_row("handoff", "none in the dump: scratch areas unknown")
    else:
        table.add_row("handoff", escape(f"{handoff['source']}: scratch array {handoff['scratch_addr']:#x}, "
                                        f"{handoff['scratch_size']} bytes"))
    for area in report["scratch"]:
        table.add_row(f"  scratch {escape(area['kind'])}", f"{area['addr']:#x} + {_size(area['size'])}")
    table.add_row("preserved", f"{report['units']:,} units, {report['preserved_pages']:,} pages ({_size(report['preserved_bytes'])})")
    for row in report["per_order"]:
        table.add_row(f"  order {row['order']}", f"{row['units']:,} units, {row['pages']:,} pages")
    table.add_row("map", f"{report['metadata_pages']:,} pages ({report['metadata_bytes']:,} bytes)")
    for c in report["candidates"]:
        verdict = "decodes" if c["decodes"] else ("" if c["error"] is None else f"does not decode: {c['error']}")
        table.add_row("  FDT found", escape(f"{c['phys']:#x} {c['kind']}" + (f" \"{', '.join(c['compatible'])}\"" if c["compatible"] else "")
                                            + (f", {verdict}" if verdict else "")))
    for note in report["notes"]:
        table.add_row("note", escape(note))
    console.print(table)
    console.print(subnode_tree(report["subtrees"]))


def _print_debugfs(report: dict) -> None:
    """The text summary of a debugfs directory (:func:`debugfs_summary`)."""
    console = Console()
    table = Table(title=escape(f"{report['source']['path']}: debugfs kho directory (no memory map)"), show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("KHO FDT", escape(f"\"{report['compatible']}\", {report['fdt_bytes']:,} of {report['totalsize']:,} bytes"
                                    + (" (truncated)" if report["truncated"] else "")))
    for area in report["scratch"]:
        table.add_row(f"  scratch {escape(area['kind'])}", f"{area['addr']:#x} + {_size(area['size'])}")
    for note in report["notes"]:
        table.add_row("note", escape(note))
    console.print(table)
    console.print(subnode_tree(report["subtrees"]))
