"""The KHO root FDT: the ABI's ``compatible``, the encoding's root properties, and one
sub-node per subsystem pointing at that subsystem's preserved data.

Built with the ``fdt`` package and serialized by it; read back with the strict reader of
:mod:`kho.devicetree.flat`.  Kernel behaviour modelled:

* the blob must fit in one page (the kernel creates it with ``fdt_create(PAGE_SIZE)``):
  :meth:`KHOFdt.add_subtree` and :meth:`KHOFdt.to_dtb` refuse with E2BIG beyond
  ``max_size`` (one page unless the caller allows more: see :mod:`kho.handover.outgoing`);
* ``add_subtree`` of an existing name fails with EEXIST (``kho_add_subtree``); libfdt's
  ``fdt_add_subnode`` puts a new sub-node before the existing ones, so sub-nodes appear
  newest first;
* ``retrieve_subtree``: a missing node is ENOENT, a property missing or not 8 bytes EINVAL
  (``kho_retrieve_subtree``);
* reading checks, in the next kernel's order, the header, the root ``compatible`` and the
  ``preserved-memory-map`` property (8 bytes, non-zero).

Sub-node pointer property: ``fdt`` under kho-v1 (the sub-node points at a subsystem FDT),
``preserved-data`` under every other ABI; ``blob-size`` (u64) is added when a size is
given (the later "kho-v3" revision).
"""

from __future__ import annotations

from typing import Collection, Mapping, Protocol

import fdt
import numpy as np

from kho.abi.kexec_handover import (
    KHO_FDT_COMPATIBLE_V1,
    KHO_FDT_COMPATIBLE_V3,
    KHO_FDT_COMPATIBLE_V4,
    KHO_FDT_COMPATIBLES,
    KHO_FDT_MEMORY_MAP_PROP_NAME,
    KHO_SUB_TREE_PROP_NAME,
    KHO_SUB_TREE_SIZE_PROP_NAME,
    KHO_V1_SUB_TREE_PROP_NAME,
)
from kho.devicetree.fdt_rw import ReadWriteFdt
from kho.devicetree.fdt_sw import SequentialFdt
from kho.devicetree.flat import NODE_NAME, kernel_string_list, new_tree, parse_fdt, prop_bytes, string_list, to_dtb
from kho.devicetree.layout import (
    COMPATIBLE_PROP,
    FDT_HEADER,
    FDT_HEADER_FIELDS,
    U64_PROP,
    pack_u64,
    unpack_u64_prop,
)
from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory

#: The ABIs the kernel defines; their root must carry a valid ``preserved-memory-map``.
KERNEL_COMPATIBLES = KHO_FDT_COMPATIBLES
#: The ABIs whose root is kept live in one page by libfdt (Linux 7.x): every sub-node has a
#: ``blob-size`` (required when reading) and the blob is laid out as libfdt edits it.
LIVE_FDT_COMPATIBLES = (KHO_FDT_COMPATIBLE_V3, KHO_FDT_COMPATIBLE_V4)
DEFAULT_PAGE_SIZE = 4096


def subtree_prop(compatible: str) -> str:
    """The sub-node pointer property name for an ABI: ``fdt`` (kho-v1) or ``preserved-data``."""
    return KHO_V1_SUB_TREE_PROP_NAME if compatible == KHO_FDT_COMPATIBLE_V1 else KHO_SUB_TREE_PROP_NAME


class PreservedUnits(Protocol):
    """Preserved units sorted by address: ``phys`` (uint64 bytes) and ``order`` (uint8)."""

    phys: np.ndarray
    order: np.ndarray


class KHOFdt:
    """A KHO root FDT.  ``props``: root properties other than ``compatible`` (name -> raw bytes).

    ``max_size``: the largest blob allowed, in bytes (default one page of ``page_size``).
    """

    def __init__(self, compatible: str, props: Mapping[str, bytes] | None = None, *,
                 page_size: int = DEFAULT_PAGE_SIZE, max_size: int | None = None):
        if not compatible or string_list(compatible.encode("ascii", "replace") + b"\0") is None:
            raise KHOError("EINVAL", f"invalid compatible {compatible!r}")
        self.compatible = compatible
        self.page_size = page_size
        self.max_size = page_size if max_size is None else max_size
        self.tree = new_tree()
        self.tree.root.append(fdt.PropStrings(COMPATIBLE_PROP, compatible))
        for name, value in (props or {}).items():
            if name == COMPATIBLE_PROP:
                raise KHOError("EINVAL", "compatible is set from the ABI, not from props")
            self.tree.root.append(fdt.PropBytes(name, data=bytes(value)) if len(value) else fdt.Property(name))
        self._check_size()

    # -- properties ------------------------------------------------------------------------
    @property
    def props(self) -> dict[str, bytes]:
        """Root properties other than ``compatible``, raw."""
        return {p.name: prop_bytes(p) for p in self.tree.root.props if p.name != COMPATIBLE_PROP}

    @property
    def subtree_prop(self) -> str:
        return subtree_prop(self.compatible)

    @property
    def live(self) -> bool:
        """Whether this ABI keeps the FDT live in one page, edited by libfdt (kho-v3 and later)."""
        return self.compatible in LIVE_FDT_COMPATIBLES

    def memory_map(self) -> int:
        """The ``preserved-memory-map`` pointer (KHOFormatError when missing or not 8 bytes)."""
        return unpack_u64_prop(self.props.get(KHO_FDT_MEMORY_MAP_PROP_NAME), f"fdt.{KHO_FDT_MEMORY_MAP_PROP_NAME}")

    # -- sub-trees -------------------------------------------------------------------------
    def add_subtree(self, name: str, phys: int, size: int | None = None) -> None:
        """Add sub-node ``name`` pointing at ``phys`` (and ``blob-size`` = ``size`` if given).

        EINVAL for an invalid node name or value, EEXIST if the name exists, E2BIG if the
        blob would outgrow ``max_size`` (nothing changes then).
        """
        if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
            raise KHOError("EINVAL", f"{name!r} is not a valid node name")
        for value, what in ((phys, "phys"), (size, "size")):
            if value is not None and not (isinstance(value, int) and 0 <= value < 1 << 64):
                raise KHOError("EINVAL", f"sub-tree {what} {value!r} is not a u64")
        root = self.tree.root
        if root.get_subnode(name) is not None:
            raise KHOError("EEXIST", f"sub-tree {name!r} already exists")
        if self.live and size is None:
            raise KHOError("EINVAL", f"a {self.compatible} sub-tree needs its {KHO_SUB_TREE_SIZE_PROP_NAME}")
        node = fdt.Node(name)
        # libfdt inserts a new property first: the kernel sets the pointer, then the size.
        if size is not None and self.live:
            node.append(fdt.PropBytes(KHO_SUB_TREE_SIZE_PROP_NAME, data=pack_u64(size)))
        node.append(fdt.PropBytes(self.subtree_prop, data=pack_u64(phys)))
        if size is not None and not self.live:
            node.append(fdt.PropBytes(KHO_SUB_TREE_SIZE_PROP_NAME, data=pack_u64(size)))
        node.set_parent(root)
        root.nodes.insert(0, node)
        try:
            self._check_size()
        except KHOError:
            root.nodes.remove(node)
            raise

    def remove_subtree(self, name: str) -> None:
        """Remove sub-node ``name``; ENOENT when there is none."""
        if self.tree.root.get_subnode(name) is None:
            raise KHOError("ENOENT", f"no sub-tree {name!r}")
        self.tree.root.remove_subnode(name)

    def retrieve_subtree(self, name: str) -> int:
        """The pointer of sub-node ``name``: ENOENT if absent, EINVAL if the property is missing
        or not 8 bytes, or (kho-v3 and later) ``blob-size`` is."""
        node = self.tree.root.get_subnode(name)
        if node is None:
            raise KHOError("ENOENT", f"no sub-tree {name!r}")
        if self.live:
            self.subtree_size(name)
        value = prop_bytes(node.get_property(self.subtree_prop))
        if value is None or len(value) != U64_PROP.size:
            raise KHOError("EINVAL", f"sub-tree {name!r} has no 8-byte {self.subtree_prop} property")
        return U64_PROP.unpack(value)[0]

    def subtree_size(self, name: str) -> int | None:
        """The ``blob-size`` of sub-node ``name`` or None; ENOENT if absent, EINVAL if not 8 bytes."""
        node = self.tree.root.get_subnode(name)
        if node is None:
            raise KHOError("ENOENT", f"no sub-tree {name!r}")
        value = prop_bytes(node.get_property(KHO_SUB_TREE_SIZE_PROP_NAME))
        if value is None and not self.live:
            return None
        if value is None or len(value) != U64_PROP.size:
            what = "no" if value is None else f"a {len(value)}-byte"
            raise KHOError("EINVAL", f"sub-tree {name!r} has {what} {KHO_SUB_TREE_SIZE_PROP_NAME}")
        return U64_PROP.unpack(value)[0]

    def subtrees(self) -> dict[str, int]:
        """``name -> phys`` of every sub-node :meth:`retrieve_subtree` finds, in blob order: its
        pointer property valid and (kho-v3 and later) its ``blob-size`` 8 bytes."""
        out = {}
        for node in self.tree.root.nodes:
            value = prop_bytes(node.get_property(self.subtree_prop))
            if value is None or len(value) != U64_PROP.size:
                continue
            if self.live:
                size = prop_bytes(node.get_property(KHO_SUB_TREE_SIZE_PROP_NAME))
                if size is None or len(size) != U64_PROP.size:
                    continue
            out[node.name] = U64_PROP.unpack(value)[0]
        return out

    def subnode_props(self) -> dict[str, dict[str, bytes]]:
        """Every sub-node's raw properties (for dumps), in blob order."""
        return {node.name: {p.name: prop_bytes(p) for p in node.props} for node in self.tree.root.nodes}

    # -- blobs -----------------------------------------------------------------------------
    def to_dtb(self) -> bytes:
        """The blob (E2BIG beyond ``max_size``)."""
        return self._check_size()

    def page_image(self) -> bytes:
        """The whole page holding a live (kho-v3+) FDT, as libfdt leaves it: the blob, then
        what its edits left behind (E2BIG beyond ``max_size``).  Other ABIs: the blob, zero-padded."""
        if self.live:
            return bytes(self._live_buffer()[1])
        return self.to_dtb().ljust(self.max_size, b"\0")

    def _live_buffer(self) -> tuple[bytes, bytearray]:
        """Replay how the kernel built this tree: ``fdt_create`` .. ``fdt_finish`` with the root
        properties, then per sub-node, oldest (last in the blob) first, ``fdt_open_into``,
        ``fdt_add_subnode``, its properties last to first with ``fdt_setprop``, ``fdt_pack``.
        (blob, page buffer).  O(sub-nodes * page)."""
        root = self.tree.root
        try:
            sw = SequentialFdt(self.max_size)
            sw.finish_reservemap()
            sw.begin_node("")
            for prop in root.props:
                sw.property(prop.name, prop_bytes(prop))
            sw.end_node()
            blob, page = sw.finish(), sw.buffer
            for node in reversed(root.nodes):
                rw = ReadWriteFdt(blob, self.max_size, page)
                at = rw.add_subnode(0, node.name)
                for prop in reversed(node.props):
                    rw.setprop(at, prop.name, prop_bytes(prop))
                rw.pack()
                blob, page = rw.blob(), rw.buffer
        except KHOError as err:
            if err.errno_name != "ENOMEM":
                raise
            raise KHOError("E2BIG", f"the KHO FDT does not fit its {self.max_size}-byte page") from None
        return blob, page

    def _check_size(self) -> bytes:
        blob = self._live_buffer()[0] if self.live else to_dtb(self.tree)
        if len(blob) > self.max_size:
            raise KHOError("E2BIG", f"the KHO FDT needs {len(blob)} bytes, more than {self.max_size}")
        return blob

    @classmethod
    def from_dtb(cls, data: bytes, compatible: str | None = None, *, page_size: int = DEFAULT_PAGE_SIZE,
                 strict: bool = True, readable: Collection[str] = ()) -> "KHOFdt":
        """Parse and check a KHO FDT as the next kernel does: header, then ``compatible``
        (``compatible`` if given, else a kernel ABI's or the first of ``readable``, the
        compatibles the caller can decode), then the
        ``preserved-memory-map`` property: 8 bytes and non-zero (required for kho-v1/v2,
        checked whenever present).  KHOFormatError names the failing field.

        ``strict`` also requires what the kernel's writer guarantees: the whole blob valid
        (:func:`~kho.devicetree.flat.parse_fdt`), a printable compatible string list, and a
        kho-v1/kho-v2 blob within one page (``fdt_create(PAGE_SIZE)``).  ``strict=False``
        reads it as the kernel does: libfdt's lookups on a blob that only has to pass
        ``fdt_check_header``, ``fdt_node_check_compatible`` string matching, and a kho-v1
        memory-map pointer of 0 accepted as "nothing preserved" (Linux 6.16; later kernels
        and kho-v2 refuse 0)."""
        tree = parse_fdt(data, "fdt", strict=strict)
        root = tree.root
        raw_compatible = prop_bytes(root.get_property(COMPATIBLE_PROP)) or b""
        names = string_list(raw_compatible) if strict else kernel_string_list(raw_compatible)
        if not names:
            raise KHOFormatError("fdt.compatible", "the root has no valid compatible string list")
        if compatible is not None:
            if compatible not in names:
                raise KHOFormatError("fdt.compatible", f"{names} does not include {compatible!r}")
            chosen = compatible
        elif any(name in KERNEL_COMPATIBLES for name in names):
            chosen = next(name for name in names if name in KERNEL_COMPATIBLES)
        else:
            chosen = next((name for name in names if name in readable), None)
            if chosen is None:
                raise KHOFormatError("fdt.compatible", f"no encoding reads compatible {names}")
        raw_map = prop_bytes(root.get_property(KHO_FDT_MEMORY_MAP_PROP_NAME))
        if raw_map is not None or chosen in KERNEL_COMPATIBLES:
            if unpack_u64_prop(raw_map, f"fdt.{KHO_FDT_MEMORY_MAP_PROP_NAME}") == 0 and (strict or chosen != KHO_FDT_COMPATIBLE_V1):
                raise KHOFormatError(f"fdt.{KHO_FDT_MEMORY_MAP_PROP_NAME}", "the memory map pointer is 0")
        total = FDT_HEADER.unpack_from(data)[FDT_HEADER_FIELDS.index("totalsize")] if len(data) >= FDT_HEADER.size else len(data)
        if strict and chosen in KERNEL_COMPATIBLES and total > page_size:
            raise KHOFormatError("fdt.header.totalsize", f"{total} bytes: the kernel builds its KHO FDT in one "
                                                          f"{page_size}-byte page", 4, where="offset")
        out = cls.__new__(cls)
        out.compatible = chosen
        out.page_size = page_size
        out.max_size = max(len(data), page_size)
        out.tree = tree
        return out

    def check_subtrees(self, memory: PhysicalMemory, decoded: PreservedUnits | None = None) -> None:
        """Strict checks of every sub-node against the machine (the kernel makes none: a bad
        sub-node only fails its own ``kho_retrieve_subtree``): the pointer property present,
        8 bytes and inside RAM (0 is a valid address: a blob may be the page at 0); ``blob-size``, when present, 8 bytes with the blob
        inside RAM; no nested node; and, with ``decoded`` (the preserved units, sorted), the
        pointed-to byte (and the whole blob) inside one preserved unit, since only preserved
        memory survives the kexec.  KHOFormatError names ``fdt.<node>.<property>``.
        O(sub-nodes log units)."""
        for node in self.tree.root.nodes:
            field = f"fdt.{node.name}.{self.subtree_prop}"
            if node.nodes:
                raise KHOFormatError(f"fdt.{node.name}", f"sub-tree node holds node {node.nodes[0].name!r}")
            phys = unpack_u64_prop(prop_bytes(node.get_property(self.subtree_prop)), field)
            raw_size = prop_bytes(node.get_property(KHO_SUB_TREE_SIZE_PROP_NAME))
            size = 1 if raw_size is None else unpack_u64_prop(raw_size, f"fdt.{node.name}.{KHO_SUB_TREE_SIZE_PROP_NAME}")
            if size == 0 or not memory.in_ram(phys, size):
                raise KHOFormatError(field if raw_size is None else f"fdt.{node.name}.{KHO_SUB_TREE_SIZE_PROP_NAME}",
                                     f"{size} bytes outside RAM", phys)
            if decoded is not None:
                i = int(np.searchsorted(decoded.phys, np.uint64(phys), side="right")) - 1
                end = -1 if i < 0 else int(decoded.phys[i]) + (memory.page_size << int(decoded.order[i]))
                if phys + size > end:
                    raise KHOFormatError(field, f"{size} bytes not inside one preserved unit", phys)

    def to_dts(self) -> str:
        """The tree as DTS text: strings quoted, other values as bytes with their LE u64 in a comment."""
        lines = ["/dts-v1/;", "", "/ {"]

        def prop_lines(props: Mapping[str, bytes], indent: str) -> None:
            for name, value in props.items():
                strings = string_list(value)
                if not value:
                    lines.append(f"{indent}{name};")
                elif strings is not None:
                    lines.append(f"{indent}{name} = " + ", ".join(f'"{s}"' for s in strings) + ";")
                else:
                    text = " ".join(f"{b:02x}" for b in value)
                    note = f" /* u64 LE {U64_PROP.unpack(value)[0]:#x} */" if len(value) == U64_PROP.size else ""
                    lines.append(f"{indent}{name} = [{text}];{note}")

        prop_lines({p.name: prop_bytes(p) for p in self.tree.root.props}, "\t")
        for name, props in self.subnode_props().items():
            lines.append("")
            lines.append(f"\t{name} {{")
            prop_lines(props, "\t\t")
            lines.append("\t};")
        lines.append("};")
        return "\n".join(lines) + "\n"
