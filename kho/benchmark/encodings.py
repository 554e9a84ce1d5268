"""The encodings benchmark: one preserved set through every encoding and both boot paths.

A *point* is a preserved-set pattern (:mod:`kho.simulation.preserved_sets`: random, runs, mixed, strided,
huge) covering a share of a machine's RAM.  :func:`run_point` boots the first kernel
(:meth:`kho.currentkernel.machine.Machine.boot`), draws the pattern from its page allocator, preserves
it once in a :class:`~kho.currentkernel.tracker.Tracker` and then, for every encoding:

* ``encode`` and ``decode`` (median of ``runs``, wall clock and process CPU seconds),
  the bytes written (metadata pages + FDT property bytes), bytes per preserved page, the
  smallest root FDT carrying the map and whether it fits the kernel's one-page FDT;
* whether the folio orders survive (the decoded units are exactly the preserved ones)
  and that no page is lost (always checked: a mismatch raises :class:`BenchmarkError`);
* the next kernel's **free-list rebuild** on each boot path (:func:`boot_paths`): a real
  handover (:class:`kho.handover.outgoing.KHO`) booted by :func:`kho.nextkernel.boot.boot`;
  ``rebuild_s`` = its ``deserialize`` + ``free_lists`` stages (decode or stream walk,
  one ``memblock_reserve`` per unit on the memblock path, buddy free lists), median of
  ``runs`` boots, with the memblock_reserve calls.  When the handover cannot be built
  (``ranges`` whose root FDT outgrows the largest block, E2BIG) the reason is recorded
  instead.

Between runs every page an encoding wrote is freed and forgotten, so each run (and
each encoding) starts from the same allocator and memory.

Units: bytes, seconds; ``share`` is a fraction of RAM (0 < share < 1).  Cost: O(RAM
pages + units) numpy work per encoding and run; host memory about 10 bytes a RAM page
during a boot plus about 20 bytes a preserved unit.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from kho.benchmark.progress import Step, no_progress
from kho.currentkernel.machine import Machine
from kho.currentkernel.tracker import Tracker
from kho.encodings import EncodedMap, get_encoding, load_all
from kho.encodings.ranges import fdt_min_bytes, merge_units
from kho.errors import KHOError
from kho.handover.outgoing import KHO, Handover
from kho.nextkernel.boot import INSTRUCTIONS_ENCODING, boot
from kho.simulation.preserved_sets import PATTERNS, generate

#: Fields every :class:`~kho.encodings.base.EncodedMap` has; the others are encoding details.
_BASE_FIELDS = {f.name for f in dataclasses.fields(EncodedMap)}


class BenchmarkError(RuntimeError):
    """An encoding decoded something other than what was preserved (a bug, not bad input)."""


@dataclass(frozen=True)
class Point:
    """A preserved set: ``pattern`` over ``share`` (fraction) of ``ram`` bytes."""

    pattern: str
    ram: int
    share: float

    def validate(self, page_size: int = 4096) -> None:
        """KHOError(EINVAL) for an unknown pattern, a RAM size that is not a positive number
        of pages, or a share outside (0, 1) or below one page."""
        if self.pattern not in PATTERNS:
            raise KHOError("EINVAL", f"unknown pattern {self.pattern!r} (one of {', '.join(PATTERNS)})")
        if self.ram <= 0 or self.ram % page_size:
            raise KHOError("EINVAL", f"RAM size {self.ram} is not a positive multiple of the page size")
        if not 0 < self.share < 1:
            raise KHOError("EINVAL", f"preserved share {self.share:g} is not between 0 and 1")
        if self.preserved_bytes(page_size) < page_size:
            raise KHOError("EINVAL", f"{self.share:.2%} of {self.ram} bytes is less than a page")

    def preserved_bytes(self, page_size: int = 4096) -> int:
        """Bytes to preserve: ``share`` of RAM, rounded down to whole pages."""
        return int(self.ram * self.share) // page_size * page_size


def boot_paths(encoding: str) -> tuple[str, ...]:
    """The next kernel's deserialization paths that read ``encoding``: the memblock path
    for every encoding, and the instruction path for the instruction stream."""
    return ("memblock", "instructions") if encoding == INSTRUCTIONS_ENCODING else ("memblock",)


def check_encodings(names: Sequence[str] | None) -> list[str]:
    """The encodings to run (every registered one, sorted, for None); KHOError(EINVAL) for
    an unknown name."""
    registry = load_all()
    if names is None:
        return sorted(registry)
    for name in names:
        get_encoding(name)
    return list(dict.fromkeys(names))


def _timed(fn: Callable):
    """``(result, wall seconds, CPU seconds)`` of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _release(machine: Machine, pages: np.ndarray) -> None:
    """Give pages an encoding or a handover wrote back to the allocator and forget their contents."""
    ps = machine.memory.page_size
    for page in pages.tolist():
        machine.memory.discard(page, ps)
        machine.allocator.free_pages(page, 0)


def _check_decoded(name: str, memory, decoded, phys: np.ndarray, order: np.ndarray) -> bool:
    """True when the decoded units are exactly ``(phys, order)`` (the orders survived), False
    when an encoding that drops orders decoded the same pages; BenchmarkError otherwise."""
    if np.array_equal(decoded.phys, phys) and np.array_equal(decoded.order, order):
        return True
    if not decoded.exact_orders:
        got, want = merge_units(memory, decoded.phys, decoded.order), merge_units(memory, phys, order)
        if all(np.array_equal(a, b) for a, b in zip(got, want)):
            return False
    raise BenchmarkError(f"{name}: the decoded map differs from the preserved set")


def _handover(name: str, machine: Machine, tracker: Tracker) -> Handover:
    """A finalized handover of ``tracker``'s set written by encoding ``name``.  The KHO's own
    tracker is replaced by the benchmark's, so the set is preserved once for all encodings."""
    kho = KHO(machine.memory, machine.allocator, name)
    kho.tracker = tracker
    return kho.finalize()


def _boot_path(machine: Machine, handover: Handover, path: str, runs: int, seed: int) -> dict:
    """Median stage times of ``runs`` boots of the next kernel on ``path``, and its counts."""
    dtb = handover.boot_dtb()
    stages, report = [], None
    for _ in range(runs):
        nk = boot(machine.memory, dtb, path, encoding_options=handover.options, seed=seed)
        if not nk.revived:
            raise BenchmarkError(f"{handover.encoding} on the {path} path: {'; '.join(nk.messages)}")
        stages.append((nk.timings, nk.cpu_timings))
        report = nk.report()
        del nk
    wall = [t for t, _ in stages]
    return {
        "rebuild_s": statistics.median(t["deserialize"] + t["free_lists"] for t in wall),
        "rebuild_cpu_s": statistics.median(c["deserialize"] + c["free_lists"] for _, c in stages),
        "deserialize_s": statistics.median(t["deserialize"] for t in wall),
        "free_lists_s": statistics.median(t["free_lists"] for t in wall),
        "boot_s": statistics.median(sum(t.values()) for t in wall),
        "memblock_reserve_calls": report["memblock_reserve_calls"],
        "memblock_reserved_regions": report["memblock_reserved_regions"],
        "preserved_units": report["preserved_units"],
        "free_pages": report["free_pages"] + report["free_scratch_pages"],
    }


def measure_encoding(name: str, machine: Machine, tracker: Tracker, phys: np.ndarray, order: np.ndarray,
                     runs: int = 3, *, boot_runs: int | None = None, seed: int = 1, step: Step = no_progress) -> dict:
    """Every figure of one encoding on a finalized ``tracker`` holding exactly the units
    ``(phys, order)`` (sorted by phys).  ``boot_runs``: boots per path (default ``runs``;
    0 skips the boot paths).  Leaves the machine's allocator and memory as it found them."""
    ps = machine.memory.page_size
    enc = get_encoding(name, ps)
    enc_times, dec_times = [], []
    encoded = decoded = None
    for run in range(runs):
        if encoded is not None:
            _release(machine, encoded.metadata_pages)
        step(f"{name}: encode {run + 1}/{runs}")
        encoded, wall, cpu = _timed(lambda: enc.encode(tracker, machine.allocator))
        enc_times.append((wall, cpu))
    reader = get_encoding(name, ps, **encoded.options)
    for run in range(runs):
        step(f"{name}: decode {run + 1}/{runs}")
        decoded, wall, cpu = _timed(lambda: reader.decode(machine.memory, encoded.props))
        dec_times.append((wall, cpu))
    survive = _check_decoded(name, machine.memory, decoded, phys, order)
    _release(machine, encoded.metadata_pages)
    pages = tracker.nr_pages
    fdt_min = fdt_min_bytes(encoded.compatible, encoded.props)
    result = {
        "encoding": name,
        "compatible": encoded.compatible,
        "keeps_orders": enc.keeps_orders,
        "orders_survive": survive,
        "decoded_units": len(decoded),
        "total_bytes": encoded.total_bytes,
        "metadata_bytes": encoded.metadata_bytes,
        "metadata_pages": int(encoded.metadata_pages.size),
        "fdt_bytes": encoded.fdt_bytes,
        "bytes_per_page": encoded.total_bytes / pages,
        "bytes_per_unit": encoded.total_bytes / max(1, len(tracker)),
        "fdt_min_bytes": fdt_min,
        "fdt_fits_page": fdt_min <= ps,
        "encode_s": statistics.median(w for w, _ in enc_times),
        "encode_cpu_s": statistics.median(c for _, c in enc_times),
        "decode_s": statistics.median(w for w, _ in dec_times),
        "decode_cpu_s": statistics.median(c for _, c in dec_times),
        "details": {k: getattr(encoded, k) for k in (f.name for f in dataclasses.fields(encoded)) if k not in _BASE_FIELDS},
        "handover": None,
        "paths": {},
    }
    del decoded, encoded
    boot_runs = runs if boot_runs is None else boot_runs
    if boot_runs:
        step(f"{name}: handover")
        try:
            handover = _handover(name, machine, tracker)
        except KHOError as err:
            result["handover"] = str(err)
            return result
        result["handover"] = "ok"
        try:
            for path in boot_paths(name):
                step(f"{name}: boot, {path} path")
                result["paths"][path] = _boot_path(machine, handover, path, boot_runs, seed)
        finally:
            _release(machine, handover.pages_to_keep())
    return result


def prepare(point: Point, *, seed: int = 1, page_size: int = 4096, kho_scratch: str = "200%"):
    """Boot the first kernel and preserve the point's set: ``(machine, tracker, phys, order,
    figures)`` with ``figures`` the set's size and the seconds its generation and
    ``preserve_many`` took."""
    point.validate(page_size)
    machine = Machine.boot(point.ram, page_size, kho_scratch, seed)
    (phys, order), generate_s, _ = _timed(lambda: generate(point.pattern, machine.allocator,
                                                           point.preserved_bytes(page_size), seed=seed))
    tracker = Tracker(machine.memory)
    _, preserve_s, _ = _timed(lambda: tracker.preserve_many(phys, order))
    tracker.finalize()
    counts = np.bincount(order, minlength=machine.memory.geometry.max_order + 1)
    figures = {
        "pattern": point.pattern, "ram_bytes": point.ram, "share": point.share, "page_size": page_size,
        "preserved_bytes": tracker.nr_pages * page_size, "preserved_pages": tracker.nr_pages, "units": len(tracker),
        "units_by_order": {str(o): int(n) for o, n in enumerate(counts.tolist()) if n},
        "tracker_bytes": tracker.kernel_memory().total, "generate_s": generate_s, "preserve_s": preserve_s,
    }
    return machine, tracker, phys, order, figures


def run_point(point: Point, encodings: Sequence[str] | None = None, runs: int = 3, *, boot_runs: int | None = None,
              seed: int = 1, page_size: int = 4096, kho_scratch: str = "200%", step: Step = no_progress) -> dict:
    """The figures of ``point`` for every encoding in ``encodings`` (default: all registered).

    Returns the set's figures (:func:`prepare`) plus ``runs``, ``seed`` and ``encodings``, a
    list of :func:`measure_encoding` results.  KHOError for impossible settings (checked
    before anything runs) or ENOMEM when the pattern does not fit.
    """
    if runs < 1:
        raise KHOError("EINVAL", f"runs must be at least 1, not {runs}")
    if boot_runs is not None and boot_runs < 0:
        raise KHOError("EINVAL", f"boot runs must be at least 0, not {boot_runs}")
    names = check_encodings(encodings)
    point.validate(page_size)
    step(f"{point.pattern} {point.share:.0%} of {point.ram >> 20:,} MiB: preserve")
    machine, tracker, phys, order, figures = prepare(point, seed=seed, page_size=page_size, kho_scratch=kho_scratch)
    results = [measure_encoding(name, machine, tracker, phys, order, runs, boot_runs=boot_runs, seed=seed, step=step)
               for name in names]
    return {**figures, "runs": runs, "boot_runs": runs if boot_runs is None else boot_runs, "seed": seed,
            "encodings": results}


def run_points(points: Sequence[Point], encodings: Sequence[str] | None = None, runs: int = 3, *,
               boot_runs: int | None = None, seed: int = 1, page_size: int = 4096, kho_scratch: str = "200%",
               step: Step = no_progress) -> list[dict]:
    """:func:`run_point` of every point.  A point whose pattern does not fit in the machine
    (ENOMEM: e.g. ``runs`` needs a free 4 MiB block per run) is recorded as ``{"pattern",
    "ram_bytes", "share", "error"}`` and the others still run; other errors raise."""
    out = []
    for point in points:
        try:
            out.append(run_point(point, encodings, runs, boot_runs=boot_runs, seed=seed, page_size=page_size,
                                 kho_scratch=kho_scratch, step=step))
        except KHOError as err:
            if err.errno_name != "ENOMEM":
                raise
            out.append({"pattern": point.pattern, "ram_bytes": point.ram, "share": point.share, "error": str(err)})
    return out


def steps_per_point(encodings: Sequence[str], runs: int, boot_runs: int | None = None) -> int:
    """How many times :func:`run_point` calls ``step`` (for a progress bar's total)."""
    boots = runs if boot_runs is None else boot_runs
    return 1 + sum(2 * runs + ((1 + len(boot_paths(name))) if boots else 0) for name in encodings)
