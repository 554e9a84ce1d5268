"""libfdt's sequential-write API (``fdt_create`` .. ``fdt_finish``), byte for byte.

Linux writes its small FDTs (the KHO root, the ``memblock`` and ``kho_test`` sub-nodes)
with ``scripts/dtc/libfdt/fdt_sw.c``, whose output differs from a generic serializer in
ways a byte comparison sees: the reservation map starts at 48 (the 40-byte v17 header
aligned to 16), the strings block lists names in the reverse order of their first use
(the table grows down from the end of the buffer), a name already present as a suffix of
another is shared, and ``fdt_finish`` moves the strings block behind the structure block
but leaves the old copy at the end of the buffer (``fdt_create`` zeroed the buffer
first).  :class:`SequentialFdt` reproduces all of it; :attr:`SequentialFdt.buffer` is the
whole buffer as the kernel leaves it, :meth:`SequentialFdt.blob` the ``totalsize`` bytes.

Cost: O(buffer size) to create, O(bytes written) per call, O(structure) to finish.
"""

from __future__ import annotations

from kho.devicetree.layout import (
    FDT_BEGIN_NODE,
    FDT_END,
    FDT_END_NODE,
    FDT_HEADER,
    FDT_HEADER_FIELDS,
    FDT_LAST_COMP_VERSION,
    FDT_MAGIC,
    FDT_PROP,
    FDT_PROP_HEADER,
    FDT_RESERVE_ENTRY,
    FDT_TAG_ALIGN,
    FDT_TOKEN,
    FDT_VERSION,
)
from kho.errors import KHOError


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


class SequentialFdt:
    """An FDT built in a ``bufsize``-byte buffer, call by call, as libfdt's fdt_sw.c does.

    Out of space raises KHOError(ENOMEM) (libfdt's ``-FDT_ERR_NOSPACE``, which every
    kernel caller turns into a failed preservation); calls out of order raise EINVAL.
    """

    def __init__(self, bufsize: int):
        self.off_mem_rsvmap = _align(FDT_HEADER.size, FDT_RESERVE_ENTRY.size)
        if bufsize < self.off_mem_rsvmap:
            raise KHOError("ENOMEM", f"an FDT buffer of {bufsize} bytes is smaller than its header")
        self.buffer = bytearray(bufsize)
        self.size_dt_struct = 0
        self.size_dt_strings = 0
        self.off_dt_struct = self.off_mem_rsvmap
        self.reservations_done = False
        self.depth = 0
        self.finished = False
        self.totalsize = 0

    # -- space ---------------------------------------------------------------------------
    def _free(self) -> int:
        return len(self.buffer) - self.off_dt_struct - self.size_dt_struct - self.size_dt_strings

    def _grab(self, data: bytes) -> None:
        need = _align(len(data), FDT_TAG_ALIGN)
        if need > self._free():
            raise KHOError("ENOMEM", f"the {len(self.buffer)}-byte FDT buffer is full")
        at = self.off_dt_struct + self.size_dt_struct
        self.buffer[at:at + len(data)] = data
        self.size_dt_struct += need

    def _string_offset(self, name: str) -> int:
        """Offset (negative, from the buffer's end) of ``name`` in the strings table, added if new."""
        raw = name.encode() + b"\0"
        end = len(self.buffer)
        table = bytes(self.buffer[end - self.size_dt_strings:end])
        found = table.find(raw)
        if found >= 0:
            return found - self.size_dt_strings
        if len(raw) > self._free():
            raise KHOError("ENOMEM", f"the {len(self.buffer)}-byte FDT buffer is full")
        self.size_dt_strings += len(raw)
        self.buffer[end - self.size_dt_strings:end - self.size_dt_strings + len(raw)] = raw
        return -self.size_dt_strings

    def _check_open(self, what: str) -> None:
        if self.finished or not self.reservations_done:
            raise KHOError("EINVAL", f"{what}: the FDT is finished or its reservation map is not")

    # -- the API ---------------------------------------------------------------------------
    def add_reservemap_entry(self, address: int, size: int) -> None:
        """``fdt_add_reservemap_entry``: only before :meth:`finish_reservemap`."""
        if self.reservations_done:
            raise KHOError("EINVAL", "reservation after fdt_finish_reservemap")
        entry = FDT_RESERVE_ENTRY.pack(address, size)
        if len(entry) > self._free():
            raise KHOError("ENOMEM", f"the {len(self.buffer)}-byte FDT buffer is full")
        self.buffer[self.off_dt_struct:self.off_dt_struct + len(entry)] = entry
        self.off_dt_struct += len(entry)

    def finish_reservemap(self) -> None:
        """``fdt_finish_reservemap``: the terminating empty entry."""
        self.add_reservemap_entry(0, 0)
        self.reservations_done = True

    def begin_node(self, name: str) -> None:
        """``fdt_begin_node``: the name is copied as given (libfdt does not check it)."""
        self._check_open("begin_node")
        self._grab(FDT_TOKEN.pack(FDT_BEGIN_NODE) + name.encode() + b"\0")
        self.depth += 1

    def end_node(self) -> None:
        """``fdt_end_node``."""
        self._check_open("end_node")
        self._grab(FDT_TOKEN.pack(FDT_END_NODE))
        self.depth -= 1

    def property(self, name: str, value: bytes) -> None:
        """``fdt_property``: the name's string first, then the tag, length, offset and value."""
        self._check_open("property")
        nameoff = self._string_offset(name)
        self._grab(FDT_TOKEN.pack(FDT_PROP) + FDT_PROP_HEADER.pack(len(value), nameoff & 0xFFFFFFFF) + bytes(value))

    def property_string(self, name: str, value: str) -> None:
        """``fdt_property_string``: the string and its NUL."""
        self.property(name, value.encode() + b"\0")

    def finish(self) -> bytes:
        """``fdt_finish``: FDT_END, strings moved behind the structure, offsets fixed,
        header written.  Returns the blob (``totalsize`` bytes)."""
        self._check_open("finish")
        if self.depth:
            raise KHOError("EINVAL", f"finish with {self.depth} node(s) still open")
        self._grab(FDT_TOKEN.pack(FDT_END))
        old = len(self.buffer) - self.size_dt_strings
        new = self.off_dt_struct + self.size_dt_struct
        self.buffer[new:new + self.size_dt_strings] = self.buffer[old:old + self.size_dt_strings]
        self._fix_name_offsets()
        self.totalsize = new + self.size_dt_strings
        header = {"magic": FDT_MAGIC, "totalsize": self.totalsize, "off_dt_struct": self.off_dt_struct,
                  "off_dt_strings": new, "off_mem_rsvmap": self.off_mem_rsvmap, "version": FDT_VERSION,
                  "last_comp_version": FDT_LAST_COMP_VERSION, "boot_cpuid_phys": 0,
                  "size_dt_strings": self.size_dt_strings, "size_dt_struct": self.size_dt_struct}
        self.buffer[:FDT_HEADER.size] = FDT_HEADER.pack(*(header[f] for f in FDT_HEADER_FIELDS))
        self.finished = True
        return self.blob()

    def _fix_name_offsets(self) -> None:
        """Walk the structure block adding ``size_dt_strings`` to every property's name offset."""
        pos, end = self.off_dt_struct, self.off_dt_struct + self.size_dt_struct
        while pos < end:
            token = FDT_TOKEN.unpack_from(self.buffer, pos)[0]
            pos += FDT_TOKEN.size
            if token == FDT_BEGIN_NODE:
                pos = _align(self.buffer.index(0, pos) + 1, FDT_TAG_ALIGN)
            elif token == FDT_PROP:
                length, nameoff = FDT_PROP_HEADER.unpack_from(self.buffer, pos)
                FDT_PROP_HEADER.pack_into(self.buffer, pos, length, (nameoff + self.size_dt_strings) & 0xFFFFFFFF)
                pos = _align(pos + FDT_PROP_HEADER.size + length, FDT_TAG_ALIGN)

    def blob(self) -> bytes:
        """The finished FDT: its first ``totalsize`` bytes."""
        if not self.finished:
            raise KHOError("EINVAL", "the FDT is not finished")
        return bytes(self.buffer[:self.totalsize])
