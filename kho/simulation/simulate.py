"""``kho simulate``: preserve, finalize, kexec load, reboot, boot the next kernel, restore, verify.

One :class:`~kho.memory.physical.PhysicalMemory` lives through every generation:

1. the running kernel (the first kernel's :class:`~kho.currentkernel.machine.Machine`, or the previous
   generation's next kernel with its buddy allocator) preserves through
   :class:`kho.handover.outgoing.KHO` what its version hands over — a Linux 7.x system
   (:mod:`kho.simulation.system`: self-test, ``reserve_mem``, kexec-metadata, LUO memfds; the
   default) or the 6.16-era :mod:`kho.simulation.workload` (kernels 6.16 .. 7.0, and ``abi``
   alone) — and finalizes the handover (7.x: places the scratch array; LUO serializes its
   sessions at reboot, after the kexec load);
2. kexec load (:mod:`kho.kexec.kimage`): kernel Image, initramfs, the boot DTB pointing at
   the KHO FDT (arm64) or the params segment (x86_64: ``boot_params`` whose ``setup_data``
   points at it), and (with checks) purgatory, placed in the scratch areas off every page
   that must survive — or, in ``reserved`` mode, loaded in place in a ``kexeckernel=``
   region carved from free scratch; in ``mmu-on`` mode the transitional tables
   (:mod:`kho.kexec.transpgd`);
3. reboot: relocation (:mod:`kho.kexec.relocate`) and purgatory's SHA-256 check;
4. the next kernel boots from the DTB or ``boot_params`` found at its destination (:mod:`kho.nextkernel`),
   and every preserved unit is compared with what the map hands over ("lost");
5. the workload is restored and every checksum verified; units never restored are
   "leaked".

The reboot's time comes from the timing model (:mod:`kho.kexec.timing`) applied to what
was really relocated and hashed.  :func:`compare` is the trade-off report: every
relocation mode's time against its memory cost, without running anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from kho.abi.versions import DEFAULT_KERNEL, KernelVersion, kernel_version
from kho.currentkernel.machine import Machine
from kho.devicetree.layout import FDT_HEADER, fdt_totalsize
from kho.encodings import get_encoding
from kho.errors import KHOError
from kho.handover.imagefile import save_image
from kho.handover.outgoing import ARCH_X86_64, ARCHES, KHO
from kho.handover.x86_boot_params import params_segment_size
from kho.kexec import entries as ent
from kho.kexec import kimage as K
from kho.kexec import purgatory as purg
from kho.kexec import transpgd
from kho.kexec.profiles import load_profile
from kho.kexec.relocate import RELOCATION_MODES, check_mode, relocate
from kho.kexec.timing import FitReport, Timeline, reboot_timeline
from kho.memory import intervals
from kho.memory.intervals import IntervalSet
from kho.nextkernel.boot import KERNEL_IMAGE_ALIGN, boot
from kho.nextkernel.memblock_cost import boot_restore_cost
from kho.simulation import system as SY
from kho.simulation import workload as W

#: Largest kernel Image part of ``image_size`` (the rest is the initramfs), as in the
#: published 13 MB Image + 24 MB initramfs.
KERNEL_IMAGE_MAX = 13 << 20
#: ``kexeckernel=`` regions are sized to the image rounded up to this (bytes).
REGION_ALIGN = 2 << 20
#: Name of the x86_64 params segment (``boot_params`` and its ``setup_data``).
PARAMS_SEGMENT = "params"


@dataclass
class Config:
    """A simulation.  Sizes in bytes; ``profile`` a fitted profile (default: stingray)."""

    ram: int = 8 << 30
    page_size: int = 4096
    kho_scratch: str = "200%"
    preserve: int = 128 << 20
    pattern: str = "selftest"
    #: The kernel version modelled (:mod:`kho.abi.versions`); None: the default (7.3), or, when
    #: ``abi`` is given, kho's encode-at-finalize model of that encoding (a 6.16-style tracker).
    kernel: str | None = None
    #: The preservation-map encoding; None: the one ``kernel`` writes.
    abi: str | None = None
    #: The next kernel's architecture: ``arm64`` (a boot DTB) or ``x86_64`` (boot_params).
    arch: str = "arm64"
    relocation: str = "mmu-on"
    linear_map: str = "page"
    image_size: int = 47 << 20
    generations: int = 1
    seed: int = 0
    checks: bool = True
    boot_path: str = "memblock"
    save_image: str | None = None
    profile: FitReport | None = None

    @property
    def kernel_entry(self) -> KernelVersion | None:
        """The kernel modelled, or None for kho's encode-at-finalize model (``abi`` alone)."""
        if self.kernel is None and self.abi is not None:
            return None
        return kernel_version(DEFAULT_KERNEL if self.kernel is None else self.kernel)

    @property
    def encoding(self) -> str:
        """The encoding written: ``abi``, else what the kernel writes."""
        return self.abi if self.abi is not None else self.kernel_entry.compatible

    @property
    def system(self) -> bool:
        """True when the run is a Linux 7.x system (:mod:`kho.simulation.system`): a stateless
        kernel (7.1+); else the 6.16-era workload (:mod:`kho.simulation.workload`)."""
        entry = self.kernel_entry
        return entry is not None and entry.stateless

    def validate(self) -> None:
        """EINVAL for impossible settings, before anything runs."""
        check_mode(self.relocation)
        if self.arch not in ARCHES:
            raise KHOError("EINVAL", f"unknown architecture {self.arch!r} (one of {', '.join(ARCHES)})")
        if self.arch == ARCH_X86_64 and self.page_size != 4096:
            raise KHOError("EINVAL", f"x86_64 has 4096-byte pages, not {self.page_size}")
        if self.system and self.pattern != W.SELFTEST:
            raise KHOError("EINVAL", f"--pattern {self.pattern} draws the 6.16-era workload's folios: a "
                                     f"{self.kernel_entry.version} system runs the kernel's own self-test")
        transpgd.Granule(self.page_size).block_levels(self.linear_map)
        if self.ram <= 0 or self.ram % self.page_size:
            raise KHOError("EINVAL", f"RAM size {self.ram} is not a positive multiple of the page size")
        if self.preserve > self.ram:
            raise KHOError("EINVAL", f"cannot preserve {self.preserve} bytes in {self.ram} bytes of RAM")
        if self.image_size < 2 * self.page_size:
            raise KHOError("EINVAL", f"an image of {self.image_size} bytes is smaller than two pages")
        if self.image_size > self.ram // 2:
            raise KHOError("EINVAL", f"an image of {self.image_size} bytes is more than half of RAM")
        encoding = get_encoding(self.encoding, self.page_size)
        if not encoding.keeps_orders:
            raise KHOError("EINVAL", f"encoding {self.encoding} does not keep folio orders: the next kernel could not restore folios")
        if self.boot_path == "instructions" and self.encoding != "instructions":
            raise KHOError("EINVAL", f"the instructions boot path reads the instructions encoding, not {self.encoding}")
        if self.boot_path not in ("memblock", "instructions"):
            raise KHOError("EINVAL", f"unknown boot path {self.boot_path!r} (memblock or instructions)")
        if self.generations < 1:
            raise KHOError("EINVAL", f"--generations must be at least 1, not {self.generations}")


@dataclass
class Generation:
    """One kexec: what was preserved, loaded, relocated, booted and verified."""

    index: int
    preserved_units: int
    preserved_pages: int
    metadata_bytes: int
    segments: list[dict]
    kexec_pages: dict[str, int]
    tables: dict | None
    region: dict | None
    relocation: dict
    purgatory: dict | None
    timeline: Timeline
    boot: dict
    verify: W.VerifyReport
    lost_units: int
    leaked_units: int
    host_s: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verify.ok and not self.lost_units and not self.leaked_units

    def to_dict(self) -> dict:
        return {
            "generation": self.index, "ok": self.ok,
            "preserved_units": self.preserved_units, "preserved_pages": self.preserved_pages,
            "metadata_bytes": self.metadata_bytes, "segments": self.segments, "kexec_pages": self.kexec_pages,
            "transitional_tables": self.tables, "kexeckernel_region": self.region, "relocation": self.relocation,
            "purgatory": self.purgatory, "timeline": self.timeline.to_dict(), "next_kernel": self.boot,
            "verify": self.verify.to_dict(), "lost_units": self.lost_units, "leaked_units": self.leaked_units,
            "host_s": self.host_s,
        }


@dataclass
class Result:
    """A whole simulation: its generations and the modelled timeline of every mode."""

    config: Config
    profile: FitReport
    generations: list[Generation]
    timelines: dict[str, Timeline]

    @property
    def ok(self) -> bool:
        return all(g.ok for g in self.generations)

    def speedup(self, mode: str) -> float:
        """Whole-reboot speedup of ``mode`` against mmu-off."""
        return self.timelines["mmu-off"].total_s / self.timelines[mode].total_s

    def to_dict(self) -> dict:
        c = self.config
        return {
            "config": {"ram": c.ram, "page_size": c.page_size, "kho_scratch": c.kho_scratch, "preserve": c.preserve,
                       "pattern": c.pattern, "kernel": None if c.kernel_entry is None else c.kernel_entry.version,
                       "abi": c.encoding, "arch": c.arch, "relocation": c.relocation, "linear_map": c.linear_map,
                       "image_size": c.image_size, "generations": c.generations, "seed": c.seed,
                       "checks": c.checks, "boot_path": c.boot_path},
            "profile": self.profile.to_dict(),
            "ok": self.ok,
            "timelines": {m: {**t.to_dict(), "speedup_vs_mmu_off": self.speedup(m)} for m, t in self.timelines.items()},
            "generations": [g.to_dict() for g in self.generations],
        }


class _KexecKernel:
    """The kernel Image and initramfs kexec loads, ``config.image_size`` bytes: sizes for placement,
    random contents made once (the same kernel is kexec'd every generation) when first loaded."""

    def __init__(self, config: Config, rng: np.random.Generator):
        ps = config.page_size
        kernel = max(ps, min(KERNEL_IMAGE_MAX, config.image_size // 2) // ps * ps)
        self.sizes = {"kernel": kernel, "initrd": config.image_size - kernel}
        self._rng = rng
        self._data: dict[str, bytes] = {}

    def requests(self) -> list[K.SegmentRequest]:
        return [K.SegmentRequest("kernel", b"", memsz=self.sizes["kernel"], align=KERNEL_IMAGE_ALIGN),
                K.SegmentRequest("initrd", b"", memsz=self.sizes["initrd"])]

    def fill(self, segment: K.Segment) -> K.Segment:
        """``segment`` with its contents (segments other than the kernel and initrd unchanged)."""
        if segment.name not in self.sizes:
            return segment
        if segment.name not in self._data:
            self._data[segment.name] = self._rng.bytes(self.sizes[segment.name])
        return K.Segment(self._data[segment.name], segment.mem, segment.memsz, segment.name)


def _free_scratch(memory, allocator, first: bool) -> IntervalSet:
    """Scratch the running kernel does not use, in :data:`REGION_ALIGN` blocks: all of it in
    the first kernel (its allocator never hands scratch out); in a next kernel, the blocks
    its allocator reports entirely free (its own image and early allocations live there)."""
    allowed = K.scratch_pages(memory)
    if first:
        return allowed
    shift = memory.page_shift
    step = REGION_ALIGN >> shift
    starts, ends = [], []
    for lo, hi in zip(allowed.start.tolist(), allowed.end.tolist()):
        for block in range(-(-lo // step) * step, hi - step + 1, step):
            if allocator.is_free(block << shift, REGION_ALIGN):
                starts.append(block)
                ends.append(block + step)
    return IntervalSet.of(starts, ends)


def _boot_next(memory, segments: list[K.Segment], config: Config, handover, seed: int):
    """Boot the next kernel (:func:`kho.nextkernel.boot`) from the DTB kexec loaded (arm64)
    or from the ``boot_params`` of the params segment (x86_64), its image (the first
    segment) where kexec put it."""
    kernel = segments[0]
    if config.arch == ARCH_X86_64:
        params = next(s for s in segments if s.name == PARAMS_SEGMENT)
        return boot(memory, None, config.boot_path, boot_params=params.mem, encoding_options=handover.options,
                    kernel_image=kernel.memsz, image_phys=kernel.mem, seed=seed)
    dtb = next(s for s in segments if s.name == "dtb")
    size = fdt_totalsize(memory.read(dtb.mem, FDT_HEADER.size))
    return boot(memory, memory.read(dtb.mem, min(size, dtb.memsz)), config.boot_path, encoding_options=handover.options,
                kernel_image=kernel.memsz, image_phys=kernel.mem, seed=seed)


def _handoff_request(config: Config, handover) -> K.SegmentRequest:
    """The segment telling the next kernel where the handover is: the boot DTB (arm64) or,
    on x86_64, the params segment (``boot_params`` + ``SETUP_KEXEC_KHO``), whose contents
    depend on where it lands (:func:`_fill_params`)."""
    if config.arch == ARCH_X86_64:
        return K.SegmentRequest(PARAMS_SEGMENT, b"", memsz=params_segment_size())
    return K.SegmentRequest("dtb", handover.boot_dtb())


def _fill_params(segment: K.Segment, handover) -> K.Segment:
    """The params segment with its contents for its destination (other segments unchanged)."""
    if segment.name != PARAMS_SEGMENT:
        return segment
    return K.Segment(handover.params_segment(segment.mem), segment.mem, segment.memsz, segment.name)


class _Stages:
    """The stages of one generation: each announced through ``progress(stage, index)`` and
    its host seconds recorded in ``host_s``."""

    def __init__(self, progress: Callable[[str, int], None], index: int):
        self.progress, self.index = progress, index
        self.host_s: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        self.progress(name, self.index)
        start = time.perf_counter()
        yield
        self.host_s[name] = time.perf_counter() - start


def run(config: Config, progress: Callable[[str, int], None] | None = None) -> Result:
    """Run the simulation of ``config``; ``progress(stage, generation)`` is called as stages start.

    KHOError for impossible configurations (ENOMEM, EADDRNOTAVAIL, EINVAL) and for a
    relocation that breaks the model's checks.  Verification failures do not raise: they
    are in the result (``Result.ok``).
    """
    config.validate()
    profile = config.profile or load_profile("stingray")
    rng = np.random.default_rng(config.seed)
    machine = Machine.boot(config.ram, config.page_size, config.kho_scratch, config.seed)
    memory, allocator = machine.memory, machine.allocator
    kernel = _KexecKernel(config, rng)
    generations: list[Generation] = []
    timelines: dict[str, Timeline] = {}
    for index in range(1, config.generations + 1):
        previous = generations[-1].verify if generations else None  # what the running kernel restored
        stages = _Stages(progress or (lambda stage, gen: None), index)
        generation, nk, moved, hashed = _generation(config, profile, index, memory, allocator, kernel, previous, stages)
        if index == 1:
            t = generation.timeline  # the next kernel's KHO stages do not depend on the relocation mode
            timelines = {m: reboot_timeline(profile.profile, m, moved, hashed, t.kho_restore_s, t.free_list_s)
                         for m in RELOCATION_MODES}
        generations.append(generation)
        memory, allocator = nk.memory, nk.allocator
    return Result(config, profile, generations, timelines)


def _generation(config: Config, profile: FitReport, index: int, memory, allocator, kernel: _KexecKernel,
                previous: W.VerifyReport | None, stage: _Stages):
    """One kexec from the running kernel (``memory``, ``allocator``): release what the last
    generation restored, preserve, finalize, load, relocate, check, boot, verify.  Returns
    ``(Generation, next kernel, bytes relocated, bytes hashed)``."""
    if previous is not None:
        with stage("release"):
            W.release(allocator, previous)
    entry = config.kernel_entry
    with stage("workload"):
        kho = KHO(memory, allocator, config.abi, kernel=None if entry is None else entry.version, arch=config.arch)
        if config.system:
            work = SY.create(kho, allocator, config.preserve, config.seed + index,
                             previous.carried if isinstance(previous, SY.SystemReport) else None)
        else:
            work = W.create(kho, allocator, config.preserve, config.pattern, config.seed + index)
    with stage("finalize"):
        handover = kho.finalize()
        preserved_phys, preserved_order = kho.tracker.units_array()
    with stage("kexec load"):
        image, trans, segments, region = _load(config, memory, allocator, handover, preserved_phys, preserved_order,
                                               kernel, first=index == 1)
    if config.system:
        with stage("LUO serialize"):
            SY.reboot(work)
    if index == 1 and config.save_image:
        save_image(config.save_image, handover)
    with stage("relocation"):
        reloc = relocate(image, config.relocation, trans)
    check = None
    if config.checks:
        with stage("purgatory"):
            check = purg.verify(memory, segments[-1].mem)
            if not check.ok:
                raise KHOError("EINVAL", "purgatory: sha256 digests do not match after relocation")
    with stage("next kernel boot"):
        nk = _boot_next(memory, segments, config, handover, config.seed + index)
    with stage("KHO restore model"):  # the next kernel's KHO stages under the profile
        restore = boot_restore_cost(nk, profile.profile.next_kernel, int(handover.encoded.metadata_pages.size))
    with stage("verify"):
        lost = _lost_units(nk, preserved_phys, preserved_order)
        report = SY.verify(nk, memory, handover.fdt_phys, work) if config.system else W.verify(nk, memory, work)
        leaked = int(nk.leaked()[0].size)
    hashed = check.bytes_hashed if check else 0
    moved = image.nr_pages * memory.page_size
    generation = Generation(
        index, int(preserved_phys.size), kho.tracker.nr_pages, handover.encoded.total_bytes,
        [{"name": s.name, "mem": s.mem, "memsz": s.memsz, "bufsz": s.bufsz} for s in segments],
        {"control": 1, "indirection": int(image.indirection_pages.size), "source": int(image.source_pages.size)},
        None if trans is None else {"pages": trans.nr_pages, "bytes": trans.bytes, "linear_map": config.linear_map,
                                    "by_level": trans.plan.tables_by_level(), "idmap_pages": int(trans.idmap_pages.size)},
        region,
        {"mode": reloc.mode, "pages_copied": reloc.pages_copied, "bytes_copied": reloc.bytes_copied,
         "indirection_pages": reloc.indirection_pages, "tables_read": reloc.tables_read,
         "pages_written": reloc.pages_written},
        None if check is None else {"ok": check.ok, "bytes_hashed": check.bytes_hashed},
        reboot_timeline(profile.profile, config.relocation, moved, hashed, restore.kho_restore_s, restore.free_list_s),
        {**nk.report(), "kho_restore": restore.to_dict()}, report, lost, leaked,
        stage.host_s)
    return generation, nk, moved, hashed


def _load(config, memory, allocator, handover, preserved_phys, preserved_order, kernel: _KexecKernel, first: bool):
    """kexec load: place and load the segments, build the tables for mmu-on.  Returns
    ``(kimage, trans_pgd or None, segments, region dict or None)``."""
    shift = memory.page_shift
    unit_start, unit_end = intervals.of_units(preserved_phys >> np.uint64(shift), preserved_order)
    keep = handover.pages_to_keep() >> np.uint64(shift)
    busy = IntervalSet.of(np.concatenate([unit_start, keep]), np.concatenate([unit_end, keep + np.uint64(1)]))
    requests = kernel.requests() + [_handoff_request(config, handover)]
    region = None
    allowed = K.scratch_pages(memory)
    if config.relocation == "reserved":
        # A kexeckernel= region: free scratch the running kernel does not use, sized to the image.
        ps = memory.page_size
        need = sum(-(-max(len(r.data), r.memsz) // ps) * ps for r in requests) + (ps if config.checks else 0) + KERNEL_IMAGE_ALIGN
        size = -(-need // REGION_ALIGN) * REGION_ALIGN
        free = _free_scratch(memory, allocator, first)
        spot = K.place_segments(memory, [K.SegmentRequest("kexeckernel= region", b"", memsz=size, align=REGION_ALIGN)],
                                free, busy)[0]
        allowed = IntervalSet.of([spot.mem >> shift], [spot.end >> shift])
        region = {"phys": spot.mem, "size": spot.memsz}
    segments = [_fill_params(kernel.fill(seg), handover) for seg in K.place_segments(memory, requests, allowed, busy)]
    if config.checks:
        taken = K.destination_ranges(segments, shift)
        segments += K.place_segments(memory, [K.SegmentRequest("purgatory", purg.build(segments))], allowed.subtract(taken), busy)
    image = K.load(memory, allocator, segments, in_place=config.relocation == "reserved", allowed=allowed, busy=busy)
    trans = None
    if config.relocation == "mmu-on":
        try:
            trans = transpgd.build(memory, lambda n: K.alloc_safe_pages(allocator, n, image.destinations, shift),
                                   config.linear_map, image.control_page)
        except KHOError:
            image.unload(allocator)
            raise
    return image, trans, segments, region


def _lost_units(nk, phys: np.ndarray, order: np.ndarray) -> int:
    """Units preserved by the running kernel that the next kernel did not receive exactly
    (missing, or received but never preserved)."""
    want = set(zip(phys.tolist(), order.tolist()))
    have = set(zip(nk.kho.unit_phys.tolist(), nk.kho.unit_order.tolist()))
    return len(want ^ have)


# -- trade-off report ------------------------------------------------------------------------
@dataclass(frozen=True)
class TradeOff:
    """One relocation mode's reboot time against the memory it costs.

    ``memory_bytes`` is taken at load time and freed by the reboot (``lifetime`` "load")
    or reserved for good (``"forever"``); ``transient_bytes`` are the source pages, a copy
    of the image held until the reboot (none when loaded in place).
    """

    mode: str
    linear_map: str | None
    relocation_s: float
    total_s: float
    memory_bytes: int
    lifetime: str
    transient_bytes: int
    detail: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def compare(ram: int, image_size: int, profile: FitReport, page_size: int = 4096, checks: bool = True) -> list[TradeOff]:
    """Every relocation mode (and linear-map granularity for mmu-on) for ``ram`` bytes of RAM
    in one bank and an image of ``image_size`` bytes.  Tables are counted by building their
    plan (:func:`kho.kexec.transpgd.plan_linear_map`).  O(tables)."""
    if ram <= 0 or ram % page_size or image_size <= 0:
        raise KHOError("EINVAL", "RAM and image sizes must be positive (RAM a multiple of the page size)")
    if image_size > ram // 2:
        raise KHOError("EINVAL", f"an image of {image_size} bytes is more than half of RAM")
    pages = -(-image_size // page_size) + 1 + (1 if checks else 0)  # + DTB, purgatory
    moved = pages * page_size
    hashed = moved - page_size if checks else 0
    ind = ent.nr_indirection_pages(pages + 3 + (1 if checks else 0), page_size)
    base = (1 + ind) * page_size  # control page + indirection pages
    p = profile.profile
    out = []
    for mode in RELOCATION_MODES:
        t = reboot_timeline(p, mode, moved, hashed)
        if mode == "mmu-off":
            out.append(TradeOff(mode, None, t.relocation_s, t.total_s, base, "until reboot", moved,
                                f"control + {ind} indirection page(s)"))
        elif mode == "mmu-on":
            for lm in transpgd.LINEAR_MAPS:
                plan = transpgd.plan_linear_map([(0, ram)], page_size, lm)
                tables = (plan.nr_tables + transpgd.idmap_pages_needed(page_size)) * page_size
                out.append(TradeOff(mode, lm, t.relocation_s, t.total_s, base + tables, "until reboot", moved,
                                    f"{plan.nr_tables} linear-map + {transpgd.idmap_pages_needed(page_size)} idmap table pages"))
        else:
            region = -(-(moved + KERNEL_IMAGE_ALIGN) // REGION_ALIGN) * REGION_ALIGN
            out.append(TradeOff(mode, None, t.relocation_s, t.total_s, region + page_size, "forever", 0,
                                "kexeckernel= region + control page"))
    return out
