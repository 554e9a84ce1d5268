"""Finding the handover in a memory dump.

1. Every page start holding an FDT magic (see :meth:`~kho.dumps.sources.Source.scan`) is a
   candidate; its header bounds the blob (at most :data:`MAX_FDT_BYTES`), which is parsed as
   the kernel's libfdt lookups see it.  A root ``compatible`` in
   :data:`~kho.abi.kexec_handover.KHO_FDT_COMPATIBLES` makes a KHO FDT candidate; a blob with
   ``/chosen/linux,kho-fdt`` is a boot DTB (arm64's handoff); others (sub-node blobs such as
   ``memblock`` or ``kho_test``) are listed as such.
2. The handoff: every page holding an x86 ``boot_params`` signature, its ``setup_data`` chain
   walked (:func:`~kho.handover.x86_boot_params.read_handoff`: cycle-checked, bounded) for a
   ``SETUP_KEXEC_KHO`` node's ``struct kho_data``; and every boot DTB's ``/chosen``.  A
   handoff gives the scratch array.
3. Each KHO FDT candidate's map is decoded (kernel-compatible by default).  The handover is
   the one asked for (``fdt=ADDR``), else the one a handoff names if its map decodes, else
   the only one whose map decodes; several decoding and none named is an error listing
   them (a dump of a second kernel holds its own FDT and the first kernel's stale one,
   whose map pages have usually been reused, so it rarely decodes).

Everything is read through :class:`~kho.dumps.memory.DumpMemory`; units in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Sequence

import numpy as np

from kho.abi.kexec_handover import (
    KHO_CHOSEN_FDT_PROP_NAME,
    KHO_FDT_COMPATIBLE_V1,
    KHO_FDT_COMPATIBLES,
    KHO_SUB_TREE_SIZE_PROP_NAME,
)
from kho.abi.setup_data import BOOT_PARAMS_DTYPE, E820_TYPE_RAM
from kho.devicetree.chosen import parse_chosen
from kho.handover.scratch_array import read_scratch_array
from kho.handover.x86_boot_params import read_handoff
from kho.devicetree.flat import kernel_string_list, parse_fdt, prop_bytes
from kho.devicetree.khofdt import KHOFdt
from kho.devicetree.layout import COMPATIBLE_PROP, FDT_HEADER, FDT_HEADER_FIELDS, FDT_MAGIC
from kho.dumps.subnodes import decode_subnode
from kho.encodings import DecodedMap, Encoding, encoding_for_compatible, get_encoding
from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory, ScratchArea

#: Largest FDT a candidate may claim (arm64's MAX_FDT_SIZE, 2 MiB; a KHO FDT is one page).
MAX_FDT_BYTES = 2 << 20
#: Largest blob read for a sub-node (``blob-size`` beyond it is reported, not read).
MAX_BLOB_BYTES = 64 << 20
#: kho-v1's chunk list with each bitmap size shipped under that compatible (6.17+, 6.16).
KHO_V1_ENCODINGS = (("kho-v1", {"bitmap_bytes": "page"}), ("kho-v1", {"bitmap_bytes": 512}))


#: The note of a handover no handoff names (its scratch areas are unknown).
NO_HANDOFF_NOTE = "no handoff (setup_data SETUP_KEXEC_KHO or /chosen) names this FDT: scratch areas unknown"

@dataclass
class FdtCandidate:
    """An FDT found at a page start.  ``kind``: ``kho`` (root compatible kho-v1..v4),
    ``boot-dtb`` (has ``/chosen/linux,kho-fdt``), ``other`` or ``invalid`` (``error`` says
    why).  For ``kho``: ``decoded`` is the map when it decodes, else ``error``."""

    phys: int
    size: int
    kind: str
    compatible: list[str] = field(default_factory=list)
    error: str | None = None
    fdt: KHOFdt | None = None
    decoded: DecodedMap | None = None
    encoding: str | None = None

    @property
    def decodes(self) -> bool:
        return self.decoded is not None

    def to_json(self) -> dict:
        return {"phys": self.phys, "size": self.size, "kind": self.kind, "compatible": self.compatible,
                "decodes": self.decodes, "units": None if self.decoded is None else len(self.decoded),
                "error": self.error}


@dataclass
class Handoff:
    """Where a next kernel is told to find the handover: ``struct kho_data`` (x86
    ``setup_data`` type 10) or ``/chosen`` (a boot DTB).  ``source`` says which, and where."""

    fdt_addr: int
    fdt_size: int
    scratch_addr: int
    scratch_size: int
    source: str

    def to_json(self) -> dict:
        return {"fdt_addr": self.fdt_addr, "fdt_size": self.fdt_size, "scratch_addr": self.scratch_addr,
                "scratch_size": self.scratch_size, "source": self.source}


@dataclass
class BootParams:
    """An x86 ``boot_params`` found in the dump: usable RAM from its e820 table and the KHO
    handoff its ``setup_data`` chain holds, if any (``error`` when the chain is bad)."""

    phys: int
    e820_ram: list[tuple[int, int]]
    handoff: Handoff | None = None
    error: str | None = None

    def to_json(self) -> dict:
        return {"phys": self.phys, "e820_ram": [{"start": s, "size": n} for s, n in self.e820_ram],
                "handoff": None if self.handoff is None else self.handoff.to_json(), "error": self.error}


@dataclass
class SubNode:
    """A sub-node of the KHO FDT: the blob it points at (``data``, read up to ``blob-size``,
    or the FDT's ``totalsize`` / one page without one), ``format`` ``fdt`` or ``binary``,
    ``compatible`` the blob's root compatible (FDT) or its leading NUL-terminated name;
    ``decoded`` the :mod:`kho.subsystems` object when a reader knows the sub-node (else
    None), ``error`` why the blob could not be read or decoded."""

    name: str
    phys: int | None
    size: int | None
    data: bytes | None = None
    format: str | None = None
    compatible: str | None = None
    error: str | None = None
    decoded: object | None = None

    def to_json(self) -> dict:
        """``name``, ``phys``, ``size``, ``format``, ``compatible``, ``decoded`` (the reader's
        JSON or None) and ``error``."""
        return {"name": self.name, "phys": self.phys, "size": self.size, "format": self.format,
                "compatible": self.compatible, "decoded": None if self.decoded is None else self.decoded.to_json(),
                "error": self.error}


@dataclass
class DumpHandover:
    """The handover found in a dump.  ``decoded``: the preserved units (kernel-compatible
    decoding unless ``strict``); ``scratch``: the areas from the handoff (empty when the dump
    holds none); ``candidates``: every FDT found; ``notes``: what was chosen and why."""

    fdt_phys: int
    fdt_size: int
    compatible: str
    fdt: KHOFdt
    decoded: DecodedMap
    encoding: str
    subnodes: list[SubNode]
    scratch: list[ScratchArea]
    handoff: Handoff | None
    boot_params: list[BootParams]
    candidates: list[FdtCandidate]
    notes: list[str]

    def units(self) -> list[tuple[int, int]]:
        """``(phys, order)`` of every preserved unit, by address."""
        return self.decoded.units()

    def to_json(self) -> dict:
        """Everything found, JSON-ready (spec/dumps.md): ``fdt_phys``, ``fdt_size``, ``compatible``,
        ``encoding``, ``units``, ``units_by_order`` (order -> count), ``map_pages``, ``subtrees``,
        ``scratch``, ``handoff``, ``boot_params``, ``candidates``, ``notes``."""
        orders, counts = np.unique(self.decoded.order, return_counts=True)
        return {"fdt_phys": self.fdt_phys, "fdt_size": self.fdt_size, "compatible": self.compatible,
                "encoding": self.encoding, "units": len(self.decoded),
                "units_by_order": {str(o): int(c) for o, c in zip(orders.tolist(), counts.tolist())},
                "map_pages": int(self.decoded.metadata_pages.size),
                "subtrees": [n.to_json() for n in self.subnodes],
                "scratch": [{"addr": a.addr, "size": a.size, "kind": a.kind} for a in self.scratch],
                "handoff": None if self.handoff is None else self.handoff.to_json(),
                "boot_params": [b.to_json() for b in self.boot_params],
                "candidates": [c.to_json() for c in self.candidates], "notes": self.notes}


# -- reading FDTs ------------------------------------------------------------------------------


def read_fdt(memory: PhysicalMemory, phys: int) -> bytes:
    """The blob at ``phys``, ``totalsize`` bytes as its header claims (KHOFormatError when the
    header is not an FDT's, the size is above :data:`MAX_FDT_BYTES` or runs out of RAM)."""
    if not memory.in_ram(phys, FDT_HEADER.size):
        raise KHOFormatError("fdt.header", "no room for an FDT header in RAM", phys)
    head = dict(zip(FDT_HEADER_FIELDS, FDT_HEADER.unpack(memory.read(phys, FDT_HEADER.size))))
    if head["magic"] != FDT_MAGIC:
        raise KHOFormatError("fdt.header.magic", f"{head['magic']:#010x} is not {FDT_MAGIC:#010x}", phys)
    total = head["totalsize"]
    if not FDT_HEADER.size <= total <= MAX_FDT_BYTES or not memory.in_ram(phys, total):
        raise KHOFormatError("fdt.header.totalsize", f"{total} bytes: not an FDT inside RAM of at most {MAX_FDT_BYTES}", phys)
    return memory.read(phys, total)


def map_encodings(compatible: str, page_size: int) -> list[tuple[str, Encoding]]:
    """The encodings that may read the map of a KHO FDT of ``compatible``: kho-v1's two bitmap
    sizes (both shipped under that compatible), else the one registered for it."""
    if compatible == KHO_FDT_COMPATIBLE_V1:
        return [(f"{name} ({opts['bitmap_bytes']}-byte bitmaps)", get_encoding(name, page_size, **opts))
                for name, opts in KHO_V1_ENCODINGS]
    cls = encoding_for_compatible(compatible)
    return [(cls.name, cls(page_size))]


def classify(memory: PhysicalMemory, phys: int, *, strict: bool = False,
             compatibles: Collection[str] = KHO_FDT_COMPATIBLES) -> FdtCandidate:
    """Read the FDT at ``phys`` and, for a KHO FDT (a root compatible among ``compatibles``),
    decode its map.  Never raises for bad data: the candidate's ``kind`` / ``error`` say what
    it is.  O(blob + map)."""
    try:
        blob = read_fdt(memory, phys)
        tree = parse_fdt(blob, "fdt", strict=False)
    except KHOFormatError as err:
        return FdtCandidate(phys, 0, "invalid", error=str(err))
    names = kernel_string_list(prop_bytes(tree.root.get_property(COMPATIBLE_PROP)) or b"")
    kho = [name for name in names if name in compatibles]
    if not kho:
        chosen = tree.root.get_subnode("chosen")
        kind = "boot-dtb" if chosen is not None and chosen.get_property(KHO_CHOSEN_FDT_PROP_NAME) is not None else "other"
        return FdtCandidate(phys, len(blob), kind, names)
    out = FdtCandidate(phys, len(blob), "kho", names)
    try:
        out.fdt = KHOFdt.from_dtb(blob, kho[0], page_size=memory.page_size, strict=strict)
    except KHOError as err:
        out.error = str(err)
        return out
    decode_map(memory, out, strict=strict)
    return out


def decode_map(memory: PhysicalMemory, candidate: FdtCandidate, *, strict: bool) -> None:
    """Decode a KHO candidate's map with the first of :func:`map_encodings` that reads it,
    setting ``decoded`` and ``encoding``, or ``error`` (every encoding's reason)."""
    candidate.decoded = candidate.encoding = None
    errors = []
    encodings = map_encodings(candidate.fdt.compatible, memory.page_size)
    for name, encoding in encodings:
        try:
            candidate.decoded = encoding.decode(memory, candidate.fdt.props, strict=strict)
            candidate.encoding = name
            candidate.error = None
            return
        except KHOError as err:
            errors.append(f"{name}: {err}" if len(encodings) > 1 else str(err))
    candidate.error = "; ".join(errors)


# -- the handoff -------------------------------------------------------------------------------


def read_boot_params(memory: PhysicalMemory, phys: int) -> BootParams:
    """The ``boot_params`` at ``phys``: e820 RAM, and the handoff of its ``setup_data`` chain
    (:func:`~kho.handover.x86_boot_params.read_handoff`; a bad chain is recorded in ``error``)."""
    params = np.frombuffer(memory.read(phys, BOOT_PARAMS_DTYPE.itemsize), BOOT_PARAMS_DTYPE)[0]
    table = params["e820_table"][:min(int(params["e820_entries"]), len(params["e820_table"]))]
    out = BootParams(phys, [(int(e["addr"]), int(e["size"])) for e in table if int(e["type"]) == E820_TYPE_RAM])
    try:
        chosen = read_handoff(memory, phys)
    except KHOFormatError as err:
        out.error = str(err)
        return out
    if chosen is not None:
        out.handoff = Handoff(chosen.fdt_phys, chosen.fdt_size, chosen.scratch_phys, chosen.scratch_size,
                              f"setup_data SETUP_KEXEC_KHO (boot_params at {phys:#x})")
    return out


def chosen_handoff(memory: PhysicalMemory, candidate: FdtCandidate) -> Handoff | None:
    """The ``/chosen`` KHO properties of a boot DTB candidate, or None when unreadable."""
    try:
        chosen = parse_chosen(read_fdt(memory, candidate.phys), strict=False)
    except KHOError:
        return None
    return Handoff(chosen.fdt_phys, chosen.fdt_size, chosen.scratch_phys, chosen.scratch_size,
                   f"/chosen of the DTB at {candidate.phys:#x}")


# -- sub-nodes ---------------------------------------------------------------------------------


def read_subnodes(memory: PhysicalMemory, kho_fdt: KHOFdt, *, strict: bool = False) -> list[SubNode]:
    """Every sub-node of the KHO FDT with its blob, decoded when a reader knows it
    (:func:`~kho.dumps.subnodes.decode_subnode`), in blob order; a pointer, size or blob that
    cannot be read is recorded in the sub-node's ``error``.  O(blob bytes + decoding)."""
    out = []
    for name, props in kho_fdt.subnode_props().items():
        node = SubNode(name, None, None)
        out.append(node)
        try:
            node.phys = kho_fdt.retrieve_subtree(name)
            node.size = kho_fdt.subtree_size(name)
        except KHOError as err:
            node.error = str(err)
            continue
        if node.size is not None and node.size > MAX_BLOB_BYTES:
            node.error = f"{KHO_SUB_TREE_SIZE_PROP_NAME} {node.size} is above the {MAX_BLOB_BYTES} bytes kho reads"
            continue
        try:
            if node.size is None:
                head = memory.read(node.phys, 4) if memory.in_ram(node.phys, 4) else b""
                node.data = read_fdt(memory, node.phys) if head == FDT_MAGIC.to_bytes(4, "big") else \
                    memory.read(node.phys, min(memory.page_size, _left_in_bank(memory, node.phys)))
            else:
                node.data = memory.read(node.phys, node.size)
        except KHOError as err:
            node.error = str(err)
            continue
        node.format, node.compatible = blob_format(node.data)
        try:
            node.decoded = decode_subnode(memory, name, node.phys, len(node.data), node.compatible, strict=strict)
        except KHOError as err:
            node.error = str(err)
    return out


def _left_in_bank(memory: PhysicalMemory, phys: int) -> int:
    bank = memory.bank_of(phys)
    if bank is None:
        raise KHOFormatError("subnode.phys", "outside RAM", phys)
    return bank.end - phys


def blob_format(data: bytes) -> tuple[str, str | None]:
    """``("fdt", root compatible)`` for an FDT blob, else ``("binary", leading name)``: the
    NUL-terminated printable string a blob starts with (LUO's ``compatible[8]``), if any."""
    if data[:4] == FDT_MAGIC.to_bytes(4, "big"):
        try:
            tree = parse_fdt(data, "blob", strict=False)
        except KHOFormatError:
            return "binary", None
        names = kernel_string_list(prop_bytes(tree.root.get_property(COMPATIBLE_PROP)) or b"")
        return "fdt", names[0] if names else None
    head = data[:64].split(b"\0", 1)
    if len(head) == 2 and head[0] and all(0x20 < c < 0x7F for c in head[0]):
        return "binary", head[0].decode("ascii")
    return "binary", None


# -- choosing ----------------------------------------------------------------------------------


def describe(candidate: FdtCandidate) -> str:
    """One line: where, what, and whether its map decodes."""
    what = ",".join(candidate.compatible) or "no compatible"
    state = (f"map decodes ({len(candidate.decoded)} units)" if candidate.decodes else
             f"map does not decode: {candidate.error}" if candidate.kind == "kho" else candidate.error or "")
    return f"{candidate.phys:#x} {candidate.kind} [{what}] {candidate.size} bytes" + (f": {state}" if state else "")


def find_handover(memory: PhysicalMemory, fdt_pages: np.ndarray, boot_params_pages: np.ndarray, *,
                  what: str, fdt: int | None = None, strict: bool = False, handoffs: Sequence[Handoff] = (),
                  compatibles: Collection[str] = KHO_FDT_COMPATIBLES) -> DumpHandover:
    """The handover in ``memory`` (see the module docstring).  ``fdt_pages`` /
    ``boot_params_pages``: the scanned page starts; ``what`` names the dump in errors;
    ``handoffs``: known besides those found in memory; ``compatibles``: the KHO FDT root
    compatibles looked for (kho's own encodings' too, for a kho image).
    KHOError(ENOENT) when there is no KHO FDT, KHOFormatError when the one asked for or
    every candidate fails to decode, KHOError(EINVAL) when several decode and none is named."""
    candidates = [classify(memory, int(p), strict=strict, compatibles=compatibles) for p in np.unique(fdt_pages).tolist()]
    boot_params = [read_boot_params(memory, int(p)) for p in np.unique(boot_params_pages).tolist()]
    handoffs = list(handoffs) + [b.handoff for b in boot_params if b.handoff is not None]
    handoffs += [h for h in (chosen_handoff(memory, c) for c in candidates if c.kind == "boot-dtb") if h is not None]
    notes = []
    kho = [c for c in candidates if c.kind == "kho"]
    if fdt is not None:
        chosen = next((c for c in candidates if c.phys == fdt), None) or classify(memory, fdt, strict=strict,
                                                                                   compatibles=compatibles)
        if chosen.kind != "kho":
            raise KHOFormatError("fdt", f"{what}: no KHO FDT at the requested address ({describe(chosen)})", fdt)
        if not chosen.decodes:
            raise KHOFormatError("fdt", f"{what}: the KHO FDT asked for does not decode: {chosen.error}", fdt)
        if chosen not in candidates:
            candidates.append(chosen)
        notes.append(f"KHO FDT {fdt:#x} chosen by the caller")
    else:
        if not kho:
            others = "; ".join(describe(c) for c in candidates) or "none"
            raise KHOError("ENOENT", f"{what}: no KHO FDT (root compatible {'/'.join(KHO_FDT_COMPATIBLES)}) at any "
                                     f"page start; FDTs found: {others}")
        decoding = [c for c in kho if c.decodes]
        named = [c for c in decoding if any(h.fdt_addr == c.phys for h in handoffs)]
        if not decoding:
            raise KHOFormatError("fdt", f"{what}: no KHO FDT's map decodes: " + "; ".join(describe(c) for c in kho),
                                 kho[0].phys)
        if len(decoding) == 1:
            chosen = decoding[0]
            why = "the only KHO FDT whose map decodes" if len(kho) > 1 else "the only KHO FDT"
        elif len(named) == 1:
            chosen = named[0]
            why = "named by the handoff"
        else:
            raise KHOError("EINVAL", f"{what}: {len(decoding)} KHO FDTs decode, choose one with fdt=ADDR: "
                                     + "; ".join(describe(c) for c in decoding))
        notes.append(f"KHO FDT {chosen.phys:#x}: {why}")
        for c in kho:
            if c is not chosen:
                notes.append(f"other KHO FDT {describe(c)}")
    handoff = next((h for h in handoffs if h.fdt_addr == chosen.phys), None)
    scratch: list[ScratchArea] = []
    if handoff is None:
        notes.append(NO_HANDOFF_NOTE)
    else:
        try:
            scratch = read_scratch_array(memory, handoff.scratch_addr, handoff.scratch_size, strict=strict)
            memory.set_scratch(scratch)
        except KHOError as err:
            notes.append(f"scratch array from {handoff.source}: {err}")
        if strict and memory.scratch:  # the strict checks of units and metadata against scratch
            decode_map(memory, chosen, strict=True)
            if not chosen.decodes:
                raise KHOFormatError("fdt", f"{what}: the map does not decode against the scratch areas: {chosen.error}",
                                     chosen.phys)
    return DumpHandover(chosen.phys, chosen.size, chosen.fdt.compatible, chosen.fdt, chosen.decoded, chosen.encoding,
                        read_subnodes(memory, chosen.fdt, strict=strict), scratch, handoff, boot_params, candidates, notes)
