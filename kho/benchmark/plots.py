"""PNG plots of benchmark results (matplotlib, the ``plot`` extra; Agg backend, no display).

* :func:`bytes_vs_share` — map bytes against the preserved share, one panel a pattern,
  one line an encoding;
* :func:`time_vs_scale` — encode, decode and free-list rebuild seconds against RAM size;
* :func:`reboot_tradeoff` — reboot time against image size per relocation mode, and the
  memory each mode costs against RAM size.

Every function takes result dicts as :mod:`kho.benchmark.report` documents hold them,
writes one PNG (about 100 KB) and returns its path.  KHOError(EINVAL) when matplotlib is
missing or there is nothing to plot.
"""

from __future__ import annotations

from typing import Sequence

from kho.benchmark.design import BUDGET as DESIGN_BUDGET
from kho.benchmark.report import measured
from kho.errors import KHOError
from kho.files import atomic_write
from kho.sizes import format_size

#: Line style per boot path.
PATH_STYLE = {"memblock": "-", "instructions": "--"}
DPI = 100


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise KHOError("EINVAL", "plots need matplotlib (pip install 'kho[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: Sequence[str]) -> dict[str, tuple]:
    """A fixed colour per encoding name (tab10, in sorted name order)."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(sorted(names))}


def _markers(names: Sequence[str]) -> dict[str, str]:
    """A fixed marker per encoding name (in sorted name order), so that lines that coincide
    stay distinguishable."""
    return {name: "os^Dvp*X"[i % 8] for i, name in enumerate(sorted(names))}


def _encodings(points: Sequence[dict]) -> list[str]:
    return sorted({e["encoding"] for p in points for e in p["encodings"]})


def _bytes_axis(ax) -> None:
    """A log y axis labelled in binary units at powers of 1024 and 4 between them."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator([1 << s for s in range(0, 61, 2)]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_size(int(v)) if v >= 1 else ""))
    ax.yaxis.set_minor_locator(FixedLocator([]))


def _seconds_axis(ax, multipliers: Sequence[int] = (1, 2, 5)) -> None:
    """A log y axis in seconds with ticks at ``multipliers`` times powers of ten."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator([m * 10.0 ** e for e in range(-6, 4) for m in multipliers]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g} s"))
    ax.yaxis.set_minor_locator(FixedLocator([]))


def _label_panel(ax, xlabel: str, ylabel: str, title: str, grid: str) -> None:
    """Axis labels, a title, a grid on the ``grid`` ticks ("major" or "both") and a legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which=grid, alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: str) -> str:
    with atomic_write(path) as out:
        fig.savefig(out, dpi=DPI, format="png")
    _pyplot().close(fig)
    return path


def _log2_ram_axis(ax, rams: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(rams))
    ax.set_xticklabels([format_size(r).replace(" ", "\n") for r in sorted(rams)], fontsize=8)
    ax.minorticks_off()


def _ram_range(rams: Sequence[int]) -> str:
    """``64 GiB`` or ``1 GiB to 1 TiB``: the RAM sizes a panel covers."""
    low, high = min(rams), max(rams)
    return format_size(low) if low == high else f"{format_size(low)} to {format_size(high)}"


def bytes_vs_share(points: Sequence[dict], path: str) -> str:
    """Map bytes against preserved share for every pattern among ``points`` at one RAM size
    (the size with the most points).  Hollow markers: the handover could not be built."""
    plt = _pyplot()
    points = measured(points)
    if not points:
        raise KHOError("EINVAL", "no encoding results to plot")
    by_ram: dict[int, list[dict]] = {}
    for p in points:
        by_ram.setdefault(p["ram_bytes"], []).append(p)
    ram, chosen = max(by_ram.items(), key=lambda kv: (len(kv[1]), kv[0]))
    patterns = list(dict.fromkeys(p["pattern"] for p in chosen))
    page_size = chosen[0]["page_size"]
    names = _encodings(chosen)
    colors, markers = _colors(names), _markers(names)
    cols = min(3, len(patterns) + 1)
    rows = -(-(len(patterns) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    flat = axes.ravel()
    for ax, pattern in zip(flat, patterns):
        pts = sorted((p for p in chosen if p["pattern"] == pattern), key=lambda p: p["share"])
        for name in names:
            xs, ys, hollow = [], [], []
            for p in pts:
                e = next((e for e in p["encodings"] if e["encoding"] == name), None)
                if e is not None:
                    xs.append(p["share"] * 100)
                    ys.append(e["total_bytes"])
                    hollow.append(e["handover"] not in (None, "ok"))
            ax.plot(xs, ys, "-", color=colors[name], lw=1.6)
            for x, y, h in zip(xs, ys, hollow):
                ax.plot(x, y, markers[name], ms=5, color=colors[name], mfc="white" if h else colors[name])
        ax.axhline(page_size, color="grey", ls=":", lw=1)  # the kernel's KHO root FDT: one page
        ax.axhline(DESIGN_BUDGET, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        shares = [p["share"] * 100 for p in pts]
        ax.set_xticks(shares)
        ax.set_xticklabels([f"{s:g}%" for s in shares], fontsize=8)
        ax.minorticks_off()
        _bytes_axis(ax)
        ax.set_title(f"{pattern}: {shares[0]:g}% to {shares[-1]:g}% of {format_size(ram)}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    for ax in flat[len(patterns):]:
        ax.axis("off")
    legend_ax = flat[len(patterns)]
    handles = [plt.Line2D([], [], color=colors[n], marker=markers[n], lw=1.6, label=n) for n in names]
    handles += [plt.Line2D([], [], color="grey", marker="o", mfc="white", lw=0, label="handover impossible"),
                plt.Line2D([], [], color="grey", ls=":", label=f"one FDT page ({format_size(page_size)})"),
                plt.Line2D([], [], color="grey", ls="--", label="512 KiB (design discussion)")]
    legend_ax.legend(handles=handles, loc="center", frameon=False, fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("map bytes (log)")
    for ax in axes[-1, :]:
        ax.set_xlabel("preserved share of RAM")
    fig.suptitle(f"Preservation-map size by encoding, {format_size(ram)} RAM", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def time_vs_scale(points: Sequence[dict], path: str) -> str:
    """Encode, decode and rebuild seconds against RAM for the pattern and share among
    ``points`` with the most RAM sizes.  Rebuild: solid = memblock path, dashed =
    instruction path."""
    plt = _pyplot()
    points = measured(points)
    if not points:
        raise KHOError("EINVAL", "no encoding results to plot")
    groups: dict[tuple, dict[int, dict]] = {}
    for p in points:
        groups.setdefault((p["pattern"], p["share"]), {})[p["ram_bytes"]] = p
    chosen = max(groups.values(), key=len)
    pts = [chosen[ram] for ram in sorted(chosen)]
    names = _encodings(pts)
    colors, markers = _colors(names), _markers(names)
    rams = [p["ram_bytes"] for p in pts]
    panels = (("encode", lambda e: {"": e["encode_s"]}), ("decode", lambda e: {"": e["decode_s"]}),
              ("free-list rebuild (next kernel)", lambda e: {k: v["rebuild_s"] for k, v in e["paths"].items()}))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True)
    for ax, (title, values) in zip(axes, panels):
        for name in names:
            series: dict[str, tuple[list, list]] = {}
            for p in pts:
                e = next((e for e in p["encodings"] if e["encoding"] == name), None)
                for key, secs in (values(e) if e else {}).items():
                    xs, ys = series.setdefault(key, ([], []))
                    xs.append(p["ram_bytes"])
                    ys.append(secs)
            for key, (xs, ys) in series.items():
                ax.plot(xs, ys, PATH_STYLE.get(key, "-"), marker=markers[name], ms=4, color=colors[name], lw=1.6)
        _log2_ram_axis(ax, rams)
        _seconds_axis(ax, (1,))
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("RAM")
    axes[0].set_ylabel("median wall clock (log)")
    handles = [plt.Line2D([], [], color=colors[n], marker=markers[n], lw=1.6, label=n) for n in names]
    handles += [plt.Line2D([], [], color="grey", ls=s, label=f"{k} path") for k, s in PATH_STYLE.items()]
    fig.legend(handles=handles, fontsize=8, loc="center right", frameon=False)
    p0 = pts[0]
    fig.suptitle(f"Time against scale: {p0['pattern']} pattern, {p0['share']:.0%} of RAM preserved, "
                 f"RAM {_ram_range(rams)} (median of the runs)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    return _save(fig, path)


def _mode_label(row: dict) -> str:
    label = {"mmu-off": "MMU off", "mmu-on": "MMU on", "reserved": "reserved kexeckernel="}[row["mode"]]
    return label + (f" ({row['linear_map']} tables)" if row["linear_map"] else "")


def reboot_tradeoff(results: dict, path: str, image: int | None = None) -> str:
    """Left: whole reboot time against image size for each mode (the times do not depend
    on RAM).  Right: memory cost against RAM for ``image`` (default:
    the image closest to 47 MiB, the published one); dashed = reserved forever."""
    plt = _pyplot()
    rows = results["rows"]
    if not rows:
        raise KHOError("EINVAL", "no reboot results to plot")
    images = sorted({r["image_bytes"] for r in rows})
    image = image if image is not None else min(images, key=lambda i: abs(i - (47 << 20)))
    labels = list(dict.fromkeys(_mode_label(r) for r in rows))
    cmap = plt.get_cmap("tab10")
    colors = {label: cmap(i) for i, label in enumerate(labels)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.6))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        first: dict[int, dict] = {}  # image -> a row of this mode (the times do not depend on RAM)
        for r in rows:
            if r["mode"] == mode and r["linear_map"] in (None, "page"):
                first.setdefault(r["image_bytes"], r)
        sel = [first[i] for i in sorted(first)]
        label = {"mmu-off": "MMU off", "mmu-on": "MMU on (any tables)", "reserved": "reserved kexeckernel="}[mode]
        left.plot([r["image_bytes"] for r in sel], [r["total_s"] for r in sel], "-o", ms=4, lw=1.8,
                  color=colors[_mode_label(sel[0])], label=label)
    left.set_xscale("log")
    left.set_xticks(images)
    left.set_xticklabels([format_size(i) for i in images], fontsize=8)
    left.minorticks_off()
    _seconds_axis(left)
    all_rams = sorted({r["ram_bytes"] for r in rows})
    _label_panel(left, "kernel + initramfs (log)", "whole reboot (modelled, log)",
                 f"Reboot time, profile {results['profile']['name']}\n(the same for every RAM size: "
                 f"{_ram_range(all_rams)})", grid="both")
    for label in labels:
        sel = sorted((r for r in rows if r["image_bytes"] == image and _mode_label(r) == label), key=lambda r: r["ram_bytes"])
        if not sel:
            continue
        forever = sel[0]["lifetime"] == "forever"
        right.plot([r["ram_bytes"] for r in sel], [r["memory_bytes"] for r in sel], "--" if forever else "-",
                   marker="s" if forever else "o", ms=4, lw=1.8, color=colors[label], label=label)
    _log2_ram_axis(right, sorted({r["ram_bytes"] for r in rows if r["image_bytes"] == image}))
    _bytes_axis(right)
    _label_panel(right, "RAM", "memory cost (log)", f"Memory cost, {format_size(image)} image, RAM {_ram_range(all_rams)}\n"
                 "(dashed: reserved forever; solid: only until the reboot)", grid="major")
    fig.suptitle("Relocation trade-off: MMU off vs MMU-on transitional tables vs a reserved region", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)
