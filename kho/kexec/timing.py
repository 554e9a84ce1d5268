"""Timing model of an arm64 kexec reboot, and fitting its parameters to measurements.

A :class:`Profile` gives a platform's rates (bytes per second) and fixed times (seconds):

* ``uncached_copy_bps`` — copying with the MMU and D-cache off (mmu-off relocation);
* ``cached_copy_bps``   — ``copy_page`` with caches on (mmu-on relocation);
* ``cache_clean_bps``   — ``dc civac`` over each destination page after its copy (mmu-on);
* ``sha256_bps``        — purgatory's SHA-256 over the segments (MMU off);
* ``shutdown_s`` / ``startup_s`` — the rest of the reboot, independent of the image.

Reboot phases (:func:`reboot_timeline`): shutdown, relocation (0 for ``reserved``: the
image is already in place), purgatory (when checks are on), startup.  Every time is
linear in the bytes moved or hashed, as the published measurements are
("relocation time increases proportionally").

:func:`fit_profile` derives a profile from measured reboots (:class:`Measurement`):
least squares through the origin for the per-byte costs, means for the fixed times,
and reports every measured figure against the model (:class:`FitReport`).

The next kernel's KHO stages (:class:`NextKernelCosts`, applied to the counts of
:mod:`kho.nextkernel.memblock_cost`) add ``kho_restore_s`` and ``free_list_s`` to a
:class:`Timeline`: ``startup_s`` is the measured startup of a kernel that received nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from kho.errors import KHOError

#: Relocation modes the model times (same names as :data:`kho.kexec.relocate.RELOCATION_MODES`).
MODES = ("mmu-off", "mmu-on", "reserved")
#: Profile parameters: name -> (kind, description); kind "rate" is bytes/s, "time" seconds.
PARAMETERS = {
    "uncached_copy": ("rate", "copy with MMU and D-cache off (mmu-off relocation)"),
    "cached_copy": ("rate", "copy_page with caches on (mmu-on relocation)"),
    "cache_clean": ("rate", "dc civac over copied destination pages (mmu-on relocation)"),
    "sha256": ("rate", "purgatory SHA-256 with the MMU off"),
    "shutdown": ("time", "kernel shutdown before relocation"),
    "startup": ("time", "new kernel startup after relocation"),
}


@dataclass(frozen=True)
class NextKernelCosts:
    """Seconds per operation of the next kernel's KHO restore (every field in seconds).

    * ``region_visit_s`` — one iteration of a memblock loop over ``struct memblock_region``
      (the scans of ``memblock_add_range`` and ``memblock_isolate_range``, the merges);
    * ``region_move_s`` — one region entry shifted by ``memmove`` or copied by a doubling;
    * ``reserve_call_s`` / ``noinit_call_s`` — the fixed part of one ``memblock_reserve`` /
      ``memblock_reserved_mark_noinit`` call;
    * ``unit_s`` — per preserved unit: the walk's visit of it and its head page
      (``pfn_to_page``, ``private`` = order + magic);
    * ``map_page_s`` — per page of the serialized map walked (radix node, chunk, bitmap,
      instruction-stream page);
    * ``free_page_s`` / ``free_block_s`` — the free-list build: per page handed to the buddy
      allocator, per block freed.
    """

    region_visit_s: float
    region_move_s: float
    reserve_call_s: float
    noinit_call_s: float
    unit_s: float
    map_page_s: float
    free_page_s: float
    free_block_s: float

    def __post_init__(self):
        for key, value in asdict(self).items():
            if not (value >= 0 and math.isfinite(value)):
                raise KHOError("EINVAL", f"next-kernel cost {key} must be a finite time >= 0, not {value}")

    def reserve_s(self, calls: int, visits: int, moved: int) -> float:
        """``calls`` memblock_reserve calls that visited ``visits`` regions and moved ``moved`` entries."""
        return calls * self.reserve_call_s + visits * self.region_visit_s + moved * self.region_move_s

    def noinit_s(self, calls: int, visits: int, moved: int) -> float:
        """``calls`` memblock_reserved_mark_noinit calls that visited ``visits`` regions and moved ``moved`` entries."""
        return calls * self.noinit_call_s + visits * self.region_visit_s + moved * self.region_move_s

    def walk_s(self, units: int, map_pages: int) -> float:
        """Walking a map of ``map_pages`` pages listing ``units`` units, each head page stamped."""
        return units * self.unit_s + map_pages * self.map_page_s

    def free_list_s(self, pages: int, blocks: int, regions_walked: int) -> float:
        """Freeing ``pages`` pages in ``blocks`` blocks, walking ``regions_walked`` memblock regions."""
        return pages * self.free_page_s + blocks * self.free_block_s + regions_walked * self.region_visit_s

    def to_dict(self) -> dict:
        return asdict(self)


#: Next-kernel cost parameters a profile file may set (seconds each): the fields of :class:`NextKernelCosts`.
NEXT_KERNEL_PARAMETERS = tuple(NextKernelCosts.__dataclass_fields__)
#: ``sizeof(struct memblock_region)`` on a 64-bit kernel (bytes): the layout is
#: :data:`kho.nextkernel.memblock.REGION_DTYPE`, downstream of this module; a test checks they agree.
MEMBLOCK_REGION_BYTES = 24


@dataclass(frozen=True)
class Profile:
    """A platform's timing parameters (see the module docstring for units)."""

    name: str
    uncached_copy_bps: float
    cached_copy_bps: float
    cache_clean_bps: float
    sha256_bps: float
    shutdown_s: float
    startup_s: float
    notes: tuple[str, ...] = ()
    #: The next kernel's KHO restore costs (None: the profile times only the reboot).
    next_kernel: NextKernelCosts | None = None

    def __post_init__(self):
        for key in ("uncached_copy_bps", "cached_copy_bps", "cache_clean_bps", "sha256_bps"):
            value = getattr(self, key)
            if not value > 0:
                raise KHOError("EINVAL", f"profile {self.name}: {key} must be positive, not {value}")
        for key in ("shutdown_s", "startup_s"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise KHOError("EINVAL", f"profile {self.name}: {key} must be a finite time >= 0, not {value}")

    def relocation_s(self, mode: str, nbytes: int) -> float:
        """Seconds to relocate ``nbytes`` in ``mode``."""
        if mode == "mmu-off":
            return nbytes / self.uncached_copy_bps
        if mode == "mmu-on":
            return nbytes / self.cached_copy_bps + nbytes / self.cache_clean_bps
        if mode == "reserved":
            return 0.0
        raise KHOError("EINVAL", f"unknown relocation mode {mode!r} (one of {', '.join(MODES)})")

    def purgatory_s(self, nbytes: int) -> float:
        """Seconds for purgatory to hash ``nbytes``."""
        return nbytes / self.sha256_bps

    def to_dict(self) -> dict:
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out


@dataclass(frozen=True)
class Timeline:
    """One reboot's phases in seconds: shutdown, relocation, purgatory, the new kernel's
    startup (without KHO), then its KHO stages: ``kho_restore_s`` (map walk, head pages and,
    on the memblock path, one ``memblock_reserve`` + ``memblock_reserved_mark_noinit`` per
    unit) and ``free_list_s`` (buddy free lists around the preserved memory)."""

    mode: str
    shutdown_s: float
    relocation_s: float
    purgatory_s: float
    startup_s: float
    kho_restore_s: float = 0.0
    free_list_s: float = 0.0

    @property
    def total_s(self) -> float:
        return (self.shutdown_s + self.relocation_s + self.purgatory_s + self.startup_s + self.kho_restore_s
                + self.free_list_s)

    @property
    def relocation_share(self) -> float:
        """Fraction of the reboot spent relocating."""
        return self.relocation_s / self.total_s if self.total_s else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "total_s": self.total_s, "relocation_share": self.relocation_share}


def reboot_timeline(profile: Profile, mode: str, relocated_bytes: int, hashed_bytes: int = 0,
                    kho_restore_s: float = 0.0, free_list_s: float = 0.0) -> Timeline:
    """The modelled reboot: ``relocated_bytes`` copied in ``mode``, ``hashed_bytes`` checked by
    purgatory, and the next kernel's KHO stages (seconds, from :mod:`kho.nextkernel.memblock_cost`)."""
    return Timeline(mode, profile.shutdown_s, profile.relocation_s(mode, relocated_bytes),
                    profile.purgatory_s(hashed_bytes) if hashed_bytes else 0.0, profile.startup_s,
                    kho_restore_s, free_list_s)


@dataclass(frozen=True)
class Measurement:
    """A measured reboot: ``image_bytes`` relocated in ``mode`` (mmu-off or mmu-on), times in
    seconds (``shutdown_s`` / ``startup_s`` may be unknown)."""

    label: str
    mode: str
    image_bytes: int
    relocation_s: float
    shutdown_s: float | None = None
    startup_s: float | None = None

    def __post_init__(self):
        if self.mode not in ("mmu-off", "mmu-on"):
            raise KHOError("EINVAL", f"measurement {self.label!r}: mode must be mmu-off or mmu-on, not {self.mode!r}")
        if self.image_bytes <= 0:
            raise KHOError("EINVAL", f"measurement {self.label!r}: image size must be positive")
        for key in ("relocation_s", "shutdown_s", "startup_s"):
            value = getattr(self, key)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise KHOError("EINVAL", f"measurement {self.label!r}: {key} must be a finite time >= 0")

    @property
    def total_s(self) -> float | None:
        if self.shutdown_s is None or self.startup_s is None:
            return None
        return self.shutdown_s + self.relocation_s + self.startup_s


@dataclass(frozen=True)
class FitRow:
    """One measured figure against the model."""

    label: str
    quantity: str
    measured: float
    modelled: float

    @property
    def error(self) -> float:
        """Relative error of the model (modelled / measured - 1)."""
        return self.modelled / self.measured - 1 if self.measured else math.inf

    def to_dict(self) -> dict:
        return {**asdict(self), "error": self.error}


@dataclass(frozen=True)
class FitReport:
    """A fitted profile, how each parameter was obtained, and the fit to every figure."""

    profile: Profile
    derivation: dict[str, str]
    rows: list[FitRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"profile": self.profile.to_dict(), "derivation": self.derivation,
                "fit": [r.to_dict() for r in self.rows]}


def _through_origin(x: list[float], y: list[float]) -> float:
    """Least-squares slope of ``y = k x``."""
    return sum(a * b for a, b in zip(x, y)) / sum(a * a for a in x)


def fit_profile(name: str, measurements: list[Measurement], given: dict[str, float] | None = None,
                notes: tuple[str, ...] = ()) -> FitReport:
    """Derive a profile from ``measurements``; ``given`` parameters (keys of :data:`PARAMETERS`,
    rates in bytes/s, times in s) are used as they are.

    * uncached copy: ``relocation = bytes / rate`` fitted over mmu-off reboots;
    * cache clean: mmu-on ``relocation = bytes / cached_copy + bytes / cache_clean`` with
      the cached copy rate given (a measured memory bandwidth), fitted over mmu-on reboots;
      without that rate the cached copy absorbs the cleaning (cache_clean infinite);
    * shutdown, startup: means over the reboots that report them;
    * sha256: given, else assumed equal to the uncached copy rate (purgatory reads every
      byte with the D-cache off), and said so.
    EINVAL when a parameter can be neither fitted nor found in ``given``.
    """
    given = dict(given or {})
    unknown = set(given) - set(PARAMETERS)
    if unknown:
        raise KHOError("EINVAL", f"unknown profile parameters {sorted(unknown)} (known: {', '.join(PARAMETERS)})")
    off = [m for m in measurements if m.mode == "mmu-off"]
    on = [m for m in measurements if m.mode == "mmu-on"]
    how: dict[str, str] = {}
    if "uncached_copy" in given:
        uncached = given["uncached_copy"]
        how["uncached_copy"] = "given"
    elif off:
        uncached = 1 / _through_origin([m.image_bytes for m in off], [m.relocation_s for m in off])
        how["uncached_copy"] = f"least squares over {len(off)} mmu-off relocation(s)"
    else:
        raise KHOError("EINVAL", f"profile {name}: uncached_copy is neither given nor measured (no mmu-off reboot)")
    if "cached_copy" in given:
        cached = given["cached_copy"]
        how["cached_copy"] = "given (measured memory bandwidth)"
        if "cache_clean" in given:
            clean = given["cache_clean"]
            how["cache_clean"] = "given"
        elif on:
            k = _through_origin([m.image_bytes for m in on], [m.relocation_s - m.image_bytes / cached for m in on])
            if k <= 0:
                raise KHOError("EINVAL", f"profile {name}: mmu-on relocations are faster than copying at the given cached_copy rate")
            clean = 1 / k
            how["cache_clean"] = f"least squares over {len(on)} mmu-on relocation(s), after the copy at cached_copy"
        else:
            raise KHOError("EINVAL", f"profile {name}: cache_clean is neither given nor measured (no mmu-on reboot)")
    elif on:
        cached = 1 / _through_origin([m.image_bytes for m in on], [m.relocation_s for m in on])
        clean = given.get("cache_clean", math.inf)
        how["cached_copy"] = f"least squares over {len(on)} mmu-on relocation(s), cache cleaning included"
        how["cache_clean"] = "given" if "cache_clean" in given else "included in cached_copy"
    else:
        raise KHOError("EINVAL", f"profile {name}: cached_copy is neither given nor measured (no mmu-on reboot)")
    fixed = {}
    for key, attr in (("shutdown", "shutdown_s"), ("startup", "startup_s")):
        values = [getattr(m, attr) for m in measurements if getattr(m, attr) is not None]
        if key in given:
            fixed[key] = given[key]
            how[key] = "given"
        elif values:
            fixed[key] = sum(values) / len(values)
            how[key] = f"mean of {len(values)} reboot(s)"
        else:
            raise KHOError("EINVAL", f"profile {name}: {key} time is neither given nor measured")
    if "sha256" in given:
        sha = given["sha256"]
        how["sha256"] = "given"
    else:
        sha = uncached
        how["sha256"] = "assumed equal to uncached_copy (no measurement)"
    profile = Profile(name, uncached, cached, clean, sha, fixed["shutdown"], fixed["startup"], tuple(notes))
    rows = []
    for m in measurements:
        modelled = reboot_timeline(profile, m.mode, m.image_bytes)
        rows.append(FitRow(m.label, f"{m.mode} relocation", m.relocation_s, modelled.relocation_s))
        share_measured = m.relocation_s / m.total_s if m.total_s else None
        if share_measured is not None:
            rows.append(FitRow(m.label, f"{m.mode} share of reboot", share_measured, modelled.relocation_share))
    for a in off:
        for b in on:
            if a.image_bytes == b.image_bytes and a.total_s and b.total_s:
                ma = reboot_timeline(profile, "mmu-off", a.image_bytes).total_s
                mb = reboot_timeline(profile, "mmu-on", b.image_bytes).total_s
                rows.append(FitRow(f"{a.label} / {b.label}", "whole-reboot speedup", a.total_s / b.total_s, ma / mb))
    return FitReport(profile, how, rows)
