"""``kho boot PATH``: boot the next kernel on a handover image, or on the handover found in a
memory dump (:mod:`kho.nextkernel.dumpboot`: over the real map, the next kernel's writes in a
copy-on-write overlay, each known sub-node restored: ``reserve_mem`` regions revived, the
self-test's folios checksummed), and report its free lists."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kho.benchmark.progress import progress
from kho.cli.imageio import add_path_options, add_scratch_option, emit, open_memory_dump
from kho.cli.options import add_quiet_option, show_progress, size_arg
from kho.currentkernel.scratch import DEFAULT_KERNEL_IMAGE
from kho.encodings import get_encoding
from kho.errors import KHOError
from kho.dumps import ImageDump
from kho.nextkernel.dumpboot import boot_dump, dump_arch
from kho.kexec.profiles import BUILTIN, load_profile
from kho.nextkernel import PATHS, boot
from kho.nextkernel.boot import INSTRUCTIONS_ENCODING
from kho.nextkernel.memblock_cost import boot_restore_cost
from kho.sizes import format_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("boot", help="boot the next kernel on a handover image or memory dump",
                       description="Boot the next kernel on a handover image or on the handover found in a memory "
                                   "dump (its writes kept in a copy-on-write overlay; each known sub-node restored "
                                   "after the boot): check the KHO FDT, limit early "
                                   "allocations to the scratch areas, deserialize the preserved-memory map "
                                   "(one memblock_reserve per unit, or by walking an instruction stream) and "
                                   "build the buddy free lists.  Reports free pages and blocks per order, "
                                   "reserved, preserved and leaked memory, and the time of each stage.")
    add_path_options(p)
    add_scratch_option(p, "needed when the dump holds no handoff naming them")
    p.add_argument("--path", dest="boot_path", choices=PATHS, default="memblock",
                   help="deserialization path: memblock (any ABI; default) or instructions "
                        f"(images written with --abi {INSTRUCTIONS_ENCODING})")
    p.add_argument("--kernel-image", type=size_arg, default=DEFAULT_KERNEL_IMAGE, metavar="SIZE",
                   help=f"size of the next kernel's image (default {DEFAULT_KERNEL_IMAGE >> 20}M)")
    p.add_argument("--lenient", action="store_true",
                   help="decode the handover as leniently as the Linux kernel does (see spec/hardening.md)")
    p.add_argument("--profile", default="stingray", metavar="NAME|FILE",
                   help=f"timing profile of the modelled KHO restore: {', '.join(BUILTIN)} or a TOML/JSON file "
                        "(default stingray)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_quiet_option(p)
    p.set_defaults(func=run)


def _restore_cost(nk, profile, map_pages: int) -> dict:
    """The modelled KHO restore of ``nk`` under ``profile`` (:func:`~kho.nextkernel.memblock_cost.boot_restore_cost`)."""
    try:
        cost = boot_restore_cost(nk, profile.next_kernel, map_pages)
    except KHOError as err:  # e.g. overlapping units read leniently: the counting needs disjoint units
        return {"profile": profile.name, "error": err.message}
    return {"profile": profile.name, **cost.to_dict()}


def _restore(nk, image, profile, strict: bool) -> dict:
    """The modelled KHO restore of ``nk`` under ``profile``: seconds and counts (see
    :func:`kho.nextkernel.memblock_cost.boot_restore_cost`); the map's pages are read back
    with the image's encoding."""
    map_pages = 0
    if nk.revived:
        encoding = get_encoding(image.encoding, image.memory.page_size, **image.options)
        map_pages = int(encoding.decode(image.memory, nk.kho.fdt.props, strict=strict).metadata_pages.size)
    try:
        cost = boot_restore_cost(nk, profile.next_kernel, map_pages)
    except KHOError as err:  # e.g. overlapping units read leniently: the counting needs disjoint units
        return {"profile": profile.name, "error": err.message}
    return {"profile": profile.name, **cost.to_dict()}


#: The stages the progress display names, in order.
STAGES = ("open the image or dump", "boot the next kernel, model its KHO restore")


def run(args) -> int:
    with progress(len(STAGES), show_progress(args)) as step:
        step(STAGES[0])
        with open_memory_dump(args, "boot") as dump:
            step(STAGES[1])
            if isinstance(dump, ImageDump) and args.scratch is None:
                report = image_report(dump, args)
            else:
                report = dump_report(dump, args)
    if args.json:
        emit([json.dumps(report, indent=2), "\n"])
        return 0
    print_report(report)
    return 0


def dump_report(dump, args) -> dict:
    """The next kernel booted on the handover found in ``dump`` (:func:`~kho.nextkernel.dumpboot.boot_dump`,
    read as leniently as the kernel), with the modelled KHO restore."""
    handover = dump.handover(fdt=args.fdt)
    if args.boot_path == "instructions" and handover.encoding != INSTRUCTIONS_ENCODING:
        raise KHOError("EINVAL", f"--path instructions reads an instruction stream; {dump.path} holds a "
                                 f"{handover.encoding} map")
    profile = load_profile(args.profile).profile
    arch = dump_arch(handover)
    booted = boot_dump(dump, handover, scratch=args.scratch,
                       path=args.boot_path, kernel_image=args.kernel_image, arch=arch)
    restore = _restore_cost(booted.kernel, profile, int(handover.decoded.metadata_pages.size))
    return {"source": dump.source_json(), "fdt_phys": handover.fdt_phys, "compatible": handover.compatible,
            "abi": handover.encoding, "arch": arch, **booted.to_json(), "kho_restore_s": restore.get("kho_restore_s"),
            "free_list_s": restore.get("free_list_s"), "memblock_region_visits": restore.get("memblock_region_visits", 0),
            "kho_restore": restore}


def image_report(dump: ImageDump, args) -> dict:
    """The next kernel booted on a kho image, with the modelled KHO restore."""
    image = dump.image
    if args.boot_path == "instructions" and image.encoding != INSTRUCTIONS_ENCODING:
        raise KHOError("EINVAL", f"--path instructions reads an instruction stream; {args.path} holds a "
                                 f"{image.encoding} map (serialize it with --abi {INSTRUCTIONS_ENCODING})")
    profile = load_profile(args.profile).profile
    nk = boot(image.memory, path=args.boot_path, **image.boot_args(), encoding_options=image.options,
              kernel_image=args.kernel_image, strict=not args.lenient)
    restore = _restore(nk, image, profile, not args.lenient)
    return {"image": args.path, "source": dump.source_json(), "abi": image.encoding, "arch": image.arch,
            **nk.report(), "kho_restore_s": restore.get("kho_restore_s"), "free_list_s": restore.get("free_list_s"),
            "memblock_region_visits": restore.get("memblock_region_visits", 0), "kho_restore": restore}


def print_report(report: dict) -> None:
    """The text report of :func:`image_report` or :func:`dump_report`."""
    console = Console()
    ps = report["page_size"]

    def pages(n: int) -> str:
        return f"{n:,} pages ({format_size(n * ps)})"

    summary = Table(title=f"next kernel: {report['abi']} map, {report['path']} path")
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("KHO revival", "yes" if report["revived"] else "no")
    for message in report["messages"]:
        summary.add_row("kernel log", escape(message))
    summary.add_row("RAM", pages(report["ram_pages"]))
    summary.add_row("free (buddy)", pages(report["free_pages"]))
    summary.add_row("free in scratch areas (CMA)", pages(report["free_scratch_pages"]))
    summary.add_row("reserved", pages(report["reserved_pages"]))
    summary.add_row("preserved", f"{report['preserved_units']:,} units, " + pages(report["preserved_pages"]))
    summary.add_row("leaked if never restored", f"{report['leaked_units']:,} units, " + pages(report["leaked_pages"]))
    summary.add_row("memblock_reserve calls", f"{report['memblock_reserve_calls']:,}")
    summary.add_row("memblock.reserved regions", f"{report['memblock_reserved_regions']:,} "
                                                  f"({report['memblock_reserved_array_bytes']:,} B of array)")
    summary.add_row("kernel image", f"{report['kernel_image']['phys']:#x} + {format_size(report['kernel_image']['size'])}")
    console.print(summary)
    if "subnodes" in report:
        console.print(_restores_table(report))

    orders = Table(title=escape("free_area[order]: free blocks"))
    for name in ("order", "block", "blocks", "in scratch", "pages"):
        orders.add_column(name, justify="right")
    normal, scratch = report["free_blocks"]["normal"], report["free_blocks"]["scratch"]
    for order, (n, s) in enumerate(zip(normal, scratch)):
        size = ps << order
        label = format_size(size)
        orders.add_row(str(order), label, f"{n:,}", f"{s:,}", f"{(n + s) << order:,}")
    console.print(orders)

    restore = report["kho_restore"]
    model = Table(title=f"next kernel's KHO stages, modelled (profile {escape(restore['profile'])})")
    model.add_column("what")
    model.add_column("value", justify="right")
    if "error" in restore:
        model.add_row("not modelled", escape(restore["error"]))
    else:
        model.add_row("kho_restore_s (walk + memblock)", f"{restore['kho_restore_s']:.6g} s")
        model.add_row("  map walk and head pages", f"{restore['walk_s']:.6g} s ({restore['map_pages']:,} map pages)")
        if report["path"] == "memblock":
            model.add_row("  memblock_reserve", f"{restore['reserve_s']:.6g} s")
            model.add_row("  memblock_reserved_mark_noinit", f"{restore['noinit_s']:.6g} s")
            model.add_row("memblock_region_visits", f"{restore['memblock_region_visits']:,}")
            model.add_row("memblock regions moved", f"{restore['memblock_regions_moved']:,}")
            model.add_row("counting passes / array doublings",
                          f"{restore['counting_passes']:,} / {restore['doublings']} (max {restore['final_max']:,})")
        model.add_row("free_list_s", f"{restore['free_list_s']:.6g} s")
    console.print(model)

    timings = Table(title="stages (this host)")
    timings.add_column("stage")
    timings.add_column("seconds", justify="right")
    timings.add_column("cpu seconds", justify="right")
    for stage, seconds in report["timings_s"].items():
        timings.add_row(stage, f"{seconds:.4f}", f"{report['cpu_s'][stage]:.4f}")
    timings.add_row("total", f"{sum(report['timings_s'].values()):.4f}", f"{sum(report['cpu_s'].values()):.4f}")
    console.print(timings)


def _restores_table(report: dict) -> Table:
    """Where the scratch areas came from and what each sub-node's restore gave (a dump's boot)."""
    table = Table(title=escape(f"{report['source']['path']}: scratch areas {report['scratch_source']}, "
                               "sub-nodes restored"))
    table.add_column("sub-node")
    table.add_column("restored")
    table.add_column("what")
    for area in report["scratch"]:
        table.add_row(f"scratch {area['kind']}", "", f"{area['addr']:#x} + {area['size']:,} bytes")
    for sub in report["subnodes"]:
        if "regions" in sub:
            what = "; ".join(f"reserve_mem {r['name']} {r['start']:#x} + {r['size']:,} bytes revived" for r in sub["regions"])
        elif "folios" in sub:
            got = "-" if sub.get("computed") is None else f"{sub['computed']:#010x}"
            what = (f"{sub['folios']} folios ({sub['folio_bytes']:,} bytes), csum {sub['csum']:#010x}, "
                    f"recomputed ({sub['implementation']}) {got}")
        elif "sessions" in sub:
            what = f"{sub['sessions']} session(s), {sub['memfds']} memfd(s), {sub['memfd_bytes']:,} bytes"
        elif "kexec_count" in sub:
            what = f"version {sub['version']}, previous_release {sub['previous_release']}, kexec_count {sub['kexec_count']}"
        else:
            what = ""
        if sub["error"]:
            what = (what + "; " if what else "") + f"error: {sub['error']}"
        table.add_row(escape(sub["name"]), "[green]yes[/]" if sub["restored"] else "[red]no[/]", escape(what))
    return table
