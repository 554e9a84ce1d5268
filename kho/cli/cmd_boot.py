"""``kho boot IMAGE``: boot the next kernel on a handover image and report its free lists."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kho.cli.imageio import emit
from kho.cli.options import size_arg
from kho.currentkernel.scratch import DEFAULT_KERNEL_IMAGE
from kho.encodings import get_encoding
from kho.errors import KHOError
from kho.handover.imagefile import load_image
from kho.kexec.profiles import BUILTIN, load_profile
from kho.nextkernel import PATHS, boot
from kho.nextkernel.boot import INSTRUCTIONS_ENCODING
from kho.nextkernel.memblock_cost import boot_restore_cost


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("boot", help="boot the next kernel on a handover image",
                       description="Boot the next kernel on a handover image: check the KHO FDT, limit early "
                                   "allocations to the scratch areas, deserialize the preserved-memory map "
                                   "(one memblock_reserve per unit, or by walking an instruction stream) and "
                                   "build the buddy free lists.  Reports free pages and blocks per order, "
                                   "reserved, preserved and leaked memory, and the time of each stage.")
    p.add_argument("image", metavar="IMAGE", help="handover image (.kho)")
    p.add_argument("--path", choices=PATHS, default="memblock",
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
    p.set_defaults(func=run)


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


def run(args) -> int:
    image = load_image(args.image)
    if args.path == "instructions" and image.encoding != INSTRUCTIONS_ENCODING:
        raise KHOError("EINVAL", f"--path instructions reads an instruction stream; {args.image} holds a "
                                 f"{image.encoding} map (serialize it with --abi {INSTRUCTIONS_ENCODING})")
    profile = load_profile(args.profile).profile
    nk = boot(image.memory, path=args.path, **image.boot_args(), encoding_options=image.options,
              kernel_image=args.kernel_image, strict=not args.lenient)
    restore = _restore(nk, image, profile, not args.lenient)
    report = {"image": args.image, "abi": image.encoding, "arch": image.arch, **nk.report(), "kho_restore_s": restore.get("kho_restore_s"),
              "free_list_s": restore.get("free_list_s"), "memblock_region_visits": restore.get("memblock_region_visits", 0),
              "kho_restore": restore}
    if args.json:
        emit([json.dumps(report, indent=2), "\n"])
        return 0
    console = Console()
    ps = report["page_size"]

    def pages(n: int) -> str:
        return f"{n:,} pages ({n * ps / (1 << 20):,.1f} MiB)"

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
    summary.add_row("kernel image", f"{report['kernel_image']['phys']:#x} + {report['kernel_image']['size'] >> 20} MiB")
    console.print(summary)

    orders = Table(title=escape("free_area[order]: free blocks"))
    for name in ("order", "block", "blocks", "in scratch", "pages"):
        orders.add_column(name, justify="right")
    normal, scratch = report["free_blocks"]["normal"], report["free_blocks"]["scratch"]
    for order, (n, s) in enumerate(zip(normal, scratch)):
        size = ps << order
        label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
        orders.add_row(str(order), label, f"{n:,}", f"{s:,}", f"{(n + s) << order:,}")
    console.print(orders)

    restore = report["kho_restore"]
    model = Table(title=f"next kernel's KHO stages, modelled (profile {restore['profile']})")
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
    return 0
