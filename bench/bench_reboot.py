"""Benchmark of the modelled arm64 kexec reboot (issue 6).

Reports:
- the stingray calibration: every published figure against the fitted model;
- transitional-table sizes (counted by building the plan) for 1 GiB .. 1 TiB of RAM with a
  page-granular, 2 MiB-block and largest-block linear map, and the seconds to plan them;
- the default ``kho simulate`` (8 GiB, 47 MB image, kho-v2, mmu-on, stingray): host seconds
  per stage and in all (median of ``--runs``), pages relocated, tables built, and the
  modelled reboot timeline of each mode;
- host relocation throughput (pages copied a second) for mmu-off and mmu-on.

Run: ``python bench/bench_reboot.py [--runs N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from kho.kexec import transpgd
from kho.kexec.profiles import load_profile
from kho.simulation import simulate as S

GIB, MIB = 1 << 30, 1 << 20


def calibration() -> list[dict]:
    return [r.to_dict() for r in load_profile("stingray").rows]


def tables() -> list[dict]:
    out = []
    for ram in (1 * GIB, 8 * GIB, 64 * GIB, 1024 * GIB):
        for linear_map in transpgd.LINEAR_MAPS:
            start = time.perf_counter()
            plan = transpgd.plan_linear_map([(0, ram)], 4096, linear_map)
            out.append({"ram": ram, "linear_map": linear_map, "tables": plan.nr_tables, "bytes": plan.table_bytes,
                        "idmap_pages": transpgd.idmap_pages_needed(4096), "plan_s": time.perf_counter() - start})
    return out


def simulate(runs: int) -> dict:
    walls, results = [], []
    for _ in range(runs):
        start = time.perf_counter()
        results.append(S.run(S.Config()))
        walls.append(time.perf_counter() - start)
    result = results[-1]
    g = result.generations[0]
    stages = {k: statistics.median(r.generations[0].host_s[k] for r in results) for k in g.host_s}
    return {"wall_s": statistics.median(walls), "stages_s": stages, "ok": result.ok,
            "pages_relocated": g.relocation["pages_copied"], "tables": g.tables,
            "timelines": {m: {**t.to_dict(), "speedup_vs_mmu_off": result.speedup(m)} for m, t in result.timelines.items()}}


def relocation_throughput() -> dict:
    out = {}
    for mode in ("mmu-off", "mmu-on"):
        result = S.run(S.Config(relocation=mode, checks=False, preserve=16 * MIB))
        g = result.generations[0]
        out[mode] = {"pages": g.relocation["pages_copied"], "host_s": g.host_s["relocation"],
                     "pages_per_s": g.relocation["pages_copied"] / g.host_s["relocation"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {"calibration": calibration(), "tables": tables(), "simulate_default": simulate(args.runs),
              "relocation_throughput": relocation_throughput()}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("stingray calibration (published vs model):")
    for r in report["calibration"]:
        print(f"  {r['label']:<48} {r['quantity']:<28} {r['measured']:>10.6f} {r['modelled']:>10.6f} {r['error']:+.2%}")
    print("transitional tables (4 KiB pages; + idmap pages):")
    for t in report["tables"]:
        print(f"  {t['ram'] // GIB:>5} GiB {t['linear_map']:<6} {t['tables']:>8,} pages = {t['bytes'] / MIB:>10.3f} MiB"
              f"  (+{t['idmap_pages']} idmap)  planned in {t['plan_s'] * 1e3:.1f} ms")
    sim = report["simulate_default"]
    print(f"kho simulate (defaults): {sim['wall_s']:.2f} s wall, median of {args.runs}; ok={sim['ok']}")
    for stage, secs in sim["stages_s"].items():
        print(f"  {stage:<18} {secs:.3f} s")
    print(f"  relocated {sim['pages_relocated']:,} pages; tables {sim['tables']['pages']:,} pages "
          f"({sim['tables']['bytes'] / MIB:.2f} MiB)")
    for mode, t in sim["timelines"].items():
        print(f"  model {mode:<9} shutdown {t['shutdown_s']:.4f}  relocation {t['relocation_s']:.4f}  "
              f"purgatory {t['purgatory_s']:.4f}  startup {t['startup_s']:.4f}  total {t['total_s']:.4f}  "
              f"speedup {t['speedup_vs_mmu_off']:.2f}x")
    for mode, t in report["relocation_throughput"].items():
        print(f"host relocation {mode}: {t['pages']:,} pages in {t['host_s']:.3f} s = {t['pages_per_s']:,.0f} pages/s")


if __name__ == "__main__":
    main()
