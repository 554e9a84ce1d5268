"""The scale run: 1 TiB of RAM, 256 GiB of random order-0 pages, one process per encoding.

:func:`run_scale` starts one child process per encoding (``python -m
kho.benchmark.scale``), so that each encoding's peak resident memory is its own; the
child (:func:`child`) boots the machine, draws the pattern, preserves it, runs the
encoding once (:func:`kho.benchmark.encodings.measure_encoding`: encode, decode, check,
and optionally the next kernel's boot on each path) and prints JSON: the seconds of each
stage and the peak RSS (``getrusage``) reached by the start of each stage and at the end.

Targets (issue 7): for kho-v1, kho-v2 and instructions, encode + decode within
:data:`TARGET_S` and a peak RSS under :data:`TARGET_RSS`.  The other encodings run too;
their figures say what limits them (bytes against the one-page FDT or the 512 KiB
budget, seconds, memory).

Units: bytes, seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Sequence

from kho.benchmark.encodings import Point, check_encodings, measure_encoding, prepare
from kho.benchmark.progress import Step, no_progress
from kho.errors import KHOError

#: The scale point: RAM and preserved bytes (67,108,864 random order-0 pages).
SCALE_RAM = 1 << 40
SCALE_PRESERVED = 256 << 30
#: Encodings held to the targets, and the targets: encode + decode seconds, peak RSS bytes.
TARGET_ENCODINGS = ("kho-v1", "kho-v2", "instructions")
TARGET_S = 60.0
TARGET_RSS = 8 << 30


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes: ``VmHWM`` of
    ``/proc/self/status`` where there is one, else ``ru_maxrss``.  (Linux carries
    ``ru_maxrss`` over a fork and exec, so a child started by a large parent would report
    the parent's peak; ``VmHWM`` belongs to the child's own address space.)"""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(encoding: str, ram: int, preserved: int, *, seed: int = 1, boot: bool = False) -> dict:
    """One encoding at one scale, in this process: stage seconds and peak RSS.

    ``boot``: also boot the next kernel once on each of the encoding's paths."""
    stages: list[dict] = []
    started = time.perf_counter()

    def record(description: str) -> None:
        stages.append({"stage": description, "at_s": time.perf_counter() - started, "peak_rss_bytes": peak_rss()})

    point = Point("random", ram, preserved / ram)
    record("prepare")
    machine, tracker, phys, order, figures = prepare(point, seed=seed)
    result = measure_encoding(encoding, machine, tracker, phys, order, 1, boot_runs=1 if boot else 0, seed=seed,
                              step=record)
    record("end")
    return {**figures, "encoding": result, "stages": stages, "peak_rss_bytes": peak_rss(),
            "wall_s": time.perf_counter() - started}


def peak_through_decode(figures: dict) -> int:
    """A child's peak RSS (bytes) up to the end of decoding: at the start of its handover
    stage when it booted the next kernel, else at its end."""
    for stage in figures["stages"]:
        if stage["stage"].endswith(": handover"):
            return stage["peak_rss_bytes"]
    return figures["peak_rss_bytes"]


def verdict(encoding: str, figures: dict) -> dict:
    """The targets for ``encoding`` given a child's figures: ``{"held": bool, "encode_decode_s",
    "peak_rss_bytes" (through decode), "within_time", "within_memory"}`` (``held`` False for
    encodings not held to them)."""
    enc = figures["encoding"]
    seconds = enc["encode_s"] + enc["decode_s"]
    peak = peak_through_decode(figures)
    return {"held": encoding in TARGET_ENCODINGS, "encode_decode_s": seconds, "peak_rss_bytes": peak,
            "within_time": seconds <= TARGET_S, "within_memory": peak < TARGET_RSS}


def as_point(results: dict) -> dict | None:
    """The scale run as one point of the encodings benchmark (:func:`kho.benchmark.encodings.run_point`'s
    shape, one run), for plotting next to smaller scales; None when no child succeeded."""
    done = [r for r in results["results"] if "error" not in r]
    if not done:
        return None
    keys = ("pattern", "ram_bytes", "share", "page_size", "preserved_bytes", "preserved_pages", "units",
            "units_by_order", "tracker_bytes", "generate_s", "preserve_s")
    return {**{k: done[0][k] for k in keys}, "runs": 1, "boot_runs": 1 if results["boot"] else 0,
            "seed": results["seed"], "encodings": [r["encoding"] for r in done]}


def run_scale(encodings: Sequence[str] | None = None, ram: int = SCALE_RAM, preserved: int = SCALE_PRESERVED, *,
              seed: int = 1, boot: bool = False, step: Step = no_progress) -> dict:
    """Every encoding (default: all registered) in its own child process.  A child that fails
    (e.g. killed for memory) is recorded with its exit status and last error line.

    Returns ``{"ram_bytes", "preserved_bytes", "seed", "targets", "results": [...]}``, each
    result the child's figures plus ``verdict``, or ``{"encoding", "error"}``."""
    names = check_encodings(encodings)
    Point("random", ram, preserved / ram).validate()
    results = []
    for name in names:
        step(f"scale: {name}")
        cmd = [sys.executable, "-m", __name__, "--encoding", name, "--ram", str(ram), "--preserve", str(preserved),
               "--seed", str(seed)] + (["--boot"] if boot else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
            results.append({"encoding": name, "error": lines[-1], "returncode": proc.returncode})
            continue
        figures = json.loads(proc.stdout)
        results.append({**figures, "verdict": verdict(name, figures)})
    return {"ram_bytes": ram, "preserved_bytes": preserved, "seed": seed, "boot": boot,
            "targets": {"encodings": list(TARGET_ENCODINGS), "encode_decode_s": TARGET_S, "peak_rss_bytes": TARGET_RSS},
            "results": results}


def main(argv: list[str] | None = None) -> int:
    """The child process: one encoding, JSON on stdout; exit 3 with one line on bad input."""
    parser = argparse.ArgumentParser(description="kho scale benchmark: one encoding in this process")
    parser.add_argument("--encoding", required=True)
    parser.add_argument("--ram", type=int, default=SCALE_RAM, help="bytes")
    parser.add_argument("--preserve", type=int, default=SCALE_PRESERVED, help="bytes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--boot", action="store_true")
    args = parser.parse_args(argv)
    try:
        figures = child(args.encoding, args.ram, args.preserve, seed=args.seed, boot=args.boot)
    except KHOError as err:
        print(f"kho: {err}", file=sys.stderr)
        return 3
    json.dump(figures, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
