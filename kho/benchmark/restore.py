"""The next kernel's KHO restore, modelled: time against the number of preserved units, where
the memblock path crosses a second and a minute, and every encoding end to end.

* :func:`restore_curve` — predicted ``kho_restore_s`` (walk + memblock) of fragmented (no
  two units touch) and adjacent (one run of pages) order-0 sets from 1k to 4M units, on
  the memblock path (the kernel's radix walk) and the instruction path, for a profile;
* :func:`crossing` — the fewest fragmented units whose memblock path takes a given time;
* :func:`held_out` — the model's prediction for the interleaved runs kept out of the fit;
* :func:`compare_encodings` — one preserved set through every encoding: what the current
  kernel keeps for the map, the handover's bytes, and the next kernel's modelled restore
  and free-list time on each path that reads it (booting kho's next kernel on each);
* :func:`plot_curve` — the curve as a PNG with the real-kernel points marked.

The sets of the curve sit between the 16 regions the real-kernel reconstructions reserve
before the walk (:func:`kho.nextkernel.memblock_cost.timing_run_layout`), 8 below and 8 above.  Counting is
O(R n) numpy work a set (:func:`~kho.nextkernel.memblock_cost.count_memblock`).
"""

from __future__ import annotations

import numpy as np

from kho.benchmark.encodings import Point, boot_paths, check_encodings, prepare
from kho.benchmark.progress import Step, no_progress
from kho.errors import KHOError
from kho.handover.outgoing import KHO
from kho.kexec.profiles import qemu_tcg_timing
from kho.kexec.timing import FitReport, NextKernelCosts
from kho.nextkernel.boot import boot
from kho.nextkernel.memblock_cost import (
    INSTRUCTIONS_PATH,
    MEMBLOCK_PATH,
    RADIX_COMPATIBLES,
    TIMING_BASE_ABOVE,
    TIMING_BASE_BELOW,
    TIMING_MEMFD_AT,
    adjacent_units,
    boot_restore_cost,
    count_memblock,
    fragmented_units,
    radix_pages,
    restore_cost,
    timing_run_layout,
)

#: Unit counts of the curve: 1k .. 4M, powers of two.
CURVE_UNITS = tuple(1 << k for k in range(10, 23))
KINDS = {"fragmented": fragmented_units, "adjacent": adjacent_units}
#: Interleaved runs measured on the real kernel but kept out of the fit (memfd pages).
HELD_OUT_PAGES = (65536, 131072)


#: Where the curve's 8 regions above the preserved set start (bytes): above any set it draws.
CURVE_BASE_ABOVE_AT = 1 << 40


def _base_regions():
    """The reconstructions' 16 one-page regions: 8 below the set, 8 moved above the largest set."""
    above = tuple(CURVE_BASE_ABOVE_AT + a - TIMING_BASE_ABOVE[0] for a in TIMING_BASE_ABOVE)
    base = np.array(TIMING_BASE_BELOW + above, np.uint64)
    return base, np.full(base.size, 4096, np.uint64), np.zeros(base.size, np.int64)


def curve_counts(units: tuple[int, ...] = CURVE_UNITS, kinds: tuple[str, ...] = tuple(KINDS),
                 step: Step = no_progress) -> list[dict]:
    """For each kind and unit count: the set's memblock counts and radix map pages (profile-free)."""
    out = []
    for kind in kinds:
        for n in units:
            step(f"count {kind} {n:,}")
            phys, size = KINDS[kind](n, TIMING_MEMFD_AT)
            counts = count_memblock(phys, size, _base_regions())
            out.append({"kind": kind, "units": n, "map_pages": radix_pages(phys, np.zeros(n, np.int64)), "counts": counts})
    return out


def restore_curve(costs: NextKernelCosts, counted: list[dict]) -> list[dict]:
    """``kho_restore_s`` of each counted set (:func:`curve_counts`) on both paths under ``costs``."""
    rows = []
    for c in counted:
        for path in (MEMBLOCK_PATH, INSTRUCTIONS_PATH):
            r = restore_cost(costs, path, c["units"], c["map_pages"], c["counts"], 0, 0, 0)
            rows.append({"kind": c["kind"], "units": c["units"], "path": path, "kho_restore_s": r.kho_restore_s,
                         "reserve_s": r.reserve_s, "noinit_s": r.noinit_s, "walk_s": r.walk_s,
                         "memblock_region_visits": c["counts"].region_visits if path == MEMBLOCK_PATH else 0})
    return rows


def _fragmented_s(costs: NextKernelCosts, n: int) -> float:
    phys, size = fragmented_units(n, TIMING_MEMFD_AT)
    counts = count_memblock(phys, size, _base_regions())
    return restore_cost(costs, MEMBLOCK_PATH, n, radix_pages(phys, np.zeros(n, np.int64)), counts, 0, 0, 0).kho_restore_s


def crossing(costs: NextKernelCosts, seconds: float, limit: int = CURVE_UNITS[-1]) -> int | None:
    """The fewest fragmented order-0 units whose memblock-path restore takes ``seconds`` or
    more (doubling from 1k units, then bisection over the exact counts; the time grows with
    the units), None above ``limit``."""
    hi = CURVE_UNITS[0]
    while _fragmented_s(costs, hi) < seconds:
        if hi >= limit:
            return None
        hi = min(2 * hi, limit)
    lo = hi // 2 + 1 if hi > CURVE_UNITS[0] else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _fragmented_s(costs, mid) >= seconds:
            hi = mid
        else:
            lo = mid + 1
    return lo


def held_out(costs: NextKernelCosts) -> list[dict]:
    """Predicted restore of the interleaved runs kept out of the fit: their memfd pages plus
    KHO's own units grown as in the fitted runs (1/256 of the pages for the memfd's folio
    array, and 23 more), ending with every memfd page its own region."""
    out = []
    for pages in HELD_OUT_PAGES:
        units = pages + pages // 256 + 23
        phys, size, base = timing_run_layout("interleaved", pages, units, 16 + pages + 1 + 22)
        counts = count_memblock(phys, size, base)
        r = restore_cost(costs, MEMBLOCK_PATH, units, radix_pages(phys, np.zeros(units, np.int64)), counts, 0, 0, 0)
        out.append({"run": f"interleaved_{pages}", "units": units, "kho_restore_s": r.kho_restore_s,
                     "reserve_s": r.reserve_s, "noinit_s": r.noinit_s})
    return out


def measured_points() -> list[dict]:
    """The real-kernel runs of the fit: units and measured total seconds, by kind."""
    return [{"run": r["run"], "kind": "fragmented" if r["kind"] == "interleaved" else "adjacent", "units": r["units"],
             "total_s": r["total_s"]} for r in qemu_tcg_timing()["runs"]]


def _keeps_separate_tracker(compatible: str) -> bool:
    """False for the radix tree: in Linux 7.x it is the tracker itself (stateless KHO); every
    other map is serialized from kho's tracker, which the kernel holds too."""
    return compatible not in RADIX_COMPATIBLES


def compare_encodings(point: Point, profile: FitReport, encodings=None, *, seed: int = 1,
                      step: Step = no_progress) -> dict:
    """``point``'s set through every encoding (default: all registered), end to end.

    Per encoding: ``keep_bytes`` (what the current kernel holds for the map until the
    reboot: the serialized map, plus kho's tracker unless the map is the tracker),
    ``handover_bytes`` (map pages + FDT bytes), and per next-kernel path that reads it the
    modelled ``kho_restore_s``, ``free_list_s`` and counts (a real boot of kho's next
    kernel gives the units, regions and free lists).  An encoding whose handover fails
    (E2BIG, ENOMEM) is listed with the error.  O(encodings x boot)."""
    costs = profile.profile.next_kernel
    names = check_encodings(encodings)
    machine, tracker, _, _, figures = prepare(point, seed=seed)
    tracker_bytes = figures["tracker_bytes"]
    rows = []
    for name in names:
        step(f"{name}: handover")
        kho = KHO(machine.memory, machine.allocator, name)
        kho.tracker = tracker
        try:
            handover = kho.finalize()
        except KHOError as err:
            rows.append({"encoding": name, "error": f"{err.errno_name}: {err.message}"})
            continue
        encoded = handover.encoded
        row = {"encoding": name, "handover_bytes": encoded.total_bytes,
               "keep_bytes": encoded.total_bytes + (tracker_bytes if _keeps_separate_tracker(encoded.compatible) else 0), "paths": {}}
        for path in boot_paths(name):
            step(f"{name}: boot, {path} path")
            nk = boot(machine.memory, handover.boot_dtb(), path, encoding_options=handover.options, seed=seed)
            if not nk.revived:
                raise KHOError("EINVAL", f"{name} on the {path} path: {'; '.join(nk.messages)}")
            row["paths"][path] = boot_restore_cost(nk, costs, int(encoded.metadata_pages.size)).to_dict()
            del nk
        rows.append(row)
        for page in handover.pages_to_keep().tolist():
            machine.memory.discard(page, machine.memory.page_size)
            machine.allocator.free_pages(page, 0)
    return {"set": figures, "profile": profile.profile.name, "encodings": rows}


def plot_curve(curves: dict[str, list[dict]], crossings: dict[str, dict], path: str) -> None:
    """The predicted restore against units, one panel per profile (``curves``: profile name ->
    :func:`restore_curve` rows), 1 s and 1 min marked, the real-kernel points on qemu-tcg-x86."""
    try:
        import matplotlib
    except ImportError:
        raise KHOError("EINVAL", "plotting needs matplotlib (pip install 'kho[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6.2 * len(curves), 4.8), squeeze=False)
    styles = {("fragmented", MEMBLOCK_PATH): ("C3", "-"), ("adjacent", MEMBLOCK_PATH): ("C0", "-"),
              ("fragmented", INSTRUCTIONS_PATH): ("C2", "--"), ("adjacent", INSTRUCTIONS_PATH): ("C1", ":")}
    for ax, (name, rows) in zip(axes[0], curves.items()):
        for (kind, boot_path), (color, line) in styles.items():
            sel = [r for r in rows if r["kind"] == kind and r["path"] == boot_path]
            ax.plot([r["units"] for r in sel], [r["kho_restore_s"] for r in sel], line, color=color, lw=1.8,
                    label=f"{boot_path} path, {kind}")
        if name == "qemu-tcg-x86":
            for p in measured_points():
                ax.scatter(p["units"], p["total_s"], marker="x" if p["kind"] == "fragmented" else "o", s=50,
                           color="k", zorder=5)
            ax.scatter([], [], marker="x", color="k", label="Linux 7.3 measured (interleaved)")
            ax.scatter([], [], marker="o", color="k", label="Linux 7.3 measured (contiguous)")
        for seconds, label in ((1, "1 s"), (60, "1 min")):
            ax.axhline(seconds, color="grey", lw=0.8, ls="--")
            n = crossings[name].get(label)
            ax.text(CURVE_UNITS[0], seconds * 1.15, f"{label}" + (f": {n:,} fragmented units" if n else ""),
                    fontsize=8, color="grey")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("preserved order-0 units")
        ax.set_ylabel("predicted next-kernel KHO restore (s)")
        ax.set_title(f"profile {name}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the whole benchmark -------------------------------------------------------------------------

#: Profiles the benchmark predicts for.
PROFILES = ("qemu-tcg-x86", "stingray")
#: The kernel-scale set: 16 GiB of random order-0 pages in 64 GiB (4,194,304 units), and the
#: encodings it goes through end to end.
SCALE_POINT = Point("random", 64 << 30, 0.25)
SCALE_ENCODINGS = ("kho-v1", "kho-v2", "instructions")


def run(profiles: dict[str, FitReport], units: tuple[int, ...] = CURVE_UNITS, scale: Point | None = SCALE_POINT,
        step: Step = no_progress) -> dict:
    """Everything the benchmark reports: the curve, crossings and held-out predictions per
    profile, the fit of ``qemu-tcg-x86``, and ``scale`` end to end on ``stingray`` (None skips it)."""
    counted = curve_counts(units, step=step)
    out = {"units": list(units), "profiles": {}, "measured": measured_points()}
    for name, report in profiles.items():
        costs = report.profile.next_kernel
        step(f"{name}: crossings")
        out["profiles"][name] = {
            "next_kernel": costs.to_dict(), "derivation": {k: v for k, v in report.derivation.items() if k.endswith("_s")},
            "curve": restore_curve(costs, counted),
            "crossings": {"1 s": crossing(costs, 1.0), "1 min": crossing(costs, 60.0)},
            "held_out": held_out(costs),
            "fit": [r.to_dict() for r in report.rows if r.label in {p["run"] for p in out["measured"]}],
            "notes": list(report.profile.notes),
        }
    if scale is not None and "stingray" in profiles:
        step("stingray: 16 GiB random in 64 GiB, end to end")
        out["scale"] = compare_encodings(scale, profiles["stingray"], SCALE_ENCODINGS, step=step)
    return out


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds:.3g} s"


def markdown(res: dict, machine_line: str) -> str:
    """The benchmark's results as markdown tables."""
    lines = ["# Next-kernel KHO restore, modelled\n", (f"{machine_line}  Times are the model's predictions (seconds of "
                                                         "the next kernel), computed from exact counts of the kernel's "
                                                         "memblock work.\n")]
    for name, p in res["profiles"].items():
        lines.append(f"## Profile {name}\n")
        cr = p["crossings"]
        lines.append(f"The memblock path (fragmented order-0 units) crosses 1 s at {cr['1 s']:,} units and 1 min at "
                     f"{cr['1 min']:,} units.\n" if cr["1 min"] else "")
        lines.append("| units | memblock, fragmented | memblock, adjacent | instructions | region visits (fragmented) |")
        lines.append("|---:|---:|---:|---:|---:|")
        by = {(r["kind"], r["path"], r["units"]): r for r in p["curve"]}
        for n in res["units"]:
            f, a, i = by[("fragmented", "memblock", n)], by[("adjacent", "memblock", n)], by[("fragmented", "instructions", n)]
            lines.append(f"| {n:,} | {_s(f['kho_restore_s'])} | {_s(a['kho_restore_s'])} | {_s(i['kho_restore_s'])} | "
                         f"{f['memblock_region_visits']:,} |")
        lines.append("\nInterleaved runs measured on the real kernel but kept out of the fit, predicted: " + "; ".join(
            f"{h['run']} ({h['units']:,} units) {_s(h['kho_restore_s'])}" for h in p["held_out"]) + ".\n")
        if p["fit"]:
            lines.append("Fit to the real kernel (Linux 7.3, QEMU TCG):\n")
            lines.append("| run | quantity | measured | model | error |")
            lines.append("|---|---|---:|---:|---:|")
            for r in p["fit"]:
                lines.append(f"| {r['label']} | {r['quantity']} | {r['measured']:.4g} s | {r['modelled']:.4g} s | "
                             f"{r['error']:+.1%} |")
            lines.append("")
            lines += [f"Note: {n}.\n" for n in p.get("notes", [])]
        lines.append("| constant | seconds | derivation |")
        lines.append("|---|---:|---|")
        for key, value in p["next_kernel"].items():
            lines.append(f"| {key} | {value:.4g} | {p['derivation'].get(key, '')} |")
        lines.append("")
    if "scale" in res:
        sc = res["scale"]
        lines.append(f"## End to end on {sc['profile']}: {sc['set']['units']:,} random order-0 units "
                     f"({sc['set']['preserved_bytes'] >> 30} GiB in {sc['set']['ram_bytes'] >> 30} GiB)\n")
        lines.append("| encoding | path | kept by the current kernel | handover | kho_restore_s | free_list_s | "
                     "memblock region visits |")
        lines.append("|---|---|---:|---:|---:|---:|---:|")
        for e in sc["encodings"]:
            if "error" in e:
                lines.append(f"| {e['encoding']} | - | - | {e['error']} | - | - | - |")
                continue
            for path, c in e["paths"].items():
                lines.append(f"| {e['encoding']} | {path} | {e['keep_bytes'] / (1 << 20):,.1f} MiB | "
                             f"{e['handover_bytes'] / (1 << 20):,.1f} MiB | {_s(c['kho_restore_s'])} | "
                             f"{_s(c['free_list_s'])} | {c.get('memblock_region_visits', 0):,} |")
        lines.append("")
    return "\n".join(lines)
