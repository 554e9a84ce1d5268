"""Binary layouts of the devicetree blobs KHO uses, defined once.

* The flattened devicetree (Devicetree Specification v0.4, chapter 5): a big-endian
  header, the memory reservation block, the structure block (tokens, 4-byte aligned) and
  the strings block.
* KHO's property names and their values: KHO stores its pointers as 8-byte
  *native-endian* (little-endian on arm64/x86) u64s, breaking the devicetree big-endian
  convention on purpose; ``/chosen`` cells stay big-endian.
* ``struct kho_scratch { u64 addr; u64 size; }`` (little-endian), the scratch-area array.
"""

from __future__ import annotations

import struct

from kho.errors import KHOFormatError

#: FDT header magic and the version kho writes (libfdt's fdt_create writes the same).
FDT_MAGIC = 0xD00DFEED
FDT_VERSION = 17
FDT_LAST_COMP_VERSION = 16
#: The oldest header version kho reads (v16 and v17 share the layout kho needs).
FDT_MIN_VERSION = 16

#: Structure-block tokens (big-endian u32).
FDT_BEGIN_NODE = 0x1
FDT_END_NODE = 0x2
FDT_PROP = 0x3
FDT_NOP = 0x4
FDT_END = 0x9

#: The v17 header: ten big-endian u32 fields, 40 bytes.
FDT_HEADER = struct.Struct(">10I")
FDT_HEADER_FIELDS = ("magic", "totalsize", "off_dt_struct", "off_dt_strings", "off_mem_rsvmap",
                     "version", "last_comp_version", "boot_cpuid_phys", "size_dt_strings", "size_dt_struct")


def fdt_header(blob: bytes) -> dict[str, int]:
    """The header fields of the FDT at the start of ``blob`` (at least ``FDT_HEADER.size``
    bytes), by name; nothing is checked."""
    return dict(zip(FDT_HEADER_FIELDS, FDT_HEADER.unpack_from(blob)))


def fdt_totalsize(blob: bytes) -> int:
    """The header's ``totalsize`` (bytes) of the FDT at the start of ``blob``."""
    return fdt_header(blob)["totalsize"]


#: One memory reservation entry {u64 address; u64 size} (big-endian); (0, 0) ends the block.
FDT_RESERVE_ENTRY = struct.Struct(">QQ")
#: A token (big-endian u32) and the header of a property {u32 len; u32 nameoff}.
FDT_TOKEN = struct.Struct(">I")
FDT_PROP_HEADER = struct.Struct(">II")
#: Alignment of the structure block's items and of the memory reservation block.
FDT_TAG_ALIGN = 4
FDT_RSVMAP_ALIGN = 8
#: Longest node name the Devicetree Specification allows (without the unit address).
NODE_NAME_MAX = 31

#: KHO root and sub-node property names (include/linux/kho/abi/kexec_handover.h and 6.16).
COMPATIBLE_PROP = "compatible"
#: The root cells kho writes in a boot DTB (arm64: 2 + 2) and the spec's defaults when absent.
BOOT_ADDRESS_CELLS = 2
BOOT_SIZE_CELLS = 2
DEFAULT_ADDRESS_CELLS = 2
DEFAULT_SIZE_CELLS = 1

#: KHO's 8-byte native-endian (little-endian) u64 property value.
U64_PROP = struct.Struct("<Q")


def pack_u64(value: int) -> bytes:
    """An 8-byte little-endian KHO pointer property value."""
    return U64_PROP.pack(value)


def unpack_u64_prop(value: bytes | None, field: str) -> int:
    """The u64 in a KHO pointer property; KHOFormatError when missing or not exactly 8 bytes."""
    if value is None:
        raise KHOFormatError(field, "property missing")
    if len(value) != U64_PROP.size:
        raise KHOFormatError(field, f"property is {len(value)} bytes, not {U64_PROP.size}")
    return U64_PROP.unpack(value)[0]
