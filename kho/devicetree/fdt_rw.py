"""libfdt's read-write API on a buffer (``fdt_open_into`` .. ``fdt_pack``), byte for byte.

Linux 7.x keeps its KHO root FDT live in one preserved page: it builds it once with the
sequential-write API (:mod:`kho.devicetree.fdt_sw`), then every ``kho_add_subtree`` /
``kho_remove_subtree`` calls ``fdt_open_into(fdt, fdt, PAGE_SIZE)``, edits it in place and
``fdt_pack``\\ s it again.  A byte comparison sees how libfdt edits:

* ``fdt_add_subnode`` inserts the new node after the parent's properties, before its
  first existing child: sub-nodes appear newest first;
* ``fdt_setprop`` of a new property inserts it before the node's existing properties:
  properties appear in reverse order of addition; an existing one is resized in place;
* a new property name is appended to the strings block unless the block already holds
  it, possibly as the tail of a longer name (``fdt_find_string_``);
* ``fdt_open_into`` keeps well-ordered blocks where they are and sets ``totalsize`` to the
  buffer's size; ``fdt_pack`` moves the reservation map to offset 40 (the header aligned
  to 8), the structure and strings right behind it, and shrinks ``totalsize``; neither
  clears the bytes they leave behind.

:class:`ReadWriteFdt` holds the whole buffer (:attr:`ReadWriteFdt.buffer`) as libfdt leaves
it; :meth:`ReadWriteFdt.blob` is its first ``totalsize`` bytes.  Only well-formed blobs (a
kernel's own, or kho's) are edited; a full buffer is KHOError(ENOMEM), as the kernel turns
libfdt's FDT_ERR_NOSPACE into -ENOMEM.  Cost: O(buffer) per edit (each is a memmove), O(structure) per lookup.
"""

from __future__ import annotations

from kho.devicetree.layout import (
    FDT_BEGIN_NODE,
    FDT_END,
    FDT_END_NODE,
    FDT_HEADER,
    FDT_HEADER_FIELDS,
    FDT_NOP,
    FDT_PROP,
    FDT_PROP_HEADER,
    FDT_RESERVE_ENTRY,
    FDT_TAG_ALIGN,
    FDT_TOKEN,
)
from kho.errors import KHOError

#: Where ``fdt_pack`` puts the reservation map: the 40-byte v17 header aligned to 8.
PACKED_RSVMAP_OFFSET = (FDT_HEADER.size + 7) & ~7


def _align(value: int) -> int:
    return (value + FDT_TAG_ALIGN - 1) & ~(FDT_TAG_ALIGN - 1)


class ReadWriteFdt:
    """A finished FDT opened into a ``bufsize``-byte buffer (``fdt_open_into``)."""

    def __init__(self, blob: bytes, bufsize: int, buffer: bytes | None = None):
        header = self._parse_header(blob)
        if header["totalsize"] > bufsize or header["totalsize"] > len(blob):
            raise KHOError("ENOMEM", f"an FDT of {header['totalsize']} bytes does not fit a {bufsize}-byte buffer")
        self.buffer = bytearray(bufsize)
        if buffer is not None:  # the page as it was, bytes past totalsize included
            self.buffer[:len(buffer)] = buffer[:bufsize]
        self.buffer[:header["totalsize"]] = blob[:header["totalsize"]]
        if self._misordered(header):
            self._packblocks()
        self._set("totalsize", bufsize)

    # -- header ----------------------------------------------------------------------------
    @staticmethod
    def _parse_header(blob: bytes) -> dict[str, int]:
        if len(blob) < FDT_HEADER.size:
            raise KHOError("EINVAL", "FDT shorter than its header")
        return dict(zip(FDT_HEADER_FIELDS, FDT_HEADER.unpack_from(blob)))

    def _get(self, field: str) -> int:
        return FDT_HEADER.unpack_from(self.buffer)[FDT_HEADER_FIELDS.index(field)]

    def _set(self, field: str, value: int) -> None:
        values = list(FDT_HEADER.unpack_from(self.buffer))
        values[FDT_HEADER_FIELDS.index(field)] = value
        FDT_HEADER.pack_into(self.buffer, 0, *values)

    def _rsvmap_size(self) -> int:
        """Bytes of the reservation map, its terminating entry included."""
        pos = self._get("off_mem_rsvmap")
        while True:
            address, size = FDT_RESERVE_ENTRY.unpack_from(self.buffer, pos)
            pos += FDT_RESERVE_ENTRY.size
            if not address and not size:
                return pos - self._get("off_mem_rsvmap")

    def _misordered(self, header: dict[str, int]) -> bool:
        rsv = self._rsvmap_size()
        return (header["off_mem_rsvmap"] < PACKED_RSVMAP_OFFSET
                or header["off_dt_struct"] < header["off_mem_rsvmap"] + rsv
                or header["off_dt_strings"] < header["off_dt_struct"] + header["size_dt_struct"])

    def _data_size(self) -> int:
        return self._get("off_dt_strings") + self._get("size_dt_strings")

    # -- layout ------------------------------------------------------------------------------
    def _packblocks(self) -> None:
        rsv_size, struct_size = self._rsvmap_size(), self._get("size_dt_struct")
        strings_size = self._get("size_dt_strings")
        rsv_off = PACKED_RSVMAP_OFFSET
        struct_off = rsv_off + rsv_size
        strings_off = struct_off + struct_size
        for old, new, size, field in ((self._get("off_mem_rsvmap"), rsv_off, rsv_size, "off_mem_rsvmap"),
                                      (self._get("off_dt_struct"), struct_off, struct_size, "off_dt_struct"),
                                      (self._get("off_dt_strings"), strings_off, strings_size, "off_dt_strings")):
            self.buffer[new:new + size] = self.buffer[old:old + size]
            self._set(field, new)

    def pack(self) -> None:
        """``fdt_pack``: blocks packed behind the header, ``totalsize`` = the data's end."""
        self._packblocks()
        self._set("totalsize", self._data_size())

    def _splice(self, at: int, old_len: int, new_len: int) -> None:
        """``fdt_splice_``: make ``new_len`` bytes of room at ``at`` in place of ``old_len``."""
        end = self._data_size()
        if end - old_len + new_len > self._get("totalsize"):
            raise KHOError("ENOMEM", f"the {len(self.buffer)}-byte FDT buffer is full (FDT_ERR_NOSPACE)")
        tail = bytes(self.buffer[at + old_len:end])
        self.buffer[at + new_len:at + new_len + len(tail)] = tail

    def _splice_struct(self, at: int, old_len: int, new_len: int) -> None:
        self._splice(at, old_len, new_len)
        delta = new_len - old_len
        self._set("size_dt_struct", self._get("size_dt_struct") + delta)
        self._set("off_dt_strings", self._get("off_dt_strings") + delta)

    def _string_offset(self, name: str) -> int:
        """``fdt_find_add_string_``: the offset of ``name`` in the strings block, appended if absent."""
        raw = name.encode() + b"\0"
        start, size = self._get("off_dt_strings"), self._get("size_dt_strings")
        found = bytes(self.buffer[start:start + size]).find(raw)
        if found >= 0:
            return found
        self._splice(start + size, 0, len(raw))
        self.buffer[start + size:start + size + len(raw)] = raw
        self._set("size_dt_strings", size + len(raw))
        return size

    # -- the structure block -----------------------------------------------------------------
    def _tag(self, offset: int) -> tuple[int, int]:
        """``fdt_next_tag``: (tag, offset of the next tag) for the tag at structure ``offset``."""
        base = self._get("off_dt_struct")
        tag = FDT_TOKEN.unpack_from(self.buffer, base + offset)[0]
        pos = offset + FDT_TOKEN.size
        if tag == FDT_BEGIN_NODE:
            pos = self.buffer.index(0, base + pos) - base + 1
        elif tag == FDT_PROP:
            length, _ = FDT_PROP_HEADER.unpack_from(self.buffer, base + pos)
            pos += FDT_PROP_HEADER.size + length
        elif tag not in (FDT_END_NODE, FDT_NOP, FDT_END):
            raise KHOError("EINVAL", f"bad FDT tag {tag:#x} at structure offset {offset}")
        return tag, _align(pos)

    def _node_name(self, offset: int) -> str:
        base = self._get("off_dt_struct") + offset + FDT_TOKEN.size
        return bytes(self.buffer[base:self.buffer.index(0, base)]).decode(errors="replace")

    def subnode_offset(self, parent: int, name: str) -> int | None:
        """``fdt_subnode_offset``: the structure offset of child ``name`` of the node at
        ``parent`` (0 = root), or None."""
        _, pos = self._tag(parent)
        depth = 0
        while True:
            tag, nxt = self._tag(pos)
            if tag == FDT_BEGIN_NODE:
                if depth == 0 and self._node_name(pos) == name:
                    return pos
                depth += 1
            elif tag == FDT_END_NODE:
                if depth == 0:
                    return None
                depth -= 1
            elif tag == FDT_END:
                return None
            pos = nxt

    def _after_properties(self, node: int) -> int:
        _, pos = self._tag(node)
        while True:
            tag, nxt = self._tag(pos)
            if tag not in (FDT_PROP, FDT_NOP):
                return pos
            pos = nxt

    def _property_offset(self, node: int, name: str) -> int | None:
        _, pos = self._tag(node)
        base, strings = self._get("off_dt_struct"), self._get("off_dt_strings")
        while True:
            tag, nxt = self._tag(pos)
            if tag == FDT_PROP:
                _, nameoff = FDT_PROP_HEADER.unpack_from(self.buffer, base + pos + FDT_TOKEN.size)
                at = strings + nameoff
                if bytes(self.buffer[at:self.buffer.index(0, at)]).decode(errors="replace") == name:
                    return pos
            elif tag != FDT_NOP:
                return None
            pos = nxt

    # -- edits ---------------------------------------------------------------------------------
    def add_subnode(self, parent: int, name: str) -> int:
        """``fdt_add_subnode``: a new empty child of ``parent`` placed before its existing
        children; its structure offset.  EEXIST when a child of that name exists."""
        if self.subnode_offset(parent, name) is not None:
            raise KHOError("EEXIST", f"sub-node {name!r} exists (FDT_ERR_EXISTS)")
        at = self._after_properties(parent)
        raw = name.encode() + b"\0"
        size = FDT_TOKEN.size + _align(len(raw)) + FDT_TOKEN.size
        self._splice_struct(self._get("off_dt_struct") + at, 0, size)
        node = FDT_TOKEN.pack(FDT_BEGIN_NODE) + raw.ljust(_align(len(raw)), b"\0") + FDT_TOKEN.pack(FDT_END_NODE)
        base = self._get("off_dt_struct") + at
        self.buffer[base:base + size] = node
        return at

    def setprop(self, node: int, name: str, value: bytes) -> None:
        """``fdt_setprop``: resize an existing property in place, or insert a new one first
        among the node's properties."""
        existing = self._property_offset(node, name)
        if existing is not None:
            base = self._get("off_dt_struct") + existing
            old_len, nameoff = FDT_PROP_HEADER.unpack_from(self.buffer, base + FDT_TOKEN.size)
            start = base + FDT_TOKEN.size + FDT_PROP_HEADER.size
            self._splice_struct(start, _align(old_len), _align(len(value)))
            FDT_PROP_HEADER.pack_into(self.buffer, base + FDT_TOKEN.size, len(value), nameoff)
        else:
            nameoff = self._string_offset(name)
            _, at = self._tag(node)
            size = FDT_TOKEN.size + FDT_PROP_HEADER.size + _align(len(value))
            self._splice_struct(self._get("off_dt_struct") + at, 0, size)
            base = self._get("off_dt_struct") + at
            self.buffer[base:base + FDT_TOKEN.size + FDT_PROP_HEADER.size] = (
                FDT_TOKEN.pack(FDT_PROP) + FDT_PROP_HEADER.pack(len(value), nameoff))
            start = base + FDT_TOKEN.size + FDT_PROP_HEADER.size
        self.buffer[start:start + _align(len(value))] = bytes(value).ljust(_align(len(value)), b"\0")

    def del_node(self, node: int) -> None:
        """``fdt_del_node``: remove the node at ``node`` with everything inside it."""
        pos, depth = node, 0
        while True:
            tag, pos = self._tag(pos)
            if tag == FDT_BEGIN_NODE:
                depth += 1
            elif tag == FDT_END_NODE:
                depth -= 1
                if depth == 0:
                    break
        self._splice_struct(self._get("off_dt_struct") + node, pos - node, 0)

    def add_mem_rsv(self, address: int, size: int) -> None:
        """``fdt_add_mem_rsv``: one more reservation-map entry, before the terminator."""
        at = self._get("off_mem_rsvmap") + self._rsvmap_size() - FDT_RESERVE_ENTRY.size
        self._splice(at, 0, FDT_RESERVE_ENTRY.size)
        FDT_RESERVE_ENTRY.pack_into(self.buffer, at, address, size)
        self._set("off_dt_struct", self._get("off_dt_struct") + FDT_RESERVE_ENTRY.size)
        self._set("off_dt_strings", self._get("off_dt_strings") + FDT_RESERVE_ENTRY.size)

    def blob(self) -> bytes:
        """The FDT: the buffer's first ``totalsize`` bytes."""
        return bytes(self.buffer[:self._get("totalsize")])
