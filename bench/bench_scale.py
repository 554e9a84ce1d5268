"""The scale run: 1 TiB of RAM with 256 GiB of random order-0 pages (67,108,864 units).

Every encoding runs in its own child process (:mod:`kho.benchmark.scale`): the pattern's
generation, ``preserve_many``, encode, decode and (unless ``--no-boot``) the next
kernel's boot on each of its paths, with the peak RSS of the child.  kho-v1, kho-v2
and instructions must encode + decode within 60 s and stay under 8 GiB through decode;
the other encodings' figures say what limits them.

Writes ``scale.json`` / ``scale.md`` into ``--out`` (default bench/results) and refreshes
the index; prints the table.  Exit 1 when a held encoding misses a target.

Usage: python bench/bench_scale.py [--ram 1T] [--preserve 256G] [--only NAME ...] [--no-boot] [--out DIR]
About 12 minutes on 2 cores; the boot children peak near 10 GiB of host memory.
"""

from __future__ import annotations

import argparse
import os
import sys

from kho.benchmark import report
from kho.benchmark.progress import progress
from kho.benchmark.scale import SCALE_PRESERVED, SCALE_RAM, run_scale
from kho.encodings import load_all
from kho.sizes import parse_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram", type=parse_size, default=SCALE_RAM)
    parser.add_argument("--preserve", type=parse_size, default=SCALE_PRESERVED)
    parser.add_argument("--only", nargs="+", choices=sorted(load_all()), default=None)
    parser.add_argument("--no-boot", action="store_true", help="skip the next kernel's boot in each child")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    names = args.only or sorted(load_all())
    with progress(len(names), sys.stderr.isatty()) as step:
        results = run_scale(names, args.ram, args.preserve, seed=args.seed, boot=not args.no_boot, step=step)
    config = {"ram": args.ram, "preserve": args.preserve, "encodings": names, "boot": not args.no_boot, "seed": args.seed}
    doc = report.document("scale", config, results)
    os.makedirs(args.out, exist_ok=True)
    report.dump(doc, os.path.join(args.out, report.FILES["scale"]))
    with open(os.path.join(args.out, "scale.md"), "w", encoding="utf-8") as f:
        f.write(report.markdown(doc))
    report.write_index(args.out)
    print(report.markdown(doc))
    missed = [r["encoding"]["encoding"] for r in results["results"] if "error" not in r and r["verdict"]["held"]
              and not (r["verdict"]["within_time"] and r["verdict"]["within_memory"])]
    failed = [r["encoding"] for r in results["results"] if "error" in r]
    return 1 if missed or failed else 0


if __name__ == "__main__":
    sys.exit(main())
