"""``kho simulate``: a modelled arm64 KHO kexec end to end, its timeline, and the trade-off report.

Exit status: 0 when every generation verified, 1 when the simulation ran but a check
failed (the report says which), 2 usage error, 3 impossible configuration or bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kho.abi.versions import DEFAULT_KERNEL, KERNEL_VERSIONS
from kho.benchmark.encodings import Point
from kho.benchmark.restore import compare_encodings
from kho.cli.options import add_machine_options, add_quiet_option, show_progress, size_arg
from kho.errors import KHOError
from kho.files import atomic_write
from kho.handover.outgoing import ARCHES
from kho.kexec.profiles import load_profile
from kho.kexec.relocate import RELOCATION_MODES
from kho.kexec.timing import PARAMETERS, FitReport, reboot_timeline
from kho.kexec.transpgd import LINEAR_MAPS
from kho.simulation import simulate as sim
from kho.simulation.preserved_sets import PATTERNS as SET_PATTERNS
from kho.simulation.workload import WORKLOAD_PATTERNS
from kho.sizes import format_size

MODE_LABEL = {"mmu-off": "MMU off", "mmu-on": "MMU on", "reserved": "reserved (kexeckernel=)"}
SHORT_LABEL = {"mmu-off": "MMU off", "mmu-on": "MMU on", "reserved": "reserved"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate", help="preserve, kexec through a modelled arm64 reboot, boot the next kernel and verify everything",
        description="Run the KHO self-test-like workload through a modelled arm64 kexec: preserve, finalize, load "
                    "(entry list, transitional tables), relocate, boot the next kernel, restore and verify every "
                    "checksum; print the reboot timeline.  Exit 1 if a check failed.")
    add_machine_options(p, ram_default="8G")
    p.add_argument("--preserve", type=size_arg, default=sim.Config.preserve, metavar="SIZE",
                   help="bytes the workload preserves (default 128M)")
    p.add_argument("--pattern", choices=WORKLOAD_PATTERNS, default="selftest",
                   help="how preserved folios are drawn (default selftest: random orders, like the kernel's KHO self-test)")
    p.add_argument("--kernel", choices=[v.version for v in KERNEL_VERSIONS], default=None, metavar="VERSION",
                   help=f"the Linux version simulated (default {DEFAULT_KERNEL}, or none with --abi alone): 7.1 and "
                        f"later run a 7.x system (self-test folios, reserve_mem, kexec-metadata, LUO sessions of "
                        f"memfds, the live radix map); earlier ones the 6.16-era workload; "
                        f"{', '.join(v.version for v in KERNEL_VERSIONS)}")
    p.add_argument("--abi", default=None, metavar="NAME",
                   help="preservation-map encoding (default: what --kernel writes); without --kernel, kho's "
                        "encode-at-finalize model of that encoding with the 6.16-era workload")
    p.add_argument("--arch", choices=ARCHES, default="arm64",
                   help="the next kernel's architecture: arm64 (a boot DTB, default) or x86_64 (boot_params with "
                        "setup_data); the reboot profiles are arm64's")
    p.add_argument("--boot-path", choices=["memblock", "instructions"], default="memblock",
                   help="next kernel's deserialization path (instructions needs --abi instructions)")
    p.add_argument("--relocation", choices=RELOCATION_MODES, default="mmu-on", help="relocation mode (default mmu-on)")
    p.add_argument("--linear-map", choices=LINEAR_MAPS, default="page",
                   help="granularity of the linear map the mmu-on tables copy (default page, as with rodata_full)")
    p.add_argument("--profile", default="stingray", metavar="NAME|FILE",
                   help="timing profile: built-in name or a TOML/JSON file (default stingray)")
    p.add_argument("--profile-set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a profile parameter ({', '.join(PARAMETERS)}); repeatable")
    p.add_argument("--show-profile", action="store_true", help="print the profile and its fit to the measurements, and exit")
    p.add_argument("--image-size", type=size_arg, default=sim.Config.image_size, metavar="SIZE",
                   help="kernel Image + initramfs bytes (default 47M)")
    p.add_argument("--generations", type=int, default=1, metavar="N", help="chained kexecs (default 1)")
    p.add_argument("--no-checks", action="store_true", help="skip purgatory's SHA-256 of the segments (kexec -i)")
    p.add_argument("--save-image", metavar="PATH", help="write the first handover as a .kho image file")
    p.add_argument("--compare", action="store_true",
                   help="trade-off report instead of a run: each relocation mode's time against its memory cost")
    p.add_argument("--plot", metavar="PATH", help="with --compare: also draw the trade-off as a PNG")
    p.add_argument("--compare-encodings", action="store_true",
                   help="end to end per encoding instead of a run: one preserved set (--set-pattern, --preserve, "
                        "--ram) through every encoding: what the current kernel keeps for the map, the handover's "
                        "bytes, and the next kernel's modelled restore and free-list time on each path")
    p.add_argument("--set-pattern", choices=sorted(SET_PATTERNS), default="random",
                   help="with --compare-encodings: the preserved set's pattern (default random order-0 pages)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_quiet_option(p)
    p.set_defaults(func=run)


def _overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KHOError("EINVAL", f"--profile-set {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _s(seconds: float) -> str:
    return f"{seconds:.4f} s" if seconds >= 0.001 or seconds == 0 else f"{seconds * 1e6:.1f} µs"


def _t(seconds: float) -> str:
    """Seconds for a table whose header says (s)."""
    return f"{seconds:.4f}"


def run(args) -> int:
    report = load_profile(args.profile, _overrides(args.profile_set))
    out = Console(width=None if sys.stdout.isatty() else 80)
    if args.plot and not args.compare:
        raise KHOError("EINVAL", "--plot draws the --compare report")
    if args.show_profile:
        return _show_profile(report, args.json, out)
    if args.compare:
        return _compare(args, report, out)
    if args.compare_encodings:
        return _compare_encodings(args, report, out)
    config = sim.Config(ram=args.ram, page_size=args.page_size, kho_scratch=args.kho_scratch, preserve=args.preserve,
                        pattern=args.pattern, kernel=args.kernel, abi=args.abi, arch=args.arch,
                        relocation=args.relocation, linear_map=args.linear_map,
                        image_size=args.image_size, generations=args.generations, seed=args.seed,
                        checks=not args.no_checks, boot_path=args.boot_path, save_image=args.save_image, profile=report)
    config.validate()
    if not show_progress(args):
        result = sim.run(config)
    else:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("starting", total=None)
            result = sim.run(config, lambda stage, gen: bar.update(task, description=f"generation {gen}/{config.generations}: {stage}"))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_result(result, out)
    return 0 if result.ok else 1


def _print_result(result: sim.Result, out: Console) -> None:
    c, g1 = result.config, result.generations[0]
    moved = sum(s["memsz"] for s in g1.segments)
    system = "" if c.kernel_entry is None else f"Linux {c.kernel_entry.version} "
    out.print(f"[bold]kho simulate[/]: {system}{c.arch}, {format_size(c.ram)} RAM, {c.encoding}, {c.relocation} relocation, "
              f"{format_size(c.image_size)} kernel + initramfs, profile {escape(result.profile.profile.name)}")
    table = Table(title=f"Reboot timeline (modelled; {format_size(moved)} of segments, purgatory checks "
                        f"{'on' if c.checks else 'off'})")
    table.add_column("stage")  # one column a mode: the table fits 80 columns
    for mode in result.timelines:
        table.add_column(SHORT_LABEL[mode] + (" *" if mode == c.relocation else ""), justify="right",
                         style="bold" if mode == c.relocation else None)
    stages = (("shutdown (s)", lambda m, t: _t(t.shutdown_s)), ("relocation (s)", lambda m, t: _t(t.relocation_s)),
              ("purgatory (s)", lambda m, t: _t(t.purgatory_s)), ("startup (s)", lambda m, t: _t(t.startup_s)),
              ("KHO restore (s)", lambda m, t: _t(t.kho_restore_s)), ("free lists (s)", lambda m, t: _t(t.free_list_s)),
              ("total (s)", lambda m, t: _t(t.total_s)), ("relocation share", lambda m, t: f"{t.relocation_share:.1%}"),
              ("speedup", lambda m, t: f"{result.speedup(m):.2f}x"))
    for name, cell in stages:
        table.add_row(name, *(cell(m, t) for m, t in result.timelines.items()))
    out.print(table)
    restore = g1.boot.get("kho_restore")
    if restore:
        visits = (f"{restore['memblock_region_visits']:,} memblock region visits, "
                  f"{restore['counting_passes']:,} counting passes, {restore['doublings']} array doublings"
                  if restore["path"] == "memblock" else "no memblock call")
        out.print(f"Next kernel's KHO stages ({restore['path']} path, generation 1, modelled): {restore['units']:,} "
                  f"units, {restore['map_pages']:,} map pages, {visits}; restore {_s(restore['kho_restore_s'])}, "
                  f"free lists {_s(restore['free_list_s'])}.")
    note = "* simulated; the others modelled for the same segments.  Speedup is the whole reboot against MMU off"
    if c.checks:
        p = result.profile.profile
        bare = {m: reboot_timeline(p, m, moved, kho_restore_s=t.kho_restore_s, free_list_s=t.free_list_s).total_s
                for m, t in result.timelines.items()}
        note += (f"; without purgatory checks (--no-checks, as in the published runs): MMU on "
                 f"{bare['mmu-off'] / bare['mmu-on']:.2f}x, reserved {bare['mmu-off'] / bare['reserved']:.2f}x")
    out.print(note + ".")
    mem = Table(title="kexec memory (generation 1)")
    mem.add_column("what")
    mem.add_column("pages", justify="right")
    mem.add_column("bytes", justify="right")
    mem.add_column("held")
    ps = c.page_size
    pages = g1.kexec_pages
    mem.add_row("source pages (segment copy)", f"{pages['source']:,}", format_size(pages["source"] * ps), "until reboot")
    mem.add_row("indirection + control pages", f"{pages['indirection'] + pages['control']:,}",
                format_size((pages["indirection"] + pages["control"]) * ps), "until reboot")
    if g1.tables:
        levels = ", ".join(f"L{lvl}: {n}" for lvl, n in g1.tables["by_level"].items())
        mem.add_row(f"trans_pgd ({g1.tables['linear_map']}: {levels}; idmap {g1.tables['idmap_pages']})",
                    f"{g1.tables['pages']:,}", format_size(g1.tables["bytes"]), "until reboot")
    if g1.region:
        mem.add_row(f"kexeckernel= region at {g1.region['phys']:#x}", f"{g1.region['size'] // ps:,}",
                    format_size(g1.region["size"]), "forever")
    mem.add_row("KHO memory-map metadata", f"{g1.metadata_bytes // ps:,}", format_size(g1.metadata_bytes), "next kernel")
    out.print(mem)
    system = c.system
    ver = Table(title="Verification")  # one column a generation: the table fits 80 columns
    ver.add_column("generation")
    for g in result.generations:
        ver.add_column(str(g.index), justify="right")
    middle = ("kexec_count", "reserve_mem", "LUO liveupdate_num", "memfds") if system else ("vmalloc pages",)
    cells = [[format_size(g.preserved_pages * ps), f"{g.preserved_units:,}", f"{g.verify.folios:,}",
              format_size(g.verify.folio_bytes), *(_system_cells(g.verify) if system else (f"{g.verify.vmalloc_pages:,}",)),
              "skipped" if g.purgatory is None else ("ok" if g.purgatory["ok"] else "MISMATCH"),
              str(g.lost_units), str(g.leaked_units), "[green]ok[/]" if g.ok else "[red]FAILED[/]"]
             for g in result.generations]
    for i, name in enumerate(("preserved", "units", "folios", "verified", *middle, "purgatory SHA-256", "lost units",
                              "leaked units", "result")):
        ver.add_row(name, *(column[i] for column in cells))
    out.print(ver)
    if system:
        out.print(_system_note(result))
    for g in result.generations:
        for msg in g.boot.get("messages", []):
            out.print(f"generation {g.index} next kernel: {escape(msg)}")
        for failure in g.verify.failures[:10]:
            out.print(f"[red]generation {g.index}: {escape(failure)}[/]")
    if result.ok:
        n = len(result.generations)
        out.print(f"[green]{n} generation{'s' if n > 1 else ''} verified: every checksum matched, "
                  f"no preserved page lost or leaked.[/]")


def _system_cells(report) -> tuple[str, ...]:
    """The 7.x columns of one generation: kexec_count, reserve_mem regions revived intact,
    LUO's liveupdate_num, memfds verified."""
    regions = sum(1 for r in report.regions if r["contents_ok"])
    return ("-" if report.kexec_count is None else str(report.kexec_count), f"{regions} revived",
            "-" if report.liveupdate_num is None else str(report.liveupdate_num),
            f"{report.memfds}, {format_size(report.memfd_bytes)}")


def _system_note(result: sim.Result) -> str:
    """What the next kernels checked in a 7.x run, in one paragraph (names escaped)."""
    g = result.generations[-1].verify
    regions = ", ".join(f"{escape(r['name'])} {r['start']:#x} + {format_size(r['size'])}" for r in g.regions) or "none"
    csum = "-" if g.csum is None else f"{g.csum:#010x}"
    return (f"Each next kernel read every sub-node strictly: kexec-metadata (kexec_count counts the chained kexecs), "
            f"reserve_mem revived at the same address ({regions}; contents compared), the self-test's folios restored "
            f"(csum_partial recomputed, last {csum}), LUO's {g.sessions} sessions retrieved and every memfd restored and "
            f"compared (LUO serialized them at reboot).")


def _show_profile(report: FitReport, as_json: bool, out: Console) -> int:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    p = report.profile
    table = Table(title=f"Timing profile {escape(p.name)}")
    table.add_column("parameter")
    table.add_column("value", justify="right")
    table.add_column("derived from")
    rows = (("uncached_copy", f"{p.uncached_copy_bps / (1 << 20):.1f} MiB/s"),
            ("cached_copy", f"{p.cached_copy_bps / (1 << 20):.1f} MiB/s"),
            ("cache_clean", f"{p.cache_clean_bps / (1 << 20):.1f} MiB/s ({_s(4096 / p.cache_clean_bps)} a 4 KiB page)"),
            ("sha256", f"{p.sha256_bps / (1 << 20):.1f} MiB/s"),
            ("shutdown", _s(p.shutdown_s)), ("startup", _s(p.startup_s)))
    for key, value in rows:
        table.add_row(key, value, escape(report.derivation.get(key, "")))
    out.print(table)
    if p.next_kernel is not None:
        nk = Table(title=f"Next kernel's KHO restore costs ({escape(p.name)})")
        nk.add_column("parameter")
        nk.add_column("time", justify="right")
        nk.add_column("derived from")
        for key, value in p.next_kernel.to_dict().items():
            nk.add_row(key, f"{value * 1e9:,.2f} ns", escape(report.derivation.get(key, "")))
        out.print(nk)
    if report.rows:
        fit = Table(title="Fit to the measurements")
        for col in ("measurement", "quantity", "measured", "model", "error"):
            fit.add_column(col, justify="left" if col in ("measurement", "quantity") else "right")
        for r in report.rows:
            fmt = (lambda v: f"{v:.2f}x") if "speedup" in r.quantity else (
                (lambda v: f"{v:.1%}") if "share" in r.quantity else _s)
            fit.add_row(escape(r.label), escape(r.quantity), fmt(r.measured), fmt(r.modelled), f"{r.error:+.2%}")
        out.print(fit)
    for note in p.notes:
        out.print(f"note: {escape(note)}")
    return 0


def _compare(args, report: FitReport, out: Console) -> int:
    rows = sim.compare(args.ram, args.image_size, report, args.page_size, checks=not args.no_checks)
    base = next(r for r in rows if r.mode == "mmu-off")
    if args.plot:
        _plot(rows, args, report)
    if args.json:
        print(json.dumps({"ram": args.ram, "image_size": args.image_size, "profile": report.profile.name,
                          "modes": [{**r.to_dict(), "speedup_vs_mmu_off": base.total_s / r.total_s} for r in rows]}, indent=2))
        return 0
    table = Table(title=f"Relocation trade-off: {format_size(args.ram)} RAM, {format_size(args.image_size)} image, "
                        f"profile {escape(report.profile.name)}")
    for col in ("mode", "relocation", "reboot", "speedup", "memory cost", "held", "source copy"):
        table.add_column(col, justify="left" if col in ("mode", "held") else "right")
    labels = [MODE_LABEL[r.mode] + (f" ({r.linear_map})" if r.linear_map else "") for r in rows]
    for label, r in zip(labels, rows):
        table.add_row(label, _s(r.relocation_s), _s(r.total_s), f"{base.total_s / r.total_s:.2f}x",
                      format_size(r.memory_bytes), r.lifetime,
                      format_size(r.transient_bytes) if r.transient_bytes else "-")
    out.print(table)
    for label, r in zip(labels, rows):  # what each costs, below the table so that it fits 80 columns
        out.print(f"{label}: {r.detail}")
    if args.plot:
        out.print(f"plot written to {args.plot}")
    return 0


def _compare_encodings(args, report: FitReport, out: Console) -> int:
    """``--compare-encodings``: :func:`kho.benchmark.restore.compare_encodings` as a table or JSON."""
    point = Point(args.set_pattern, args.ram, args.preserve / args.ram if args.ram else 0.0)
    point.validate(args.page_size)
    result = compare_encodings(point, report, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    figures = result["set"]
    table = Table(title=f"End to end per encoding: {figures['units']:,} {args.set_pattern} units "
                        f"({format_size(figures['preserved_bytes'])} of {format_size(args.ram)}), profile {escape(result['profile'])}")
    for col in ("encoding", "path", "kept by current kernel", "handover", "kho_restore", "free_list", "next kernel",
                "memblock region visits"):
        table.add_column(col, justify="left" if col in ("encoding", "path") else "right")
    for e in result["encodings"]:
        if "error" in e:
            table.add_row(e["encoding"], "-", "-", e["error"], "-", "-", "-", "-")
            continue
        for path, c in e["paths"].items():
            table.add_row(e["encoding"], path, format_size(e["keep_bytes"]), format_size(e["handover_bytes"]), _s(c["kho_restore_s"]),
                          _s(c["free_list_s"]), _s(c["kho_restore_s"] + c["free_list_s"]),
                          f"{c.get('memblock_region_visits', 0):,}")
    out.print(table)
    out.print("kept: the serialized map plus kho's tracker, except the radix tree, which is the tracker in Linux 7.x; "
              "times: the next kernel's KHO stages under the profile (walk + memblock, free lists).")
    return 0


def _plot(rows, args, report: FitReport) -> None:
    try:
        import matplotlib
    except ImportError:
        raise KHOError("EINVAL", "--plot needs matplotlib (pip install 'kho[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:  # a legend, not labels beside the points: modes of equal cost and time would overlap
        label = MODE_LABEL[r.mode] + (f" ({r.linear_map})" if r.linear_map else "")
        marker = "s" if r.lifetime == "forever" else "o"
        ax.scatter(r.memory_bytes / (1 << 20), r.relocation_s * 1e3, marker=marker, s=60, alpha=0.8,
                   label=f"{label}: {format_size(r.memory_bytes)}, {r.relocation_s * 1e3:.3g} ms")
    ax.legend(fontsize=8, loc="best")
    ax.set_xscale("log")
    ax.set_xlabel("memory cost (MiB; squares: reserved forever, circles: until the reboot)")
    ax.set_ylabel("relocation time (ms)")
    ax.set_title(f"{format_size(args.ram)} RAM, {format_size(args.image_size)} image, profile {report.profile.name}")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_write(args.plot) as out:
        fig.savefig(out, dpi=120, format="png")
    plt.close(fig)
