"""A checking reader and a writer of flattened devicetree blobs, on the ``fdt`` package's objects.

The ``fdt`` package builds and serializes trees (kho uses it to write every blob) but its
parser trusts its input (no bounds checks, no ``FDT_NOP``).  :func:`parse_fdt` replaces
it: it checks the header as libfdt's ``fdt_check_header`` does and walks the structure
block, skipping ``FDT_NOP`` tokens, and raises :class:`~kho.errors.KHOFormatError` naming
the field and the byte offset of the first problem.  Strict (default), it checks the
whole blob as ``fdt_check_full`` does (nesting, names, string offsets, lengths, order);
``strict=False`` reads it the way the kernel's libfdt lookups see it (see
:func:`parse_fdt` and spec/hardening.md).  Property values are kept raw
(:class:`fdt.PropBytes`), so a blob read and written again keeps every byte of every value.

Cost: O(blob bytes); at most :data:`MAX_DEPTH` levels of nesting.
"""

from __future__ import annotations

import re

import fdt

from kho.devicetree.layout import (
    FDT_BEGIN_NODE,
    FDT_END,
    FDT_END_NODE,
    FDT_HEADER,
    FDT_HEADER_FIELDS,
    FDT_MAGIC,
    FDT_MIN_VERSION,
    FDT_NOP,
    FDT_PROP,
    FDT_PROP_HEADER,
    FDT_RESERVE_ENTRY,
    FDT_RSVMAP_ALIGN,
    FDT_TAG_ALIGN,
    FDT_TOKEN,
    FDT_VERSION,
    NODE_NAME_MAX,
)
from kho.errors import KHOFormatError

#: Deepest nesting accepted (a KHO FDT has 2 levels, a boot DTB a few).
MAX_DEPTH = 32
#: Node names: ``name[@unit-address]`` with the Devicetree Specification's characters.
NODE_NAME = re.compile(r"[0-9A-Za-z,._+-]{1,%d}(@[0-9A-Za-z,._+-]+)?" % NODE_NAME_MAX)
#: Property names: the specification's characters, 1 to 31 of them.
PROP_NAME = re.compile(r"[0-9A-Za-z,._+?#-]{1,31}")
#: Header bytes for version 16 (no size_dt_struct) and 17.
_V16_HEADER_BYTES = FDT_HEADER.size - 4


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


def new_tree() -> fdt.FDT:
    """An empty tree with a version-17 header (never the package's shared default list)."""
    tree = fdt.FDT(entries=[])
    tree.header.version = FDT_VERSION
    return tree


def to_dtb(tree: fdt.FDT) -> bytes:
    """Serialize ``tree`` as a version-17 blob (header, empty reservation map, structure, strings)."""
    return tree.to_dtb(version=FDT_VERSION)


def _header(data: bytes, what: str) -> dict[str, int]:
    if len(data) < _V16_HEADER_BYTES:
        raise KHOFormatError(f"{what}.header", f"{len(data)} bytes is shorter than an FDT header", 0, where="offset")
    magic = int.from_bytes(data[:4], "big")
    if magic != FDT_MAGIC:
        raise KHOFormatError(f"{what}.header.magic", f"{magic:#010x} is not {FDT_MAGIC:#010x}", 0, where="offset")
    raw = data[:FDT_HEADER.size] if len(data) >= FDT_HEADER.size else data[:_V16_HEADER_BYTES] + bytes(4)
    head = dict(zip(FDT_HEADER_FIELDS, FDT_HEADER.unpack(raw)))
    if head["version"] < FDT_MIN_VERSION or head["last_comp_version"] > FDT_VERSION:
        raise KHOFormatError(f"{what}.header.version", f"version {head['version']} (compatible with {head['last_comp_version']}) "
                             f"is not readable as version {FDT_MIN_VERSION}..{FDT_VERSION}", 20, where="offset")
    header_bytes = FDT_HEADER.size if head["version"] >= 17 else _V16_HEADER_BYTES
    total = head["totalsize"]
    if total < header_bytes or total > len(data):
        raise KHOFormatError(f"{what}.header.totalsize", f"{total} bytes, but the blob has {len(data)} and the header {header_bytes}", 4, where="offset")
    rsv = head["off_mem_rsvmap"]
    if rsv < header_bytes or rsv % FDT_RSVMAP_ALIGN or rsv > total:
        raise KHOFormatError(f"{what}.header.off_mem_rsvmap", f"{rsv} is misaligned or outside the blob", 16, where="offset")
    struct_off = head["off_dt_struct"]
    if head["version"] < 17:
        head["size_dt_struct"] = total - struct_off if struct_off <= total else 0
    if struct_off < header_bytes or struct_off % FDT_TAG_ALIGN or struct_off + head["size_dt_struct"] > total:
        raise KHOFormatError(f"{what}.header.off_dt_struct", "the structure block is misaligned or outside the blob", 8, where="offset")
    strings = head["off_dt_strings"]
    if strings < header_bytes or strings + head["size_dt_strings"] > total:
        raise KHOFormatError(f"{what}.header.off_dt_strings", "the strings block is outside the blob", 12, where="offset")
    return head


def _cstring(data: bytes, start: int, end: int, field: str, strict: bool = True) -> str:
    """The NUL-terminated string at ``start`` (before ``end``).  Strict: ASCII only.  Lenient:
    any bytes, those outside printable ASCII shown as ``\\xNN`` (libfdt compares raw bytes,
    so such a name can never match one KHO looks up)."""
    stop = data.find(b"\0", start, end)
    if stop < 0:
        raise KHOFormatError(field, "string is not NUL-terminated inside its block", start, where="offset")
    raw = data[start:stop]
    if not strict:
        return "".join(chr(c) if 0x20 <= c <= 0x7E else f"\\x{c:02x}" for c in raw)
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise KHOFormatError(field, "string is not ASCII", start, where="offset") from None


def _reservations(data: bytes, head: dict[str, int], tree: fdt.FDT, what: str, strict: bool) -> int:
    """Read the memory reservation block into ``tree.entries``; returns the offset just past
    its terminating entry (or where a lenient read stopped at ``totalsize``)."""
    pos = head["off_mem_rsvmap"]
    while True:
        if pos + FDT_RESERVE_ENTRY.size > head["totalsize"]:
            if not strict:
                return pos
            raise KHOFormatError(f"{what}.mem_rsvmap", "the reservation block has no terminating entry", pos, where="offset")
        address, size = FDT_RESERVE_ENTRY.unpack_from(data, pos)
        pos += FDT_RESERVE_ENTRY.size
        if address == 0 and size == 0:
            return pos
        tree.entries.append({"address": address, "size": size})


def _check_blocks_disjoint(head: dict[str, int], rsvmap_end: int, what: str) -> None:
    """KHOFormatError when two of the three blocks overlap (libfdt reads the reservations
    until their terminator, so that block ends at ``rsvmap_end``)."""
    strings = head["off_dt_strings"]
    blocks = sorted([(head["off_mem_rsvmap"], rsvmap_end, "mem_rsvmap"), (strings, strings + head["size_dt_strings"], "off_dt_strings"),
                     (head["off_dt_struct"], head["off_dt_struct"] + head["size_dt_struct"], "off_dt_struct")])
    for (_, left_end, left), (right_start, right_end, right) in zip(blocks, blocks[1:]):
        if right_end > right_start and left_end > right_start:
            raise KHOFormatError(f"{what}.header.{right}", f"the block overlaps the {left} block", right_start, where="offset")


class _StructWalk:
    """One walk of the structure block into ``tree`` (see :func:`parse_fdt`).

    One frame per open node on ``stack``: the node (None for a lenient duplicate being
    skipped), the names of its sub-nodes and properties, and whether a sub-node has been
    seen.  ``pos`` is the offset of the next token, ``end`` the end of the block.
    """

    def __init__(self, data: bytes, head: dict[str, int], tree: fdt.FDT, what: str, strict: bool):
        self.data, self.tree, self.what, self.strict = data, tree, what, strict
        self.pos = head["off_dt_struct"]
        self.end = self.pos + head["size_dt_struct"]
        self.str_start = head["off_dt_strings"]
        self.str_size = head["size_dt_strings"]
        self.stack: list[tuple[fdt.Node | None, set[str], set[str], list[bool]]] = []
        self.root: fdt.Node | None = None

    def fail(self, field: str, message: str, at: int) -> None:
        raise KHOFormatError(f"{self.what}.{field}", message, at, where="offset")

    def run(self) -> None:
        """Read tokens until ``FDT_END`` (or, lenient, the root node's end)."""
        while True:
            if self.pos + FDT_TOKEN.size > self.end:
                self.fail("struct", "the structure block ends without FDT_END", self.pos)
            at = self.pos
            token = FDT_TOKEN.unpack_from(self.data, at)[0]
            self.pos += FDT_TOKEN.size
            if self.root is not None and not self.stack:
                if not self.strict:
                    return  # the kernel never looks past the root node
                if token != FDT_END:
                    self.fail("struct", f"token {token:#x} after the root node (only FDT_END may follow)", at)
            if token == FDT_NOP:
                continue
            if token == FDT_BEGIN_NODE:
                self.begin_node(at)
            elif token == FDT_END_NODE:
                if not self.stack:
                    self.fail("struct", "FDT_END_NODE outside any node", at)
                self.stack.pop()
            elif token == FDT_PROP:
                self.prop(at)
            elif token == FDT_END:
                if self.root is None or self.stack:
                    self.fail("struct", "FDT_END inside a node or before the root", at)
                return
            else:
                self.fail("struct", f"unknown token {token:#x}", at)

    def begin_node(self, at: int) -> None:
        """``FDT_BEGIN_NODE`` at ``at``: open the root or a sub-node of the innermost node."""
        strict = self.strict
        name = _cstring(self.data, self.pos, self.end, f"{self.what}.node.name", strict)
        self.pos = _align(self.data.index(b"\0", self.pos, self.end) + 1, FDT_TAG_ALIGN)
        if self.root is None:
            if name and strict:
                self.fail("node.name", f"the root node is named {name!r}", at)
            self.root = node = self.tree.root
        else:
            if len(self.stack) >= MAX_DEPTH:
                self.fail("struct", f"nodes nested deeper than {MAX_DEPTH}", at)
            parent, node_names, _, has_subnodes = self.stack[-1]
            if strict and not NODE_NAME.fullmatch(name):
                self.fail("node.name", f"{name!r} is not a valid node name", at)
            has_subnodes[0] = True
            if parent is None or name in node_names:
                if strict:
                    self.fail("node.name", f"duplicate node {name!r}", at)
                node = None  # libfdt finds the first node of a name; this one is never seen
            else:
                node_names.add(name)
                node = fdt.Node(name)
                node.set_parent(parent)
                parent.nodes.append(node)
        self.stack.append((node, set(), set(), [False]))

    def prop(self, at: int) -> None:
        """``FDT_PROP`` at ``at``: a property of the innermost node (skipped, lenient, where
        libfdt's lookups would never see it)."""
        if not self.stack:
            self.fail("struct", "a property outside any node", at)
        if self.pos + FDT_PROP_HEADER.size > self.end:
            self.fail("struct", "truncated property header", at)
        length, nameoff = FDT_PROP_HEADER.unpack_from(self.data, self.pos)
        self.pos += FDT_PROP_HEADER.size
        if self.pos + length > self.end:
            self.fail("prop.len", f"a {length}-byte value runs past the structure block", at)
        value = self.data[self.pos:self.pos + length]
        self.pos = _align(self.pos + length, FDT_TAG_ALIGN)
        if nameoff >= self.str_size:
            self.fail("prop.nameoff", f"name offset {nameoff} is outside the strings block", at)
        name = _cstring(self.data, self.str_start + nameoff, self.str_start + self.str_size, f"{self.what}.prop.name", self.strict)
        node, _, prop_names, has_subnodes = self.stack[-1]
        if self.strict:
            if not PROP_NAME.fullmatch(name):
                self.fail("prop.name", f"{name!r} is not a valid property name", at)
            if has_subnodes[0]:
                self.fail("prop", f"property {name!r} follows a sub-node", at)
            if name in prop_names:
                self.fail("prop.name", f"duplicate property {name!r}", at)
        elif node is None or has_subnodes[0] or name in prop_names:
            return  # invisible to libfdt's lookups
        prop_names.add(name)
        prop = fdt.PropBytes(name, data=value) if length else fdt.Property(name)
        prop.set_parent(node)
        node.props.append(prop)


def parse_fdt(data: bytes, what: str = "fdt", *, strict: bool = True) -> fdt.FDT:
    """Parse and check a flattened devicetree blob; field names start with ``what``.

    Trailing bytes after ``totalsize`` are ignored (a blob is often read from a whole page).

    ``strict`` (default) checks the whole blob as libfdt's ``fdt_check_full`` does: valid
    and unique node and property names, properties before sub-nodes, a terminated
    reservation block, nothing but ``FDT_END`` after the root.  ``strict=False`` reads it as
    the kernel's lookups (``fdt_getprop``, ``fdt_subnode_offset``) see it: any NUL-terminated
    name, the first of duplicate nodes or properties, properties after a sub-node ignored
    (libfdt's property iterator stops at the first sub-node), the reservation block and
    whatever follows the root's ``FDT_END_NODE`` not needed.  Both modes refuse a bad
    header, unknown tokens, strings or values running out of their block, and nesting
    deeper than :data:`MAX_DEPTH`.  Names are kept in per-node sets: O(blob bytes) either way.
    """
    data = bytes(data)
    head = _header(data, what)
    tree = new_tree()
    rsvmap_end = _reservations(data, head, tree, what, strict)
    if strict:
        _check_blocks_disjoint(head, rsvmap_end, what)
    _StructWalk(data, head, tree, what, strict).run()
    return tree


def prop_bytes(prop: fdt.Property | None) -> bytes | None:
    """The raw value of a property read by :func:`parse_fdt` or built by kho (None if absent)."""
    if prop is None:
        return None
    if isinstance(prop, fdt.PropBytes):
        return bytes(prop.data)
    if isinstance(prop, fdt.PropStrings):
        return b"".join(s.encode("ascii") + b"\0" for s in prop.data)
    if isinstance(prop, fdt.PropWords):
        return b"".join(w.to_bytes(4, "big") for w in prop.data)
    return b""


def kernel_string_list(value: bytes) -> list[str]:
    """The strings libfdt's ``fdt_stringlist_contains`` can match in a value: every
    NUL-terminated piece, any bytes (Latin-1 decoded); an unterminated tail never matches."""
    return [part.decode("latin-1") for part in value.split(b"\0")[:-1]]


def string_list(value: bytes) -> list[str] | None:
    """A property value as a devicetree string list, or None when it is not one."""
    if not value or value[-1] != 0:
        return None
    parts = value[:-1].split(b"\0")
    if any(not p or any(c < 0x20 or c > 0x7E for c in p) for p in parts):
        return None
    return [p.decode("ascii") for p in parts]
