"""Run the committed benchmark matrix and write everything into bench/results/.

What runs (each part can be chosen with ``--only``):

* ``sizes``: DESIGN.md section 5, computed (:mod:`kho.benchmark.design`);
* ``encodings``: every encoding on every pattern x preserved share {1, 5, 10, 25, 50} %
  at 16 GiB, plus the scale sweep of random 25 % at 1, 4, 16, 64 and 256 GiB (median of
  ``--runs``; one run at 256 GiB), each with the next kernel's free-list rebuild on its
  boot paths; the sweep's 1 TiB point comes from ``scale.json`` (``bench/bench_scale.py``)
  when it exists;
* ``reboot``: relocation mode x image size {10, 25, 47, 100, 250, 500 MiB, 1 GiB} x RAM
  {1, 8, 64, 256 GiB, 1 TiB}, profile stingray, and the whole simulated kexec in every
  mode at 1 and 8 GiB against the model.

Writes ``<part>.json``, ``<part>.md`` and the PNG plots, then ``README.md`` (the index).
About 7 minutes on 2 cores for everything; ``--quick`` runs a tiny matrix (seconds) to
check the pipeline; ``--replot`` only redraws from the JSON already written.

Usage: python bench/run_all.py [--out bench/results] [--only PART ...] [--runs N] [--quick] [--replot]
"""

from __future__ import annotations

import argparse
import os
import sys

from kho.benchmark import design, plots, report
from kho.benchmark import encodings as benc
from kho.benchmark import reboot as breboot
from kho.benchmark.progress import progress
from kho.benchmark.scale import as_point
from kho.encodings import load_all
from kho.simulation.preserved_sets import PATTERNS

GIB, MIB = 1 << 30, 1 << 20
PARTS = ("sizes", "encodings", "reboot")
MATRIX = {"rams": [16 * GIB], "shares": [0.01, 0.05, 0.10, 0.25, 0.50], "patterns": list(PATTERNS)}
SWEEP = {"pattern": "random", "share": 0.25, "rams": [1 * GIB, 4 * GIB, 16 * GIB, 64 * GIB], "single_run_rams": [256 * GIB]}
REBOOT = {"rams": [1 * GIB, 8 * GIB, 64 * GIB, 256 * GIB, 1 << 40],
          "images": [10 * MIB, 25 * MIB, 47 * MIB, 100 * MIB, 250 * MIB, 500 * MIB, 1 * GIB], "simulate_max_ram": 8 * GIB}
QUICK_MATRIX = {"rams": [1 * GIB], "shares": [0.01, 0.10], "patterns": ["random", "huge"]}
QUICK_SWEEP = {"pattern": "random", "share": 0.25, "rams": [1 * GIB, 2 * GIB], "single_run_rams": []}
QUICK_REBOOT = {"rams": [1 * GIB, 8 * GIB], "images": [10 * MIB, 47 * MIB], "simulate_max_ram": 1 * GIB}


def write(out: str, doc: dict) -> str:
    stem = os.path.join(out, doc["kind"])
    report.dump(doc, stem + ".json")
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(report.markdown(doc))
    return stem


def plot_encodings(out: str, doc: dict) -> None:
    """The encodings plots: sizes over the matrix's RAM, time over the sweep (and the scale
    run's 1 TiB point from ``scale.json`` when it is there)."""
    points, config = doc["results"], doc["config"]
    matrix, sweep = config["matrix"], config["sweep"]
    stem = os.path.join(out, "encodings")
    plots.bytes_vs_share([p for p in points if p["ram_bytes"] in matrix["rams"]], stem + "_bytes_vs_share.png")
    sweep_points = [p for p in report.measured(points) if p["pattern"] == sweep["pattern"] and p["share"] == sweep["share"]]
    scale_path = os.path.join(out, report.FILES["scale"])
    if os.path.exists(scale_path):
        extra = as_point(report.load(scale_path, "scale")["results"])
        if extra is not None and extra["pattern"] == sweep["pattern"] and extra["share"] == sweep["share"]:
            sweep_points.append(extra)
    plots.time_vs_scale(sweep_points, stem + "_time_vs_scale.png")


def replot(out: str) -> None:
    """Markdown and plots again from the JSON documents in ``out`` (nothing is measured)."""
    for kind, name in report.FILES.items():
        path = os.path.join(out, name)
        if not os.path.exists(path):
            continue
        doc = report.load(path, kind)
        write(out, doc)
        if kind == "encodings":
            plot_encodings(out, doc)
        elif kind == "reboot":
            plots.reboot_tradeoff(doc["results"], os.path.join(out, "reboot_tradeoff.png"))


def run_encodings(out: str, matrix: dict, sweep: dict, runs: int, seed: int, show: bool) -> None:
    names = benc.check_encodings(None)
    grid = [benc.Point(p, ram, s) for p in matrix["patterns"] for ram in matrix["rams"] for s in matrix["shares"]]
    swept = [benc.Point(sweep["pattern"], ram, sweep["share"]) for ram in sweep["rams"]]
    swept = [p for p in swept if p not in grid]
    single = [benc.Point(sweep["pattern"], ram, sweep["share"]) for ram in sweep["single_run_rams"]]
    total = (len(grid) + len(swept)) * benc.steps_per_point(names, runs) + len(single) * benc.steps_per_point(names, 1)
    with progress(total, show) as step:
        points = benc.run_points(grid + swept, names, runs, seed=seed, step=step)
        points += benc.run_points(single, names, 1, seed=seed, step=step)
    config = {"matrix": matrix, "sweep": sweep, "encodings": names, "runs": runs, "seed": seed}
    doc = report.document("encodings", config, points)
    write(out, doc)
    plot_encodings(out, doc)


def run_reboot(out: str, spec: dict, show: bool) -> None:
    with progress(breboot.steps(spec["rams"], spec["images"], spec["simulate_max_ram"]), show) as step:
        results = breboot.run_reboot(spec["rams"], spec["images"], simulate_max_ram=spec["simulate_max_ram"], step=step)
    stem = write(out, report.document("reboot", spec, results))
    plots.reboot_tradeoff(results, stem + "_tradeoff.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a tiny matrix, to check the pipeline")
    parser.add_argument("--replot", action="store_true", help="only rewrite markdown, plots and index from the JSON in --out")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    load_all()
    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        replot(args.out)
        print(f"replotted {args.out}; index {report.write_index(args.out)}")
        return 0
    show = sys.stderr.isatty()
    if "sizes" in args.only:
        write(args.out, report.document("sizes", {"seed": args.seed}, design.design_sizes(args.seed)))
    if "encodings" in args.only:
        run_encodings(args.out, QUICK_MATRIX if args.quick else MATRIX, QUICK_SWEEP if args.quick else SWEEP,
                      args.runs, args.seed, show)
    if "reboot" in args.only:
        run_reboot(args.out, QUICK_REBOOT if args.quick else REBOOT, show)
    print(f"results in {args.out}; index {report.write_index(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
