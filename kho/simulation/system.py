"""What a Linux 7.x system hands over at each kexec, as a real 7.3 system does, and what its
next kernel takes back.

The running kernel (:func:`create`) adds the sub-nodes its version writes
(:attr:`kho.abi.versions.KernelVersion.sub_nodes`, in the order a booting kernel adds
them, each through :mod:`kho.subsystems`):

- ``kexec-metadata``: its release and ``kexec_count`` = the count it received + 1 (0 on a
  cold boot, so generation ``g`` writes ``g``);
- ``kho_test``: the self-test's folios (``lib/test_kho.c``, ``max_mem`` = the workload's
  size), checksummed with the architecture's ``csum_partial``;
- ``LUO``: the orchestrator (``liveupdate_num`` = the number received + 1) and, from user
  space, :data:`MEMFDS`: sessions holding memfds, serialized at reboot only
  (:func:`reboot`; ``sessions_pa`` is 0 before);
- ``memblock``: the ``reserve_mem`` regions (:data:`RESERVE_MEM`): carved top-down from
  free memory outside scratch on a cold boot, revived at the same addresses afterwards.
  An 8 MiB-aligned 8 MiB region is one order-11 unit with 4 KiB pages, as on the real
  arm64 dump.

The next kernel (:func:`verify`) uses only what was handed over: it reads every sub-node
strictly, revives the ``reserve_mem`` regions in place (their contents compared with the
digest taken before the reboot), restores the self-test's folios (``csum`` recomputed),
retrieves the LUO sessions and restores every memfd (contents compared), and takes back
every page the sub-nodes used.  What the model carries from one kernel to the next beyond
KHO (:class:`Carried`: the memfds' contents as user space keeps them, the digests to
compare) is the check's reference, not an input of the restore.

Units: ``phys`` and sizes in bytes, orders log2 pages.  Cost: O(bytes preserved) (the
self-test's data is generated content; the checksum reads it once).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kho.abi.kexec_metadata import KHO_METADATA_NODE_NAME
from kho.abi.luo import LUO_KHO_ENTRY_NAME
from kho.abi.memblock import MEMBLOCK_KHO_FDT
from kho.abi.memfd import F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK
from kho.abi.test_kho import KHO_TEST_FDT
from kho.abi.versions import KernelVersion
from kho.errors import KHOError
from kho.memory.physical import PhysicalMemory
from kho.simulation.workload import VerifyReport
from kho.subsystems.checksum import CSUM_OF_ARCH
from kho.subsystems.kexec_metadata import read_kexec_metadata, write_kexec_metadata
from kho.subsystems.kho_test import read_kho_test, restore_kho_test, write_kho_test
from kho.subsystems.luo import OutgoingLuo, read_luo, restore_luo_files
from kho.subsystems.memblock import ReservedRegion, read_memblock, write_memblock

MIB = 1 << 20
#: The ``reserve_mem=SIZE:ALIGN:NAME`` regions of the simulated command line (bytes).
RESERVE_MEM = (("kho_sim_big", 8 * MIB, 8 * MIB),)
#: The memfds user space preserves: ``(session, token, size in bytes, seals)``.  Two
#: sessions, three memfds (as in the real arm64 run), one of them sealed and not a whole
#: number of pages.
MEMFDS = (("kho-sim-db", 1, 64 << 12, 0),
          ("kho-sim-db", 2, 10_000, F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW),
          ("kho-sim-vm", 0x10, 1 * MIB, 0))


def release_string(kernel: KernelVersion) -> str:
    """The ``uname -r`` of the simulated kernel (kexec-metadata's ``previous_release``)."""
    return f"{kernel.version}.0-kho-sim"


@dataclass
class Carried:
    """What a kernel received from the previous one, for the next generation: the counts
    read from kexec-metadata and LUO (0 on a cold boot), the revived ``reserve_mem``
    regions with their contents' digests, and each memfd's contents by ``(session,
    token)`` with its seals."""

    kexec_count: int = 0
    liveupdate_num: int = 0
    regions: tuple[ReservedRegion, ...] = ()
    region_digests: dict[str, bytes] = field(default_factory=dict)
    memfds: dict[tuple[str, int], tuple[bytes, int]] = field(default_factory=dict)


@dataclass
class SystemWorkload:
    """What the running kernel handed over (for the check after the reboot)."""

    kernel: KernelVersion
    arch: str
    release: str
    kexec_count: int
    liveupdate_num: int
    regions: tuple[ReservedRegion, ...]
    region_digests: dict[str, bytes]
    test_folios: int
    test_bytes: int
    test_csum: int
    memfds: dict[tuple[str, int], tuple[bytes, int]]
    luo: OutgoingLuo | None
    #: The KHO FDT page is preserved (the live model); not with an encoding the kernel does
    #: not write (kho's encode-at-finalize model).
    fdt_preserved: bool = True


@dataclass
class SystemReport(VerifyReport):
    """:class:`~kho.simulation.workload.VerifyReport` (``folios`` / ``folio_bytes``: the
    self-test's) plus what the 7.x sub-nodes said and what was checked; ``carried`` is what
    the next generation starts from."""

    kexec_count: int | None = None
    previous_release: str | None = None
    csum: int | None = None
    regions: list[dict] = field(default_factory=list)
    liveupdate_num: int | None = None
    sessions: int = 0
    memfds: int = 0
    memfd_bytes: int = 0
    carried: Carried = field(default_factory=Carried)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "kexec_count": self.kexec_count, "previous_release": self.previous_release,
                "kho_test_csum": self.csum, "reserve_mem": self.regions, "liveupdate_num": self.liveupdate_num,
                "luo_sessions": self.sessions, "memfds": self.memfds, "memfd_bytes": self.memfd_bytes}


def _carve_region(memory: PhysicalMemory, allocator, name: str, size: int, align: int) -> ReservedRegion:
    """``reserve_mem``'s memblock allocation on a cold boot: the highest ``align``-aligned
    free range of ``size`` bytes outside scratch, taken from ``allocator``.  ENOMEM when
    none is free.  O(RAM / align)."""
    for bank in reversed(memory.banks):
        start = (bank.end - size) // align * align
        while start >= bank.start:
            if not memory.overlaps_scratch(start, size) and allocator.is_free(start, size):
                allocator.reserve(start, size)
                return ReservedRegion(name, start, size)
            start -= align
    raise KHOError("ENOMEM", f"reserve_mem {name}: no free {size}-byte range aligned to {align} bytes")


def check_fits(memory: PhysicalMemory, allocator, size: int) -> None:
    """ENOMEM when the self-test's ``size`` bytes, the memfds and the regions cannot be
    free at once (checked before anything is generated).  O(1)."""
    need = size + sum(s for _, _, s, _ in MEMFDS) + sum(s for _, s, _ in RESERVE_MEM)
    if need > allocator.nr_free_pages * memory.page_size:
        raise KHOError("ENOMEM", f"cannot preserve {need} bytes: only {allocator.nr_free_pages * memory.page_size} "
                                 f"bytes are free")


def create(kho, allocator, size: int, seed: int, carried: Carried | None = None) -> SystemWorkload:
    """Boot-time and user-space preservation of a 7.x kernel through ``kho`` (a stateless
    :class:`~kho.handover.outgoing.KHO` with a ``kernel``): see the module docstring.
    ``size``: the self-test's ``max_mem`` (bytes); ``carried``: what this kernel received
    (None on a cold boot).  KHOError from the writers (ENOMEM, E2BIG, EINVAL).  O(size)."""
    memory, tracker, kernel = kho.memory, kho.tracker, kho.kernel
    carried = carried or Carried()
    check_fits(memory, allocator, size)
    rng = np.random.default_rng(seed)
    work = SystemWorkload(kernel, kho.arch, release_string(kernel), carried.kexec_count + 1,
                          carried.liveupdate_num + 1, carried.regions, dict(carried.region_digests), 0, 0, 0,
                          dict(carried.memfds), None, kho.live)
    for name in kernel.sub_nodes:
        if name == KHO_METADATA_NODE_NAME:
            blob = write_kexec_metadata(memory, allocator, tracker, work.release, carried.kexec_count)
            kho.add_subtree(blob.name, blob.phys, blob.size)
        elif name == KHO_TEST_FDT:
            test = write_kho_test(memory, allocator, tracker, size, int(rng.integers(2**62)), CSUM_OF_ARCH[kho.arch])
            kho.add_subtree(KHO_TEST_FDT, test.phys, test.size)
            work.test_folios, work.test_csum = test.nr_folios, test.csum
            work.test_bytes = sum(memory.page_size << o for _, o in test.folios)
        elif name == LUO_KHO_ENTRY_NAME:
            work.luo = OutgoingLuo(memory, allocator, tracker, carried.liveupdate_num)
            kho.add_subtree(work.luo.blob.name, work.luo.blob.phys, work.luo.blob.size)
        elif name == MEMBLOCK_KHO_FDT:
            if not work.regions:
                work.regions = tuple(_carve_region(memory, allocator, *r) for r in RESERVE_MEM)
                for i, r in enumerate(work.regions):
                    memory.fill_pattern(r.start, r.size, int(rng.integers(1, 2**62)) + i)
                    work.region_digests[r.name] = memory.digest(r.start, r.size)
            blob = write_memblock(memory, allocator, tracker, work.regions)
            kho.add_subtree(blob.name, blob.phys, blob.size)
    if work.luo is not None:  # user space: sessions and their memfds
        for session, token, nbytes, seals in MEMFDS:
            contents, seals = work.memfds.get((session, token)) or (rng.bytes(nbytes), seals)
            if session not in work.luo.sessions:
                work.luo.create_session(session)
            work.luo.preserve_memfd(session, token, contents, seals=seals)
            work.memfds[(session, token)] = (contents, seals)
    return work


def reboot(work: SystemWorkload) -> None:
    """``liveupdate_reboot``: LUO serializes its sessions and files into their blocks (the
    preserved set does not change).  O(sessions + files)."""
    if work.luo is not None:
        work.luo.serialize()


def _blob(kernel, name: str) -> tuple[int, int]:
    return kernel.retrieve_subtree(name), kernel.kho.fdt.subtree_size(name)


def verify(kernel, memory: PhysicalMemory, fdt_phys: int, work: SystemWorkload) -> SystemReport:
    """The next ``kernel`` (a :class:`~kho.nextkernel.boot.NextKernel`) takes back what a
    7.x kernel handed over; see the module docstring.  ``fdt_phys``: the KHO FDT the kernel
    was pointed at (a 7.x kernel preserves that page; ``kho_in`` keeps it, the model takes
    it back with the rest).  ``work`` (what was handed over) gives the expected counts,
    digests and contents.  Failures are recorded, not raised.  ``restored_units`` lists
    every unit taken back except the revived regions, which the kernel keeps.
    O(bytes preserved)."""
    report = SystemReport()
    ps = memory.page_size
    arch = CSUM_OF_ARCH[work.arch]
    carried = report.carried
    names = set(kernel.kho.fdt.subtrees()) if kernel.kho.fdt is not None else set()
    wanted = set(work.kernel.sub_nodes)
    for name in sorted(wanted - names):
        report.failures.append(f"{name}: sub-node not handed over")
    kept: list[tuple[int, int]] = []  # revived regions: [start, end) bytes

    def step(name: str, action) -> None:
        if name not in names:
            return
        try:
            action()
        except KHOError as err:
            report.failures.append(f"{name}: {err}")

    def metadata() -> None:
        phys, size = _blob(kernel, KHO_METADATA_NODE_NAME)
        md = read_kexec_metadata(memory, phys, size)
        kernel.restore_folio(phys)
        report.kexec_count, report.previous_release = md.kexec_count, md.previous_release
        carried.kexec_count = md.kexec_count
        if (md.kexec_count, md.previous_release) != (work.kexec_count, work.release):
            report.failures.append(f"kexec-metadata: count {md.kexec_count} of {md.previous_release!r}, "
                                   f"{work.kexec_count} of {work.release!r} handed over")

    def memblock() -> None:
        phys, size = _blob(kernel, MEMBLOCK_KHO_FDT)
        mb = read_memblock(memory, phys, size)
        kernel.restore_folio(phys)
        for r in mb.regions:
            kernel.restore_pages(r.start, r.size // ps)  # revived where it was: the kernel keeps it
            kept.append((r.start, r.start + r.size))
            digest = memory.digest(r.start, r.size)
            ok = digest == work.region_digests.get(r.name)
            if not ok:
                report.failures.append(f"reserve_mem {r.name}: contents changed across the kexec")
            report.regions.append({**r.to_json(), "revived": True, "contents_ok": ok})
            carried.region_digests[r.name] = digest
        carried.regions = mb.regions
        if {(r.name, r.start, r.size) for r in mb.regions} != \
                {(r.name, r.start, r.size) for r in work.regions}:
            report.failures.append("memblock: the regions handed over are not the regions reserved")

    def self_test() -> None:
        phys, size = _blob(kernel, KHO_TEST_FDT)
        test = read_kho_test(memory, phys, size)
        report.csum = restore_kho_test(kernel, memory, test, arch)
        kernel.restore_folio(phys)
        report.folios = test.nr_folios
        report.folio_bytes = sum(ps << o for _, o in test.folios)
        if (test.nr_folios, test.csum) != (work.test_folios, work.test_csum):
            report.failures.append(f"kho_test: {test.nr_folios} folios, csum {test.csum:#x}; "
                                   f"{work.test_folios}, {work.test_csum:#x} handed over")

    def luo() -> None:
        phys, size = _blob(kernel, LUO_KHO_ENTRY_NAME)
        state = read_luo(memory, phys, size)
        files = restore_luo_files(kernel, memory, state)
        kernel.restore_folio(state.phys)
        kernel.restore_folio(state.flbs_pa)
        report.liveupdate_num, report.sessions = state.liveupdate_num, len(state.sessions)
        carried.liveupdate_num = state.liveupdate_num
        seals = {(s.name, f.token): f.memfd.seals for s in state.sessions for f in s.files if f.memfd is not None}
        for key, contents in files.items():
            if contents is None:
                continue
            report.memfds += 1
            report.memfd_bytes += len(contents)
            carried.memfds[key] = (contents, seals[key])
            if (contents, seals[key]) != work.memfds.get(key):
                report.failures.append(f"memfd {key[0]}/{key[1]:#x}: contents or seals differ")
        for key in sorted(set(work.memfds) - set(files)):
            report.failures.append(f"memfd {key[0]}/{key[1]:#x}: not handed over")
        if state.liveupdate_num != work.liveupdate_num:
            report.failures.append(f"LUO: liveupdate_num {state.liveupdate_num}, {work.liveupdate_num} handed over")

    step(KHO_METADATA_NODE_NAME, metadata)
    step(MEMBLOCK_KHO_FDT, memblock)
    step(KHO_TEST_FDT, self_test)
    step(LUO_KHO_ENTRY_NAME, luo)
    if kernel.revived and work.fdt_preserved:
        try:
            kernel.restore_folio(fdt_phys)
        except KHOError as err:
            report.failures.append(f"KHO FDT page: {err}")
    report.restored_units = _restored(kernel, kept)
    return report


def _restored(kernel, kept: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Every unit the next kernel received and took back, but those inside the ``kept``
    ranges (a region can be several units: the 6.16-style tracker caps the split).
    O(units * regions)."""
    left = set(kernel.leaked()[0].tolist())
    return [(p, o) for p, o in zip(kernel.kho.unit_phys.tolist(), kernel.kho.unit_order.tolist())
            if p not in left and not any(lo <= p < hi for lo, hi in kept)]
