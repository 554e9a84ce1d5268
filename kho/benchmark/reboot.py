"""The reboot benchmark: relocation mode x image size x RAM size.

For every RAM size and kernel + initramfs image size, :func:`run_reboot` reports each
relocation mode (:func:`kho.simulation.simulate.compare`: MMU off, MMU on with the transitional
tables of each linear-map granularity, a reserved ``kexeckernel=`` region): relocation
and whole-reboot seconds from the timing profile (stingray by default), the speedup
against MMU off, and the memory it costs — tables counted by building their plan,
held until the reboot, against a region reserved for good.

With ``simulate_max_ram``, the points whose RAM is at most that also run the whole
modelled kexec (:func:`kho.simulation.simulate.run`: preserve, load, relocate page by page, boot
the next kernel, verify) in each mode, and report its timeline next to the model's and
the host seconds it took; a configuration the model refuses (e.g. a ``kexeckernel=``
region that does not fit in scratch) is recorded with its reason.

Units: bytes and seconds.  Cost: O(tables) per point for the model; a simulation costs
O(RAM pages + image pages).
"""

from __future__ import annotations

import time
from typing import Sequence

from kho.benchmark.progress import Step, no_progress
from kho.errors import KHOError
from kho.kexec.profiles import load_profile
from kho.kexec.relocate import RELOCATION_MODES
from kho.simulation import simulate as sim

#: Bytes the simulated workload preserves (small: the reboot, not the map, is measured).
SIMULATE_PRESERVE = 16 << 20


def _points(rams: Sequence[int], image_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(RAM, image) pairs the model accepts: the image at most half of RAM."""
    return [(ram, image) for ram in rams for image in image_sizes if image <= ram // 2]


def check_sizes(rams: Sequence[int], image_sizes: Sequence[int], page_size: int = 4096) -> None:
    """KHOError(EINVAL) unless every RAM size is a positive multiple of the page size, every
    image size positive, and at least one (RAM, image) pair has the image within half of RAM."""
    if not rams or not image_sizes:
        raise KHOError("EINVAL", "at least one RAM size and one image size are needed")
    for ram in rams:
        if ram <= 0 or ram % page_size:
            raise KHOError("EINVAL", f"RAM size {ram} is not a positive multiple of the page size")
    for image in image_sizes:
        if image < 2 * page_size:
            raise KHOError("EINVAL", f"an image of {image} bytes is smaller than two pages")
    if not _points(rams, image_sizes):
        raise KHOError("EINVAL", "every image is larger than half of every RAM size")


def steps(rams: Sequence[int], image_sizes: Sequence[int], simulate_max_ram: int | None = None) -> int:
    """How many times :func:`run_reboot` calls ``step``."""
    points = _points(rams, image_sizes)
    sims = sum(1 for ram, _ in points if simulate_max_ram is not None and ram <= simulate_max_ram)
    return len(points) + sims * len(RELOCATION_MODES)


def _simulated(ram: int, image: int, mode: str, profile, page_size: int, checks: bool, seed: int) -> dict:
    config = sim.Config(ram=ram, page_size=page_size, preserve=SIMULATE_PRESERVE, relocation=mode, image_size=image,
                        checks=checks, seed=seed, profile=profile)
    start = time.perf_counter()
    try:
        result = sim.run(config)
    except KHOError as err:
        return {"mode": mode, "error": str(err)}
    g = result.generations[0]
    t = g.timeline  # the reboot against the model's: without the next kernel's KHO stages, reported beside
    return {"mode": mode, "ok": result.ok, "relocation_s": t.relocation_s,
            "total_s": t.total_s - t.kho_restore_s - t.free_list_s, "kho_restore_s": t.kho_restore_s,
            "free_list_s": t.free_list_s,
            "bytes_relocated": g.relocation["bytes_copied"], "host_relocation_s": g.host_s["relocation"],
            "host_s": time.perf_counter() - start}


def run_reboot(rams: Sequence[int], image_sizes: Sequence[int], profile: str = "stingray", *, page_size: int = 4096,
               checks: bool = False, simulate_max_ram: int | None = None, seed: int = 0,
               step: Step = no_progress) -> dict:
    """The trade-off of every mode at every (RAM, image) pair whose image is at most half of
    RAM.  ``checks``: purgatory's SHA-256 of the segments (off by default, as in the
    published measurements).  ``profile``: a built-in name or a profile file.

    Returns ``{"profile": fitted profile, "checks", "rows": [...], "simulated": [...]}``;
    each row: ``ram_bytes, image_bytes, mode, linear_map, relocation_s, total_s,
    speedup_vs_mmu_off, memory_bytes, lifetime, transient_bytes, detail``.
    """
    check_sizes(rams, image_sizes, page_size)
    fitted = load_profile(profile)
    rows, simulated = [], []
    for ram, image in _points(rams, image_sizes):
        step(f"model: {ram >> 20:,} MiB RAM, {image >> 20:,} MiB image")
        trade = sim.compare(ram, image, fitted, page_size, checks=checks)
        base = next(t for t in trade if t.mode == "mmu-off").total_s
        for t in trade:
            rows.append({"ram_bytes": ram, "image_bytes": image, **t.to_dict(), "speedup_vs_mmu_off": base / t.total_s})
        if simulate_max_ram is not None and ram <= simulate_max_ram:
            for mode in RELOCATION_MODES:
                step(f"simulate: {ram >> 20:,} MiB RAM, {image >> 20:,} MiB image, {mode}")
                model = next(t for t in trade if t.mode == mode)
                simulated.append({"ram_bytes": ram, "image_bytes": image, "model_total_s": model.total_s,
                                  **_simulated(ram, image, mode, fitted, page_size, checks, seed)})
    return {"profile": fitted.profile.to_dict(), "checks": checks, "page_size": page_size, "rows": rows,
            "simulated": simulated}
