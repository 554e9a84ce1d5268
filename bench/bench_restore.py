"""Benchmark: the next kernel's KHO restore, predicted from the kernel's memblock work.

For the profiles ``qemu-tcg-x86`` (fitted to a real Linux 7.3 kernel under QEMU TCG) and
``stingray`` (derived from its memory bandwidth): the predicted ``kho_restore_s`` of
fragmented and adjacent order-0 sets from 1k to 4M units on the memblock path (the kernel's
radix walk, one memblock_reserve + memblock_reserved_mark_noinit per unit) and on the
instruction path, where the memblock path crosses one second and one minute, the
predictions for the real-kernel runs kept out of the fit, and 16 GiB of random pages in
64 GiB (4,194,304 units) end to end on Stingray.

Usage: python bench/bench_restore.py [--out bench/results] [--no-scale]
Writes restore.json, restore.md and restore.png (about 3 minutes here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kho.benchmark import restore as R
from kho.benchmark.environment import machine_info
from kho.benchmark.progress import progress
from kho.benchmark.report import machine_line
from kho.kexec.profiles import load_profile


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--no-scale", action="store_true", help="skip the 64 GiB end-to-end run")
    args = parser.parse_args(argv)
    profiles = {name: load_profile(name) for name in R.PROFILES}
    with progress(4 + 2 * len(R.CURVE_UNITS) + 2 * len(R.PROFILES) + 8, sys.stderr.isatty()) as step:
        res = R.run(profiles, scale=None if args.no_scale else R.SCALE_POINT, step=step)
    doc = {"schema": "kho-bench/1", "kind": "restore", "machine": machine_info(), "config": {"profiles": list(R.PROFILES)},
           "results": res}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "restore.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.out, "restore.md"), "w", encoding="utf-8") as f:
        f.write(R.markdown(res, machine_line(doc)))
    R.plot_curve({n: p["curve"] for n, p in res["profiles"].items()},
                 {n: p["crossings"] for n, p in res["profiles"].items()}, os.path.join(args.out, "restore.png"))
    print(R.markdown(res, machine_line(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
