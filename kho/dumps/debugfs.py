"""debugfs's ``kho/out`` and ``kho/in`` directories: the KHO FDT and the sub-node blobs,
without a memory map (the map's pages are in memory, not in debugfs).  Each blob is decoded
by its sub-node reader on the blob alone (:class:`BlobMemory`): a self-contained one
(``memblock``, ``kexec-metadata``, ``kho_test``'s FDT) decodes, one that points elsewhere
(LUO's sessions and FLB page, the self-test's folio list) gets an ``error`` saying so.

Layout (Linux 7.x): ``fdt`` (the KHO root FDT), ``sub_fdts/<name>`` (each sub-node's blob,
``blob-size`` bytes); ``out`` also has ``scratch_phys`` and ``scratch_len`` (u64 arrays,
one per scratch area).  The kernel sizes ``out/fdt`` when it creates the file, before later
sub-nodes grow the FDT, so reading it yields a prefix of the blob: :func:`read_debugfs`
reads what is there, says so (``truncated``), and recovers the nodes and property values
present (:func:`partial_fdt`; a property whose name lies in the missing strings block is
named ``<nameoff N>``).  Sizes are bounded: at most :data:`MAX_DEBUGFS_FILE` bytes a file,
:data:`MAX_SUB_FDTS` sub-nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from kho.abi.kexec_handover import KHO_FDT_COMPATIBLES
from kho.devicetree import layout
from kho.devicetree.flat import kernel_string_list, parse_fdt, prop_bytes
from kho.devicetree.khofdt import DEFAULT_PAGE_SIZE, KHOFdt
from kho.dumps.find import SubNode, blob_format
from kho.dumps.subnodes import decode_subnode
from kho.errors import KHOError, KHOFormatError
from kho.files import read_bounded
from kho.handover.scratch_array import scratch_kind
from kho.memory.physical import ScratchArea

#: Largest debugfs file read (a KHO blob is at most a MAX_PAGE_ORDER block).
MAX_DEBUGFS_FILE = 64 << 20
#: Most ``sub_fdts`` entries read.
MAX_SUB_FDTS = 4096
#: File names in a ``kho/out`` or ``kho/in`` directory.
FDT_FILE = "fdt"
SUB_FDTS_DIR = "sub_fdts"
SCRATCH_PHYS_FILE = "scratch_phys"
SCRATCH_LEN_FILE = "scratch_len"


class BlobMemory:
    """One blob as the only memory there is: ``data`` at ``base`` (bytes), so a sub-node reader
    can decode a blob debugfs shows; whatever the blob points at is outside this "RAM"."""

    def __init__(self, data: bytes, base: int, page_size: int = DEFAULT_PAGE_SIZE):
        self.data, self.base, self.page_size = data, base, page_size

    def in_ram(self, phys: int, size: int) -> bool:
        return self.base <= phys and phys + size <= self.base + len(self.data)

    def read(self, phys: int, size: int) -> bytes:
        if not self.in_ram(phys, size):
            raise KHOError("EINVAL", f"{phys:#x}+{size:#x} is outside the blob debugfs holds")
        return self.data[phys - self.base:phys - self.base + size]


@dataclass
class PartialNode:
    """A node recovered from a truncated FDT: its name and properties (name -> raw value)."""

    name: str
    props: dict[str, bytes] = field(default_factory=dict)


@dataclass
class DebugfsHandover:
    """A debugfs ``kho/out`` or ``kho/in`` directory read.  ``fdt``: the KHO FDT when whole and
    valid; ``truncated``: the file holds fewer bytes than the header's ``totalsize`` (then
    ``partial`` lists what could be recovered); ``subnodes``: every ``sub_fdts`` blob (no
    physical address: debugfs has none); ``scratch``: from ``scratch_phys``/``scratch_len``."""

    path: str
    fdt_bytes: bytes
    totalsize: int
    compatible: str | None
    fdt: KHOFdt | None
    truncated: bool
    partial: list[PartialNode]
    subnodes: list[SubNode]
    scratch: list[ScratchArea]
    notes: list[str]
    format: str = "debugfs"

    def to_json(self) -> dict:
        """``source`` (``format`` debugfs), ``compatible``, ``truncated``, ``fdt_bytes`` and
        ``totalsize``, ``partial`` (when truncated), ``subtrees``, ``scratch``, ``notes``."""
        return {"source": {"path": self.path, "format": self.format}, "compatible": self.compatible,
                "truncated": self.truncated, "fdt_bytes": len(self.fdt_bytes), "totalsize": self.totalsize,
                "partial": [{"node": n.name, "props": {k: v.hex() for k, v in n.props.items()}} for n in self.partial],
                "subtrees": [n.to_json() for n in self.subnodes],
                "scratch": [{"addr": a.addr, "size": a.size, "kind": a.kind} for a in self.scratch], "notes": self.notes}


def _read(path: str) -> bytes:
    """A debugfs file's bytes: a regular file of at most :data:`MAX_DEBUGFS_FILE` bytes
    (:func:`~kho.files.read_bounded`; debugfs gives each blob file its size)."""
    return read_bounded(path, MAX_DEBUGFS_FILE, "debugfs file")


def partial_fdt(data: bytes) -> list[PartialNode]:
    """Nodes and properties of an FDT cut short (``data`` is a prefix of the blob whose
    header is valid): the structure block is walked until the bytes run out.  Node paths
    are ``/``-joined; a property name outside the bytes present is ``<nameoff N>``.
    O(len(data))."""
    head = dict(zip(layout.FDT_HEADER_FIELDS, layout.FDT_HEADER.unpack_from(data)))
    strings = head["off_dt_strings"]
    pos = head["off_dt_struct"]
    nodes: list[PartialNode] = []
    stack: list[str] = []
    current: PartialNode | None = None
    while pos + layout.FDT_TOKEN.size <= len(data):
        token = layout.FDT_TOKEN.unpack_from(data, pos)[0]
        pos += layout.FDT_TOKEN.size
        if token == layout.FDT_BEGIN_NODE:
            stop = data.find(b"\0", pos)
            if stop < 0:
                break
            stack.append(data[pos:stop].decode("latin-1"))
            current = PartialNode("/" + "/".join(s for s in stack if s))
            nodes.append(current)
            pos = (stop + 1 + layout.FDT_TAG_ALIGN - 1) & ~(layout.FDT_TAG_ALIGN - 1)
        elif token == layout.FDT_END_NODE:
            if not stack:
                break
            stack.pop()
            current = None
        elif token == layout.FDT_PROP and current is not None:
            if pos + layout.FDT_PROP_HEADER.size > len(data):
                break
            length, nameoff = layout.FDT_PROP_HEADER.unpack_from(data, pos)
            pos += layout.FDT_PROP_HEADER.size
            if pos + length > len(data):
                break
            at = strings + nameoff
            stop = data.find(b"\0", at) if at < len(data) else -1
            name = data[at:stop].decode("latin-1") if stop >= 0 else f"<nameoff {nameoff}>"
            current.props[name] = data[pos:pos + length]
            pos = (pos + length + layout.FDT_TAG_ALIGN - 1) & ~(layout.FDT_TAG_ALIGN - 1)
        elif token == layout.FDT_NOP:
            continue
        else:  # layout.FDT_END, a property outside a node, or garbage: nothing more to recover
            break
    return nodes


def _compatible_of(nodes: list[PartialNode]) -> str | None:
    """The root's KHO compatible among the recovered values (by value: its name may be lost)."""
    if not nodes:
        return None
    for value in nodes[0].props.values():
        for name in kernel_string_list(value):
            if name in KHO_FDT_COMPATIBLES:
                return name
    return None


def _scratch(path: str, notes: list[str]) -> list[ScratchArea]:
    phys_path, len_path = os.path.join(path, SCRATCH_PHYS_FILE), os.path.join(path, SCRATCH_LEN_FILE)
    if not (os.path.isfile(phys_path) and os.path.isfile(len_path)):
        return []
    raw_phys, raw_len = _read(phys_path), _read(len_path)
    if len(raw_phys) != len(raw_len) or len(raw_phys) % 8:
        notes.append(f"{SCRATCH_PHYS_FILE} ({len(raw_phys)} bytes) and {SCRATCH_LEN_FILE} ({len(raw_len)} bytes) "
                     "are not two u64 arrays of one length: scratch areas not read")
        return []
    addrs, sizes = np.frombuffer(raw_phys, "<u8").tolist(), np.frombuffer(raw_len, "<u8").tolist()
    return [ScratchArea(a, s, scratch_kind(i)) for i, (a, s) in enumerate(zip(addrs, sizes))]


def read_debugfs(path: str | os.PathLike) -> DebugfsHandover:
    """Read a ``kho/out`` or ``kho/in`` directory (see the module docstring).  KHOFormatError
    when it has no ``fdt`` file or the file is not an FDT at all."""
    path = os.fspath(path)
    fdt_path = os.path.join(path, FDT_FILE)
    if not os.path.isfile(fdt_path):
        raise KHOFormatError("debugfs", f"{path}: a directory without an '{FDT_FILE}' file is not debugfs kho/out "
                                        "or kho/in", None)
    data = _read(fdt_path)
    if len(data) < layout.FDT_HEADER.size or int.from_bytes(data[:4], "big") != layout.FDT_MAGIC:
        raise KHOFormatError("debugfs.fdt", f"{fdt_path}: {len(data)} bytes, not an FDT (no header or magic)", 0,
                             where="offset")
    total = layout.FDT_HEADER.unpack_from(data)[layout.FDT_HEADER_FIELDS.index("totalsize")]
    notes = []
    truncated = total > len(data)
    fdt = None
    compatible = None
    partial: list[PartialNode] = []
    if truncated:
        partial = partial_fdt(data)
        compatible = _compatible_of(partial)
        notes.append(f"{FDT_FILE} holds {len(data)} of the FDT's {total} bytes: the kernel sized the file before "
                     f"later sub-nodes were added; {len(partial)} nodes recovered from what is there")
    else:
        tree = parse_fdt(data, "debugfs.fdt", strict=False)
        names = kernel_string_list(prop_bytes(tree.root.get_property(layout.COMPATIBLE_PROP)) or b"")
        kho = [name for name in names if name in KHO_FDT_COMPATIBLES]
        if not kho:
            raise KHOFormatError("debugfs.fdt.compatible", f"{fdt_path}: root compatible {names} is none of "
                                                           f"{list(KHO_FDT_COMPATIBLES)}", None)
        compatible = kho[0]
        try:
            fdt = KHOFdt.from_dtb(data, compatible, strict=False)
        except KHOError as err:
            notes.append(f"{FDT_FILE}: {err}")
    subnodes = []
    sub_dir = os.path.join(path, SUB_FDTS_DIR)
    if os.path.isdir(sub_dir):
        names = sorted(os.listdir(sub_dir))
        if len(names) > MAX_SUB_FDTS:
            raise KHOFormatError("debugfs.sub_fdts", f"{sub_dir}: {len(names)} entries, more than {MAX_SUB_FDTS}", None)
        for name in names:
            blob = _read(os.path.join(sub_dir, name))
            node = SubNode(name, None, len(blob), blob)
            if fdt is not None and name in fdt.subtrees():
                node.phys = fdt.subtrees()[name]
            node.format, node.compatible = blob_format(blob)
            at = node.phys or DEFAULT_PAGE_SIZE  # a reader refuses a blob at 0 (a null pointer)
            try:
                node.decoded = decode_subnode(BlobMemory(blob, at), name, at, len(blob), node.compatible, strict=False)
            except KHOError as err:
                node.error = f"{err} (debugfs holds the blob only)"
            subnodes.append(node)
    return DebugfsHandover(path, data, total, compatible, fdt, truncated, partial, subnodes, _scratch(path, notes), notes)
