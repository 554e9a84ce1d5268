"""The next kernel booted on the handover found in a dump (``kho boot PATH``).

:func:`boot_dump` boots :func:`kho.nextkernel.boot` over the dump's real map and then lets
each known sub-node's owner take back what it handed over, as the kernel's restore paths
do: ``memblock`` revives its ``reserve_mem`` regions where they were, the self-test
restores its folios and recomputes their checksum (the dumped machine's ``csum_partial``,
:data:`kho.subsystems.checksum.CSUM_OF_ARCH`), ``LUO`` its memfds' folios,
``kexec-metadata`` its page.  Each restore's outcome is reported; one that fails is said,
the others go on.

The dump is read-only: the next kernel writes into an :class:`~kho.dumps.overlay.OverlayMemory`
(copy-on-write pages in host memory), never into the dump file.

The next kernel needs the scratch areas (its early allocations are confined to them): from
the handoff the dump holds (x86 ``setup_data`` ``SETUP_KEXEC_KHO`` or a boot DTB's
``/chosen``), else from the caller (``scratch``: the first kernel's ``kho_scratch`` areas,
written as a scratch array into the overlay at the start of the first area), else
KHOError(EINVAL) saying what is missing.  The handover reaches the next kernel in an arm64
style boot DTB (``/chosen``) built for it: the same KHO FDT and scratch array either way.

Units: bytes for ``phys`` and sizes.  O(pages of RAM) numpy work for the boot plus the
restored folios' bytes for the checksum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from kho.currentkernel.scratch import DEFAULT_KERNEL_IMAGE
from kho.devicetree.chosen import build_boot_dtb
from kho.dumps.find import DumpHandover, SubNode
from kho.dumps.overlay import OverlayMemory
from kho.errors import KHOError
from kho.handover.outgoing import ARCH_ARM64, ARCH_X86_64
from kho.handover.scratch_array import pack_scratch_array, scratch_kind
from kho.memory import intervals
from kho.memory.physical import ScratchArea
from kho.nextkernel.boot import NextKernel, boot
from kho.subsystems.checksum import CSUM_OF_ARCH
from kho.subsystems.kexec_metadata import KexecMetadata
from kho.subsystems.kho_test import KhoTest, restore_kho_test
from kho.subsystems.luo import Luo, restore_luo_files
from kho.subsystems.memblock import Memblock


@dataclass
class SubnodeRestore:
    """What restoring one sub-node gave: ``restored`` (True when its owner took everything
    back), ``detail`` (counts, the regions, the checksum) and ``error``."""

    name: str
    restored: bool
    detail: dict = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "restored": self.restored, **self.detail, "error": self.error}


@dataclass
class DumpBoot:
    """The next kernel booted on a dump: ``kernel`` (its report after the restores),
    ``memory`` (the overlay it wrote into), ``scratch`` and where they came from
    (``scratch_source``), ``restores`` (one per sub-node, in the FDT's order)."""

    kernel: NextKernel
    memory: OverlayMemory
    scratch: list[ScratchArea]
    scratch_source: str
    restores: list[SubnodeRestore]

    def to_json(self) -> dict:
        return {**self.kernel.report(),
                "scratch": [{"addr": a.addr, "size": a.size, "kind": a.kind} for a in self.scratch],
                "scratch_source": self.scratch_source,
                "subnodes": [r.to_json() for r in self.restores],
                "overlay_pages": self.memory.nr_stored_pages}


def dump_arch(handover: DumpHandover) -> str | None:
    """The dumped machine's architecture as far as the dump tells: ``x86_64`` when it holds
    an x86 ``boot_params``, ``arm64`` when a boot DTB names a KHO FDT, else None."""
    if handover.boot_params:
        return ARCH_X86_64
    if any(c.kind == "boot-dtb" for c in handover.candidates):
        return ARCH_ARM64
    return None


def scratch_areas(ranges: Sequence[tuple[int, int]]) -> list[ScratchArea]:
    """``(start, size)`` pairs (bytes) as scratch areas in the kernel's array order: lowmem,
    global, node0, ..."""
    return [ScratchArea(start, size, scratch_kind(i)) for i, (start, size) in enumerate(ranges)]


def _check_clear(handover: DumpHandover, scratch: Sequence[ScratchArea], page_size: int) -> None:
    """KHOError(EINVAL) when a given scratch area overlaps a preserved unit, a page of the map
    or the KHO FDT: scratch areas hold none of them (the next kernel allocates there before
    it knows what is preserved), and the scratch array written there would overwrite them.
    O((areas + units) log units)."""
    decoded = handover.decoded
    starts = np.concatenate([decoded.phys.astype(np.uint64), decoded.metadata_pages.astype(np.uint64),
                             np.array([handover.fdt_phys], np.uint64)])
    ends = np.concatenate([decoded.phys.astype(np.uint64) + np.left_shift(np.uint64(page_size), decoded.order.astype(np.uint64)),
                           decoded.metadata_pages.astype(np.uint64) + np.uint64(page_size),
                           np.array([handover.fdt_phys + handover.fdt_size], np.uint64)])
    held = intervals.normalize(starts, ends)
    lo = np.array([a.addr for a in scratch], np.uint64)
    hit = intervals.overlaps(*held, lo, lo + np.array([a.size for a in scratch], np.uint64))
    for area, bad in zip(scratch, hit.tolist()):
        if bad:
            raise KHOError("EINVAL", f"scratch area {area.addr:#x}+{area.size:#x} ({area.kind}) overlaps preserved "
                                     "memory, the map or the KHO FDT: scratch areas hold none of them")


def _handoff_scratch(memory: OverlayMemory, handover: DumpHandover, scratch: Sequence[ScratchArea] | None,
                     what: str) -> tuple[int, int, str]:
    """``(scratch array phys, bytes, where from)`` for the next kernel (see the module docstring)."""
    if scratch:
        memory.set_scratch(scratch)  # areas given by hand: page-aligned, in RAM, disjoint (EINVAL), not trimmed
        _check_clear(handover, scratch, memory.page_size)
        data = pack_scratch_array(scratch)
        first = min(scratch, key=lambda a: a.addr)
        if first.size < len(data):
            raise KHOError("EINVAL", f"scratch area {first.addr:#x}+{first.size:#x} cannot hold the "
                                     f"{len(data)}-byte scratch array")
        memory.check_range(first.addr, len(data), "scratch array")
        memory.write(first.addr, data)
        return first.addr, len(data), "given (--scratch)"
    if handover.handoff is not None:
        return handover.handoff.scratch_addr, handover.handoff.scratch_size, handover.handoff.source
    raise KHOError("EINVAL", f"{what}: no handoff in the dump (x86 setup_data SETUP_KEXEC_KHO or a boot DTB's "
                             "/chosen) names the scratch areas the next kernel boots in: give the first kernel's "
                             "kho_scratch areas with --scratch ADDR+SIZE,...")


def _recomputed(memory, test: KhoTest, csum_impl: str) -> int | None:
    """The self-test's checksum over its folios as they are in ``memory`` (None when they
    cannot be read), for the report of a restore that failed."""
    try:
        return test.checksum(memory, csum_impl)
    except KHOError:
        return None


def restore_subnode(kernel: NextKernel, memory, node: SubNode, csum_impl: str) -> SubnodeRestore:
    """Let the owner of ``node`` take back what it handed over (see the module docstring).
    KHOError from the kernel's restore or a checksum mismatch becomes the entry's error."""
    decoded = node.decoded
    if decoded is None:
        return SubnodeRestore(node.name, False, error=node.error or "kho has no reader for this sub-node")
    detail: dict = {}
    try:
        if isinstance(decoded, Memblock):
            kernel.restore_folio(node.phys)
            for r in decoded.regions:
                kernel.restore_pages(r.start, r.size // memory.page_size)
            detail["regions"] = [{"name": r.name, "start": r.start, "size": r.size} for r in decoded.regions]
        elif isinstance(decoded, KhoTest):
            detail.update(folios=decoded.nr_folios, csum=decoded.csum, implementation=csum_impl,
                          folio_bytes=sum(memory.page_size << o for _, o in decoded.folios))
            try:
                detail["computed"] = restore_kho_test(kernel, memory, decoded, csum_impl)
            except KHOError:
                detail["computed"] = _recomputed(memory, decoded, csum_impl)
                raise
            kernel.restore_folio(node.phys)
        elif isinstance(decoded, Luo):
            files = restore_luo_files(kernel, memory, decoded)
            kernel.restore_folio(decoded.phys)
            if decoded.flbs_pa:
                kernel.restore_folio(decoded.flbs_pa)
            restored = [c for c in files.values() if c is not None]
            detail.update(sessions=len(decoded.sessions), memfds=len(restored), memfd_bytes=sum(map(len, restored)))
        elif isinstance(decoded, KexecMetadata):
            kernel.restore_folio(node.phys)
            detail.update(version=decoded.version, previous_release=decoded.previous_release,
                          kexec_count=decoded.kexec_count)
        else:
            return SubnodeRestore(node.name, False, error="kho does not model this sub-node's restore")
    except KHOError as err:
        return SubnodeRestore(node.name, False, detail, str(err))
    return SubnodeRestore(node.name, True, detail)


def boot_dump(dump, handover: DumpHandover, *, scratch: Sequence[ScratchArea] | None = None, path: str = "memblock",
              kernel_image: int = DEFAULT_KERNEL_IMAGE, arch: str | None = None) -> DumpBoot:
    """Boot the next kernel on ``handover`` (found in ``dump``, a :class:`~kho.dumps.open.Dump`)
    and restore every known sub-node (see the module docstring).  ``scratch``: the scratch
    areas when the dump holds no handoff (they replace the handoff's when given); ``arch``:
    the dumped machine's (x86_64 or arm64; picks the checksum, x86_64's when None).  The
    map is read as leniently as the kernel reads it.  KHOError(EINVAL) without scratch
    areas; the kernel's boot errors pass through."""
    memory = OverlayMemory(dump.memory)
    scratch_phys, scratch_size, source = _handoff_scratch(memory, handover, scratch, dump.path)
    dtb = build_boot_dtb(handover.fdt_phys, handover.fdt_size, scratch_phys, scratch_size)
    kernel = boot(memory, dtb, path=path, kernel_image=kernel_image, strict=False)
    impl = CSUM_OF_ARCH.get(arch or ARCH_X86_64, CSUM_OF_ARCH[ARCH_X86_64])
    restores = [restore_subnode(kernel, memory, node, impl) for node in handover.subnodes] if kernel.revived else []
    return DumpBoot(kernel, memory, list(memory.scratch), source, restores)
