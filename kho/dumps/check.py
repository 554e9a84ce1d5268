"""The lint to run before a live update: is everything the handover references preserved?

:func:`check_dump` opens nothing itself: it takes a :class:`~kho.dumps.open.Dump` and reports
:class:`Finding` s (each a problem the next kernel would meet):

* ``not-preserved``: a range reachable from the KHO FDT (the FDT itself from kho-v3 on, every
  sub-node blob within its ``blob-size``, what each decoded sub-node points at: vmalloc
  chunks and pages, LUO blocks, memfd records and folios, the self-test's folios,
  ``reserve_mem`` regions) not wholly inside the union of the preserved units: data the next
  kernel may overwrite.  The map's own pages and the scratch array are exempt (the next
  kernel reads them before it allocates anything);
* ``overlap``: preserved units that share pages (the kernel accepts it, a map should not);
* ``in-scratch``: a unit inside a scratch area (the handoff's, or the areas the caller gives
  when the dump holds no handoff);
* ``subnode``: a sub-node whose pointer, size or blob cannot be read or decoded;
* ``strict``: the map decodes only as leniently as the kernel reads it (kho's strict checks
  name what is off).

Also listed, not as findings: ``unreferenced`` units (preserved, but no structure kho knows
points into them: another subsystem's, or a leak) and notes (unknown sub-nodes, missing
handoff).  O(units + references) after the decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kho.abi.kexec_handover import KHO_FDT_COMPATIBLE_V1, KHO_FDT_COMPATIBLE_V2
from kho.dumps.find import NO_HANDOFF_NOTE, DumpHandover
from kho.dumps.subnodes import referenced_ranges
from kho.errors import KHOError
from kho.memory import intervals
from kho.memory.physical import ScratchArea
from kho.subsystems.common import RangeKind

#: Range kinds exempt from the preservation check (read before any allocation).
EXEMPT = (RangeKind.MAP, RangeKind.SCRATCH)


@dataclass(frozen=True)
class Finding:
    """One problem: its ``kind`` (see the module docstring), where (phys and size in bytes,
    None when it has no address) and a sentence."""

    kind: str
    phys: int | None
    size: int | None
    message: str

    def to_json(self) -> dict:
        return {"kind": self.kind, "phys": self.phys, "size": self.size, "message": self.message}


@dataclass
class CheckReport:
    """What :func:`check_dump` found.  ``ok``: no findings."""

    fdt_phys: int
    compatible: str
    units: int
    references: int
    findings: list[Finding] = field(default_factory=list)
    unreferenced: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict:
        return {"ok": self.ok, "fdt_phys": self.fdt_phys, "compatible": self.compatible, "units": self.units,
                "references": self.references, "findings": [f.to_json() for f in self.findings],
                "unreferenced": [{"phys": p, "order": o} for p, o in self.unreferenced], "notes": self.notes}


def check_handover(handover: DumpHandover, page_size: int, strict_error: str | None = None,
                   scratch: list[ScratchArea] | None = None) -> CheckReport:
    """The findings of one handover (see the module docstring); ``strict_error``: why strict
    decoding failed, if it did; ``scratch``: the scratch areas to check the units against
    instead of the handoff's (a dump without a handoff)."""
    decoded = handover.decoded
    phys = decoded.phys.astype(np.int64)
    end = phys + np.left_shift(page_size, decoded.order.astype(np.int64))
    refs = referenced_ranges(handover, page_size)
    notes = list(handover.notes)
    if scratch is not None:
        notes = [n for n in notes if n != NO_HANDOFF_NOTE]
        notes.append("scratch areas as given: " + ", ".join(f"{a.kind} {a.addr:#x}+{a.size:#x}" for a in scratch))
    report = CheckReport(handover.fdt_phys, handover.compatible, len(decoded), len(refs), notes=notes)
    preserved = intervals.normalize(phys, end)
    if handover.compatible in (KHO_FDT_COMPATIBLE_V1, KHO_FDT_COMPATIBLE_V2):
        refs = [r for r in refs if r.kind != RangeKind.FDT]  # before kho-v3 the FDT was a kexec segment
    checked = [r for r in refs if r.size and r.kind not in EXEMPT]
    r_start = np.array([r.phys for r in checked], np.int64)
    r_end = r_start + np.array([r.size for r in checked], np.int64)
    for i in np.flatnonzero(~intervals.within(*preserved, r_start, r_end)).tolist():
        r = checked[i]
        missing = intervals.size(*intervals.subtract(r_start[i:i + 1], r_end[i:i + 1], *preserved))
        report.findings.append(Finding("not-preserved", r.phys, r.size, f"{r.what}: {missing} of its {r.size} bytes "
                                                                      "are not in any preserved unit"))
    for i in (np.flatnonzero(phys[1:] < np.maximum.accumulate(end)[:-1]) + 1).tolist():
        report.findings.append(Finding("overlap", int(phys[i]), int(end[i] - phys[i]),
                                       f"unit {int(phys[i]):#x} order {int(decoded.order[i])} overlaps an earlier unit"))
    for area in handover.scratch if scratch is None else scratch:
        for i in np.flatnonzero((phys < area.end) & (end > area.addr)).tolist():
            report.findings.append(Finding("in-scratch", int(phys[i]), int(end[i] - phys[i]),
                                           f"unit {int(phys[i]):#x} order {int(decoded.order[i])} is in the {area.kind} "
                                           f"scratch area {area.addr:#x}+{area.size:#x}"))
    for node in handover.subnodes:
        if node.error is not None:
            report.findings.append(Finding("subnode", node.phys, node.size, f"sub-node {node.name}: {node.error}"))
        elif node.decoded is None:
            report.notes.append(f"sub-node {node.name} ({node.compatible or node.format}): no reader, its blob only checked")
    if strict_error is not None:
        report.findings.append(Finding("strict", handover.fdt_phys, None, f"the map decodes only leniently: {strict_error}"))
    all_start = np.array([r.phys for r in refs], np.int64)
    referenced = intervals.normalize(all_start, all_start + np.array([r.size for r in refs], np.int64))
    lonely = ~intervals.overlaps(*referenced, phys, end)
    report.unreferenced = list(zip(phys[lonely].tolist(), decoded.order[lonely].tolist()))
    return report


def check_dump(dump, *, fdt: int | None = None, scratch: list[ScratchArea] | None = None) -> CheckReport:
    """Find the handover in ``dump`` (kernel-compatible decoding), try kho's strict decoding
    too, and check it (against ``scratch`` when given, see :func:`check_handover`).
    KHOError when no handover can be read (the caller's "unreadable")."""
    handover = dump.handover(fdt=fdt)
    try:
        dump.handover(fdt=handover.fdt_phys, strict=True)
        strict_error = None
    except KHOError as err:
        strict_error = str(err)
    return check_handover(handover, dump.page_size, strict_error, scratch)
