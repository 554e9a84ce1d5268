"""Platform timing profiles: the built-in ``stingray`` and user profiles from a file.

``stingray`` is fitted (:func:`kho.kexec.timing.fit_profile`) to the published reboots of
a Broadcom Stingray (arm64) — DESIGN.md §4:

* "arm64: MMU enabled kexec relocation" (Linux 5.16) cover letter: 47 MB kernel +
  initramfs, MMU off: shutdown 0.022131328 s, relocation 0.440510736 s, startup
  0.294706768 s; MMU on: 0.032066576 s, 0.022158152 s, 0.296055880 s (2.16x faster);
  memory bandwidth with caches on: 2,857 MB/s;
* "arm64: allow to reserve memory for normal kexec kernel" v2 cover letter (2019): 13 MB
  Image + 24 MB initramfs, MMU off: shutdown 0.03 s, relocation 0.35 s, startup 0.29 s.

"MB" there is read as MiB (the sizes ``ls -h`` prints), consistently for sizes and the
bandwidth.  Those reboots are taken as without purgatory hashing: their startup does not
grow with the image (0.29 s for 37 MB and 47 MB), which SHA-256 with the D-cache off
would make it do.

The next kernel's KHO restore (:class:`~kho.kexec.timing.NextKernelCosts`):

* ``qemu-tcg-x86`` is fitted (:func:`fit_next_kernel`) to a real Linux 7.3 kernel's restore
  under QEMU TCG, ``data/linux-7.3-x86_64-kho-restore.json`` (provenance inside): least
  squares, weighted by 1/measured, of ``memblock_reserve`` and ``mark_noinit`` seconds
  against the model's counts (per call, per region visited; a moved entry costs a visit),
  then of the rest of the walk against units (per unit); per map page, per page and per
  block freed follow from the per-visit cost by bytes touched (:func:`costs_from_bandwidth`).
  Its reboot parameters are Stingray's: no reboot was timed under the emulator.
* ``stingray`` and every profile without next-kernel parameters derive them from their
  memory bandwidth (``cached_copy``): a region visit or move streams one
  ``struct memblock_region`` (24 B), a map page 4 KiB, a freed page one ``struct page``
  (64 B), a freed block two; the per-call and per-unit costs are the emulator's, scaled
  by the ratio of the two per-visit costs (the emulator taken to slow every step alike).

A user profile is a TOML or JSON file (or ``KEY=VALUE`` overrides) with any of the
parameters of :data:`kho.kexec.timing.PARAMETERS` — rates like ``"2857M/s"`` or bytes/s,
times like ``0.29`` / ``"290ms"`` — and optionally measured reboots to fit::

    name = "myboard"
    cached_copy = "2857M/s"
    [[measurement]]
    mode = "mmu-off"
    image = "47M"
    relocation = 0.44
    shutdown = 0.022      # optional
    startup = 0.29        # optional
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from importlib import resources

import numpy as np
import tomllib

from kho.currentkernel.scratch import STRUCT_PAGE_BYTES
from kho.errors import KHOError
from kho.files import read_bounded
from kho.kexec.timing import (
    MEMBLOCK_REGION_BYTES,
    NEXT_KERNEL_PARAMETERS,
    PARAMETERS,
    FitReport,
    FitRow,
    Measurement,
    NextKernelCosts,
    fit_profile,
)
from kho.sizes import parse_size

MIB = 1 << 20
#: Largest profile file read (a profile is a few hundred bytes of TOML or JSON).
MAX_PROFILE_BYTES = 1 << 20

#: The published Stingray reboots (see the module docstring for sources).
STINGRAY_MEASUREMENTS = (
    Measurement("47 MB, MMU off", "mmu-off", 47 * MIB, 0.440510736, 0.022131328, 0.294706768),
    Measurement("47 MB, MMU on", "mmu-on", 47 * MIB, 0.022158152, 0.032066576, 0.296055880),
    Measurement("37 MB (13 MB Image + 24 MB initramfs), MMU off", "mmu-off", 37 * MIB, 0.35, 0.03, 0.29),
)
#: The memory bandwidth measured on Stingray with caches on (bytes/s).
STINGRAY_MEMORY_BANDWIDTH = 2857 * MIB
STINGRAY_NOTES = (
    "fitted to the Stingray reboots published with 'arm64: MMU enabled kexec relocation' (47 MB) and "
    "'arm64: allow to reserve memory for normal kexec kernel' (37 MB); MB read as MiB",
    "published reboots taken as without purgatory hashing (their startup does not grow with the image)",
)

#: The real-kernel restore timing the ``qemu-tcg-x86`` profile is fitted to (in ``kho/kexec/data/``).
QEMU_TCG_TIMING = "linux-7.3-x86_64-kho-restore.json"
QEMU_TCG_NOTES = (
    "next-kernel costs fitted to a real Linux 7.3-rc7 kernel's KHO restore under QEMU TCG (emulator times)",
    "reboot parameters borrowed from stingray: no reboot was timed under the emulator",
)
#: Page size of the map pages the bandwidth derivation reads (bytes).
MAP_PAGE_BYTES = 4096

BUILTIN = {
    "stingray": (STINGRAY_MEASUREMENTS, {"cached_copy": float(STINGRAY_MEMORY_BANDWIDTH)}, STINGRAY_NOTES),
    "qemu-tcg-x86": (STINGRAY_MEASUREMENTS, {"cached_copy": float(STINGRAY_MEMORY_BANDWIDTH)}, QEMU_TCG_NOTES),
}


def qemu_tcg_timing() -> dict:
    """The packaged real-kernel restore timing (:data:`QEMU_TCG_TIMING`), parsed."""
    return json.loads(resources.files("kho.kexec").joinpath("data", QEMU_TCG_TIMING).read_text(encoding="utf-8"))


def costs_from_bandwidth(bandwidth_bps: float, reference: NextKernelCosts) -> tuple[NextKernelCosts, dict[str, str]]:
    """Next-kernel costs of a machine streaming ``bandwidth_bps`` bytes/s: per region visited or
    moved ``MEMBLOCK_REGION_BYTES / bw``, per map page ``MAP_PAGE_BYTES / bw``, per page freed
    ``STRUCT_PAGE_BYTES / bw``, per block freed twice that; per call and per unit the
    ``reference`` costs scaled by the ratio of the per-visit costs.  With the derivation."""
    visit = MEMBLOCK_REGION_BYTES / bandwidth_bps
    scale = visit / reference.region_visit_s
    costs = NextKernelCosts(visit, visit, reference.reserve_call_s * scale, reference.noinit_call_s * scale,
                            reference.unit_s * scale, MAP_PAGE_BYTES / bandwidth_bps, STRUCT_PAGE_BYTES / bandwidth_bps,
                            2 * STRUCT_PAGE_BYTES / bandwidth_bps)
    rate = f"{bandwidth_bps / (1 << 20):,.0f} MiB/s"
    how = {
        "region_visit_s": f"one {MEMBLOCK_REGION_BYTES}-byte struct memblock_region at {rate}",
        "region_move_s": f"one {MEMBLOCK_REGION_BYTES}-byte struct memblock_region at {rate}",
        "map_page_s": f"one {MAP_PAGE_BYTES}-byte map page at {rate}",
        "free_page_s": f"one {STRUCT_PAGE_BYTES}-byte struct page at {rate}",
        "free_block_s": f"two {STRUCT_PAGE_BYTES}-byte struct pages at {rate}",
    }
    for key in ("reserve_call_s", "noinit_call_s", "unit_s"):
        how[key] = f"qemu-tcg-x86's fit x {scale:.4g} (ratio of the per-visit costs)"
    return costs, how


def _relative_lstsq(columns: list[np.ndarray], target: np.ndarray) -> list[float]:
    """Least squares of ``target ~ sum(x_j * columns[j])`` with every row weighted by 1/target
    (relative errors: the runs span three orders of magnitude)."""
    weight = 1 / target
    a = np.stack([c * weight for c in columns], axis=1)
    return [float(x) for x in np.linalg.lstsq(a, target * weight, rcond=None)[0]]


def fit_next_kernel(timing: dict) -> tuple[NextKernelCosts, dict[str, str], list[FitRow]]:
    """The ``qemu-tcg-x86`` next-kernel costs fitted to ``timing`` (:func:`qemu_tcg_timing`),
    how each was obtained, and every measured figure against the model.  O(runs)."""
    runs = timing["runs"]

    def col(key):
        return np.array([float(r["model"][key]) for r in runs])

    units = col("units")
    zero = np.zeros_like(units)
    r_work = col("reserve_scan_visits") + col("reserve_merge_iterations") + col("reserve_regions_moved") + col("reserve_doubling_copied")
    n_work = col("isolate_scan_visits") + col("noinit_merge_iterations") + col("noinit_regions_moved") + col("noinit_doubling_copied")
    reserve = np.array([r["reserve_s"] for r in runs])
    noinit = np.array([r["noinit_s"] for r in runs])
    total = np.array([r["total_s"] for r in runs])
    r_call, n_call, visit = _relative_lstsq([np.concatenate([units, zero]), np.concatenate([zero, units]),
                                              np.concatenate([r_work, n_work])], np.concatenate([reserve, noinit]))
    rest = total - reserve - noinit
    map_page = visit * MAP_PAGE_BYTES / MEMBLOCK_REGION_BYTES
    (unit,) = _relative_lstsq([units], rest - map_page * col("map_pages"))
    fitted = NextKernelCosts(visit, visit, r_call, n_call, unit, map_page, 0.0, 0.0)
    costs, how = costs_from_bandwidth(MEMBLOCK_REGION_BYTES / visit, fitted)
    n = len(runs)
    how.update({
        "region_visit_s": f"least squares over {n} runs' memblock_reserve and mark_noinit times (with the per-call costs)",
        "region_move_s": "equal to region_visit_s (one entry read and written)",
        "reserve_call_s": f"least squares over {n} runs' memblock_reserve times",
        "noinit_call_s": f"least squares over {n} runs' memblock_reserved_mark_noinit times",
        "unit_s": f"least squares over {n} runs' rest of the walk (total - reserve - noinit), after the map pages",
    })
    for key in ("map_page_s", "free_page_s", "free_block_s"):
        how[key] += " (per-visit cost as a bandwidth)"
    rows = []
    for r in runs:
        m = r["model"]
        res = costs.reserve_s(m["units"], m["reserve_scan_visits"] + m["reserve_merge_iterations"],
                              m["reserve_regions_moved"] + m["reserve_doubling_copied"])
        noi = costs.noinit_s(m["units"], m["isolate_scan_visits"] + m["noinit_merge_iterations"],
                             m["noinit_regions_moved"] + m["noinit_doubling_copied"])
        walk = costs.walk_s(m["units"], m["map_pages"])
        rows += [FitRow(r["run"], "memblock_reserve", r["reserve_s"], res),
                 FitRow(r["run"], "memblock_reserved_mark_noinit", r["noinit_s"], noi),
                 FitRow(r["run"], "walk + head pages", r["total_s"] - r["reserve_s"] - r["noinit_s"], walk),
                 FitRow(r["run"], "KHO restore total", r["total_s"], res + noi + walk)]
    return costs, how, rows


def run_speed_note(timing: dict) -> str | None:
    """What the timing's runs of one kind say about the emulator's speed: getting the page
    (``getpg_s``: one ``pfn_to_page`` and a store per unit, no memblock call) is the same
    work per unit in every run, so its spread per unit between the runs of one kind is how
    much the emulator's speed moved between them, which no model of the kernel's work can
    follow.  The widest spread (ns per unit), None when every kind is within 10 %.  O(runs)."""
    worst = None
    for kind in sorted({r["kind"] for r in timing["runs"]}):
        runs = [r for r in timing["runs"] if r["kind"] == kind and r.get("getpg_s")]
        if len(runs) < 2:
            continue
        per_unit = {r["run"]: r["getpg_s"] / r["units"] for r in runs}
        slow, fast = max(per_unit, key=per_unit.get), min(per_unit, key=per_unit.get)
        spread = per_unit[slow] / per_unit[fast] - 1
        if spread > 0.10 and (worst is None or spread > worst[0]):
            worst = (spread, slow, fast, per_unit[slow], per_unit[fast])
    if worst is None:
        return None
    spread, slow, fast, a, b = worst
    return (f"{slow} and {fast} do the same work per unit, yet getting the page (no memblock call) took "
            f"{a * 1e9:.0f} and {b * 1e9:.0f} ns a unit: the emulator ran {spread:.0%} faster in one; no count "
            f"of the kernel's work can follow that, so the fit cannot hold both within 10 %")


def _with_next_kernel(report: FitReport, given: dict[str, float], fitted: tuple | None = None) -> FitReport:
    """``report`` with next-kernel costs: ``fitted`` (costs, derivation, rows) when given, else
    derived from the profile's cached_copy rate; parameters in ``given`` override either."""
    if fitted is None:
        costs, how = costs_from_bandwidth(report.profile.cached_copy_bps, fit_next_kernel(qemu_tcg_timing())[0])
        rows = []
    else:
        costs, how, rows = fitted
    values = costs.to_dict()
    for key in NEXT_KERNEL_PARAMETERS:
        if key in given:
            values[key] = given[key]
            how[key] = "given"
    profile = dataclasses.replace(report.profile, next_kernel=NextKernelCosts(**values))
    return FitReport(profile, {**report.derivation, **how}, report.rows + rows)


def _split_given(given: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """``given`` parameters: (reboot ones, next-kernel ones)."""
    return ({k: v for k, v in given.items() if k not in NEXT_KERNEL_PARAMETERS},
            {k: v for k, v in given.items() if k in NEXT_KERNEL_PARAMETERS})

_RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*/\s*s\s*")
_TIME = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|ms|us|µs|ns)?\s*")
_SCALE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SCALE |= {unit.lower(): factor for unit, factor in _SCALE.items()}  # suffixes in either case
_TIME_SCALE = {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _parse_quantity(value, pattern: re.Pattern, scale: dict, what: str, examples: str) -> float:
    """A plain number (int, float or decimal text such as ``1e8``), or text matching
    ``pattern`` whose groups are a number and a unit key of ``scale``; KHOError(EINVAL) else."""
    if isinstance(value, bool):
        raise KHOError("EINVAL", f"invalid {what} {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    match = pattern.fullmatch(str(value))
    if not match:
        raise KHOError("EINVAL", f"invalid {what} {value!r} (examples: {examples})")
    return float(match.group(1)) * scale[match.group(2)]


def parse_rate(value) -> float:
    """Bytes per second from a number (``1e8``) or a string like ``2857M/s``, ``2.8GiB/s`` (binary suffixes)."""
    rate = _parse_quantity(value, _RATE, _SCALE, "rate", "2857M/s, 1.5GiB/s, 106000000")
    if not rate > 0 or rate == float("inf"):
        raise KHOError("EINVAL", f"a rate must be positive and finite, not {value!r}")
    return rate


def parse_time(value) -> float:
    """Seconds from a number or a string like ``0.29``, ``290ms``, ``22us``."""
    seconds = _parse_quantity(value, _TIME, _TIME_SCALE, "time", "0.29, 290ms, 22us")
    if not (seconds >= 0 and seconds != float("inf")):
        raise KHOError("EINVAL", f"a time must be finite and >= 0, not {value!r}")
    return seconds


def parse_parameter(key: str, value) -> float:
    """One profile parameter: a rate (bytes/s) or a time (s) by :data:`PARAMETERS`, or a
    next-kernel cost (s) of :data:`~kho.kexec.timing.NEXT_KERNEL_PARAMETERS`."""
    if key in NEXT_KERNEL_PARAMETERS:
        return parse_time(value)
    if key not in PARAMETERS:
        raise KHOError("EINVAL", f"unknown profile parameter {key!r} (known: {', '.join((*PARAMETERS, *NEXT_KERNEL_PARAMETERS))})")
    return parse_rate(value) if PARAMETERS[key][0] == "rate" else parse_time(value)


def _size(value) -> int:
    if isinstance(value, bool):
        raise KHOError("EINVAL", f"invalid size {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return parse_size(value)
    raise KHOError("EINVAL", f"invalid size {value!r}")


def _measurement(i: int, entry) -> Measurement:
    if not isinstance(entry, dict):
        raise KHOError("EINVAL", f"measurement {i + 1} is not a table/object")
    extra = set(entry) - {"label", "mode", "image", "relocation", "shutdown", "startup"}
    if extra:
        raise KHOError("EINVAL", f"measurement {i + 1}: unknown keys {sorted(extra)}")
    for key in ("mode", "image", "relocation"):
        if key not in entry:
            raise KHOError("EINVAL", f"measurement {i + 1}: {key} is required")
    opt = {k: parse_time(entry[k]) for k in ("shutdown", "startup") if k in entry}
    return Measurement(str(entry.get("label", f"measurement {i + 1}")), str(entry["mode"]), _size(entry["image"]),
                       parse_time(entry["relocation"]), opt.get("shutdown"), opt.get("startup"))


def profile_from_mapping(data, default_name: str, overrides: dict[str, str] | None = None) -> FitReport:
    """Fit a profile described by a parsed TOML/JSON mapping (see the module docstring)."""
    if not isinstance(data, dict):
        raise KHOError("EINVAL", "a profile must be a table/object")
    extra = set(data) - set(PARAMETERS) - set(NEXT_KERNEL_PARAMETERS) - {"name", "measurement", "measurements", "notes"}
    if extra:
        raise KHOError("EINVAL", f"unknown profile keys {sorted(extra)} (known: name, measurement, "
                                 f"{', '.join((*PARAMETERS, *NEXT_KERNEL_PARAMETERS))})")
    raw = data.get("measurement", data.get("measurements", []))
    if not isinstance(raw, list):
        raise KHOError("EINVAL", "measurement must be a list of tables/objects")
    measurements = [_measurement(i, m) for i, m in enumerate(raw)]
    given = {k: parse_parameter(k, v) for k, v in data.items() if k in PARAMETERS or k in NEXT_KERNEL_PARAMETERS}
    given.update({k: parse_parameter(k, v) for k, v in (overrides or {}).items()})
    notes = data.get("notes", ())
    notes = (notes,) if isinstance(notes, str) else tuple(str(n) for n in notes)
    reboot, next_kernel = _split_given(given)
    return _with_next_kernel(fit_profile(str(data.get("name", default_name)), measurements, reboot, notes), next_kernel)


def load_profile(spec: str, overrides: dict[str, str] | None = None) -> FitReport:
    """The built-in profile ``spec`` or the profile file at path ``spec`` (``.toml`` or JSON),
    with ``overrides`` (parameter -> text) applied; fitted, with its report.

    KHOError(EINVAL) for an unknown name or a malformed file, OSError when unreadable."""
    if spec in BUILTIN:
        measurements, given, notes = BUILTIN[spec]
        given = dict(given)
        given.update({k: parse_parameter(k, v) for k, v in (overrides or {}).items()})
        reboot, next_kernel = _split_given(given)
        report = fit_profile(spec, list(measurements), reboot, notes)
        if spec == "qemu-tcg-x86":
            timing = qemu_tcg_timing()
            speed = run_speed_note(timing)
            profile = report.profile if speed is None else dataclasses.replace(
                report.profile, notes=report.profile.notes + (speed,))
            return _with_next_kernel(FitReport(profile, report.derivation, []), next_kernel, fit_next_kernel(timing))
        return _with_next_kernel(report, next_kernel)
    if not os.path.isfile(spec):
        raise KHOError("EINVAL", f"no built-in profile or file named {spec!r} (built-in: {', '.join(BUILTIN)})")
    raw = read_bounded(spec, MAX_PROFILE_BYTES, "profile")
    name = os.path.splitext(os.path.basename(spec))[0]
    try:
        text = raw.decode("utf-8")
        data = json.loads(text) if spec.endswith(".json") or text.lstrip().startswith("{") else tomllib.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise KHOError("EINVAL", f"{spec}: not a valid TOML or JSON profile: {err}") from None
    return profile_from_mapping(data, name, overrides)
