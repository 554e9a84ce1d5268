"""``kho bench``: the encodings, reboot, sizes and scale benchmarks (:mod:`kho.benchmark`).

Every subcommand prints markdown tables (or JSON with ``--json``); ``--out DIR`` also
writes the JSON document, the markdown and the PNG plots there, and the directory's
``README.md`` index.  A progress bar runs on stderr when it is a terminal.  Exit status 1
when any point failed (its error is in the report and one ``kho:`` line says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kho.benchmark import design, plots, report
from kho.benchmark import encodings as benc
from kho.benchmark import reboot as breboot
from kho.benchmark import scale as bscale
from kho.benchmark.progress import progress
from kho.cli.options import add_quiet_option, page_size_arg, seed_arg, show_progress, size_arg
from kho.encodings import load_all
from kho.files import write_atomic
from kho.simulation.preserved_sets import PATTERNS

#: Exit status when the report was printed but some point failed.
EXIT_FAILED = 1


def share_arg(text: str) -> float:
    """argparse type: a percentage of RAM, ``25`` or ``25%``, strictly between 0 and 100; a fraction."""
    body = text.strip().removesuffix("%")
    try:
        value = float(body)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage (e.g. 25 or 25%)") from None
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"share {text} must be between 0 and 100 percent")
    return value / 100


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text} must be at least {least}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def count_arg(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: encodings, reboot, the design sizes, the 1 TiB scale run",
                       description="Measure the preservation-map encodings and the modelled kexec reboot; print "
                                   "markdown tables or JSON, and with --out write JSON, markdown and PNG plots.")
    bench = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)

    e = bench.add_parser("encodings", help="every encoding on preserved sets: bytes, encode/decode, free-list rebuild",
                         description="For every pattern x RAM size x preserved share: each encoding's bytes, encode "
                                     "and decode seconds, the next kernel's free-list rebuild on each boot path, "
                                     "memblock_reserve calls and whether folio orders survive (median of --runs).")
    e.add_argument("--pattern", nargs="+", choices=list(PATTERNS), default=["random"], help="patterns (default random)")
    e.add_argument("--ram", nargs="+", type=size_arg, default=[16 << 30], metavar="SIZE", help="RAM sizes (default 16G)")
    e.add_argument("--share", nargs="+", type=share_arg, default=[0.25], metavar="PCT",
                   help="preserved shares of RAM in percent (default 25)")
    e.add_argument("--encoding", nargs="+", choices=sorted(load_all()), default=None, metavar="NAME",
                   help=f"encodings (default all: {', '.join(sorted(load_all()))})")
    e.add_argument("--runs", type=positive_int, default=3, help="runs per measurement, median reported (default 3)")
    e.add_argument("--boot-runs", type=count_arg, default=None, metavar="N",
                   help="next-kernel boots per path (default --runs; 0 skips the boot paths)")
    e.add_argument("--page-size", type=page_size_arg, default=4096, help="page size: 4K (default), 16K or 64K")
    e.add_argument("--kho-scratch", default="200%", metavar="SPEC", help="kho_scratch= value (default 200%%)")
    e.add_argument("--seed", type=seed_arg, default=1, help="random seed (default 1)")
    _output_options(e)
    e.set_defaults(func=run_encodings)

    r = bench.add_parser("reboot", help="relocation mode x image size x RAM: reboot time and memory cost",
                         description="Every relocation mode (MMU off, MMU on with each linear-map granularity, a "
                                     "reserved kexeckernel= region) for each RAM and image size: relocation and "
                                     "whole-reboot time from the timing profile, and the memory it costs.")
    r.add_argument("--ram", nargs="+", type=size_arg, default=[1 << 30, 8 << 30, 64 << 30, 1 << 40], metavar="SIZE",
                   help="RAM sizes (default 1G 8G 64G 1T)")
    r.add_argument("--image-size", nargs="+", type=size_arg, default=[10 << 20, 47 << 20, 100 << 20, 1 << 30],
                   metavar="SIZE", help="kernel + initramfs sizes (default 10M 47M 100M 1G)")
    r.add_argument("--profile", default="stingray", metavar="NAME|FILE", help="timing profile (default stingray)")
    r.add_argument("--checks", action="store_true", help="purgatory SHA-256 checks on (default off, as published)")
    r.add_argument("--simulate-max-ram", type=size_arg, default=None, metavar="SIZE",
                   help="also run the whole simulated kexec in every mode for RAM sizes up to SIZE")
    r.add_argument("--page-size", type=page_size_arg, default=4096, help="page size: 4K (default), 16K or 64K")
    _output_options(r)
    r.set_defaults(func=run_reboot)

    s = bench.add_parser("sizes", help="the design discussion's sizes, computed",
                         description="Compute the sizes the KHO design discussion quotes (512 KiB of bitmaps "
                                     "for 16 GiB, ...) by running the encodings.")
    s.add_argument("--seed", type=seed_arg, default=1, help="random seed (default 1)")
    _output_options(s)
    s.set_defaults(func=run_sizes)

    c = bench.add_parser("scale", help="1 TiB RAM, 256 GiB of random pages: each encoding in its own process",
                         description="The scale run: each encoding in a child process (encode, decode, peak RSS); "
                                     "kho-v1, kho-v2 and instructions are held to 60 s and 8 GiB.")
    c.add_argument("--ram", type=size_arg, default=bscale.SCALE_RAM, metavar="SIZE", help="RAM (default 1T)")
    c.add_argument("--preserve", type=size_arg, default=bscale.SCALE_PRESERVED, metavar="SIZE",
                   help="random order-0 bytes preserved (default 256G)")
    c.add_argument("--encoding", nargs="+", choices=sorted(load_all()), default=None, metavar="NAME",
                   help="encodings (default all)")
    c.add_argument("--boot", action="store_true", help="also boot the next kernel once on each path")
    c.add_argument("--seed", type=seed_arg, default=1, help="random seed (default 1)")
    _output_options(c)
    c.set_defaults(func=run_scale)


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the JSON document instead of markdown")
    p.add_argument("--out", metavar="DIR", help="also write JSON, markdown and plots into DIR (created if needed)")
    add_quiet_option(p)


def _emit(args, doc: dict, plot) -> int:
    """Print ``doc``; with ``--out`` write it, its markdown, its plots (``plot(dir)``) and the index."""
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, doc["kind"])
        report.dump(doc, stem + ".json")
        write_atomic(stem + ".md", report.markdown(doc))
        if plot is not None:
            plot(stem)
        report.write_index(args.out)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(report.markdown(doc))
    failed = failures(doc["results"])
    if failed:
        print(f"kho: bench {doc['kind']}: {len(failed)} point(s) failed, e.g. {failed[0]}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def failures(results) -> list[str]:
    """The ``error`` of every point recorded as failed, anywhere in ``results``.  O(size)."""
    found = []
    stack = [results]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "error" in item:
                found.append(str(item["error"]))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return found


def run_encodings(args) -> int:
    names = benc.check_encodings(args.encoding)
    points = [benc.Point(pattern, ram, share) for pattern in args.pattern for ram in args.ram for share in args.share]
    for point in points:
        point.validate(args.page_size)
    total = len(points) * benc.steps_per_point(names, args.runs, args.boot_runs)
    with progress(total, show_progress(args)) as step:
        results = benc.run_points(points, names, args.runs, boot_runs=args.boot_runs, seed=args.seed,
                                  page_size=args.page_size, kho_scratch=args.kho_scratch, step=step)
    config = {"patterns": args.pattern, "rams": args.ram, "shares": args.share, "encodings": names, "runs": args.runs,
              "boot_runs": args.boot_runs, "page_size": args.page_size, "kho_scratch": args.kho_scratch, "seed": args.seed}
    doc = report.document("encodings", config, results)

    def plot(stem: str) -> None:
        done = report.measured(results)
        if len({p["share"] for p in done}) > 1:
            plots.bytes_vs_share(done, stem + "_bytes_vs_share.png")
        if len({p["ram_bytes"] for p in done}) > 1:
            plots.time_vs_scale(done, stem + "_time_vs_scale.png")

    return _emit(args, doc, plot)


def run_reboot(args) -> int:
    breboot.check_sizes(args.ram, args.image_size, args.page_size)
    total = breboot.steps(args.ram, args.image_size, args.simulate_max_ram)
    with progress(total, show_progress(args)) as step:
        results = breboot.run_reboot(args.ram, args.image_size, args.profile, page_size=args.page_size,
                                     checks=args.checks, simulate_max_ram=args.simulate_max_ram, step=step)
    config = {"rams": args.ram, "image_sizes": args.image_size, "profile": args.profile, "checks": args.checks,
              "simulate_max_ram": args.simulate_max_ram, "page_size": args.page_size}
    doc = report.document("reboot", config, results)
    return _emit(args, doc, lambda stem: plots.reboot_tradeoff(results, stem + "_tradeoff.png"))


def run_sizes(args) -> int:
    doc = report.document("sizes", {"seed": args.seed}, design.design_sizes(args.seed))
    return _emit(args, doc, None)


def run_scale(args) -> int:
    names = benc.check_encodings(args.encoding)
    with progress(len(names), show_progress(args)) as step:
        results = bscale.run_scale(names, args.ram, args.preserve, seed=args.seed, boot=args.boot, step=step)
    config = {"ram": args.ram, "preserve": args.preserve, "encodings": names, "boot": args.boot, "seed": args.seed}
    return _emit(args, report.document("scale", config, results), None)
