"""The x86 boot protocol's handover of KHO: ``arch/x86/include/uapi/asm/bootparam.h`` and
``arch/x86/include/uapi/asm/setup_data.h``.

On x86_64 the next kernel finds the KHO FDT and the scratch array through ``boot_params``
(the "zero page", one 4096-byte structure): ``hdr.setup_data`` is the phys of the first
``struct setup_data`` node of a singly linked list (``next`` = phys of the next node, 0 ends
it); the node of type :data:`SETUP_KEXEC_KHO` carries a ``struct kho_data``.

Only the fields a reader of a memory dump needs are named in :data:`BOOT_PARAMS_DTYPE`
(at the kernel's offsets; the rest is padding); ``struct setup_header`` is complete.
All values little-endian, all structures packed; sizes asserted.
"""

from __future__ import annotations

import numpy as np

# -- setup_data types (setup_data.h) ----------------------------------------------------------
SETUP_NONE = 0
SETUP_E820_EXT = 1
SETUP_DTB = 2
SETUP_PCI = 3
SETUP_EFI = 4
SETUP_APPLE_PROPERTIES = 5
SETUP_JAILHOUSE = 6
SETUP_CC_BLOB = 7
SETUP_IMA = 8
SETUP_RNG_SEED = 9
#: ``struct kho_data`` follows the node header.
SETUP_KEXEC_KHO = 10
#: ``SETUP_INDIRECT``: the node holds a ``struct setup_indirect`` pointing at the payload.
SETUP_INDIRECT = 1 << 31

#: ``struct setup_data { __u64 next; __u32 type; __u32 len; __u8 data[]; }``: the node header
#: (``len`` = payload bytes after the header).
SETUP_DATA_DTYPE = np.dtype([("next", "<u8"), ("type", "<u4"), ("len", "<u4")])
assert SETUP_DATA_DTYPE.itemsize == 16

#: ``struct kho_data``: phys and size (bytes) of the KHO FDT and of the scratch array.
KHO_DATA_DTYPE = np.dtype([("fdt_addr", "<u8"), ("fdt_size", "<u8"), ("scratch_addr", "<u8"), ("scratch_size", "<u8")])
assert KHO_DATA_DTYPE.itemsize == 32

#: ``struct boot_e820_entry`` (packed): a firmware memory-map range, bytes; type 1 = usable RAM.
BOOT_E820_ENTRY_DTYPE = np.dtype([("addr", "<u8"), ("size", "<u8"), ("type", "<u4")])
assert BOOT_E820_ENTRY_DTYPE.itemsize == 20
#: ``E820_TYPE_RAM``.
E820_TYPE_RAM = 1
#: ``E820_MAX_ENTRIES_ZEROPAGE``: entries of ``boot_params.e820_table``.
E820_MAX_ENTRIES_ZEROPAGE = 128

#: ``struct setup_header`` (packed, at ``boot_params`` offset 0x1f1).
SETUP_HEADER_DTYPE = np.dtype([
    ("setup_sects", "u1"), ("root_flags", "<u2"), ("syssize", "<u4"), ("ram_size", "<u2"), ("vid_mode", "<u2"),
    ("root_dev", "<u2"), ("boot_flag", "<u2"), ("jump", "<u2"), ("header", "<u4"), ("version", "<u2"),
    ("realmode_swtch", "<u4"), ("start_sys_seg", "<u2"), ("kernel_version", "<u2"), ("type_of_loader", "u1"),
    ("loadflags", "u1"), ("setup_move_size", "<u2"), ("code32_start", "<u4"), ("ramdisk_image", "<u4"),
    ("ramdisk_size", "<u4"), ("bootsect_kludge", "<u4"), ("heap_end_ptr", "<u2"), ("ext_loader_ver", "u1"),
    ("ext_loader_type", "u1"), ("cmd_line_ptr", "<u4"), ("initrd_addr_max", "<u4"), ("kernel_alignment", "<u4"),
    ("relocatable_kernel", "u1"), ("min_alignment", "u1"), ("xloadflags", "<u2"), ("cmdline_size", "<u4"),
    ("hardware_subarch", "<u4"), ("hardware_subarch_data", "<u8"), ("payload_offset", "<u4"),
    ("payload_length", "<u4"), ("setup_data", "<u8"), ("pref_address", "<u8"), ("init_size", "<u4"),
    ("handover_offset", "<u4"), ("kernel_info_offset", "<u4"),
])
assert SETUP_HEADER_DTYPE.itemsize == 0x7B

#: ``setup_header.boot_flag``: 0xAA55.
BOOT_FLAG = 0xAA55
#: ``setup_header.header``: "HdrS" as a little-endian u32.
SETUP_HEADER_MAGIC = 0x53726448

#: Offsets in ``struct boot_params`` (bytes) of the fields named below.
BOOT_PARAMS_E820_ENTRIES_OFFSET = 0x1E8
BOOT_PARAMS_HDR_OFFSET = 0x1F1
BOOT_PARAMS_E820_TABLE_OFFSET = 0x2D0
#: ``sizeof(struct boot_params)``: the zero page, bytes.
BOOT_PARAMS_SIZE = 4096

#: ``struct boot_params`` with the fields a dump reader uses, at the kernel's offsets.
BOOT_PARAMS_DTYPE = np.dtype({
    "names": ["e820_entries", "hdr", "e820_table"],
    "formats": ["u1", SETUP_HEADER_DTYPE, (BOOT_E820_ENTRY_DTYPE, E820_MAX_ENTRIES_ZEROPAGE)],
    "offsets": [BOOT_PARAMS_E820_ENTRIES_OFFSET, BOOT_PARAMS_HDR_OFFSET, BOOT_PARAMS_E820_TABLE_OFFSET],
    "itemsize": BOOT_PARAMS_SIZE,
})
assert BOOT_PARAMS_DTYPE.itemsize == BOOT_PARAMS_SIZE
assert BOOT_PARAMS_E820_TABLE_OFFSET + E820_MAX_ENTRIES_ZEROPAGE * BOOT_E820_ENTRY_DTYPE.itemsize == 0xCD0
#: Byte offsets of ``hdr.boot_flag`` and ``hdr.header`` in the zero page (what a scan looks at).
BOOT_PARAMS_BOOT_FLAG_OFFSET = BOOT_PARAMS_HDR_OFFSET + SETUP_HEADER_DTYPE.fields["boot_flag"][1]
BOOT_PARAMS_HEADER_OFFSET = BOOT_PARAMS_HDR_OFFSET + SETUP_HEADER_DTYPE.fields["header"][1]
assert (BOOT_PARAMS_BOOT_FLAG_OFFSET, BOOT_PARAMS_HEADER_OFFSET) == (0x1FE, 0x202)
assert BOOT_PARAMS_HDR_OFFSET + SETUP_HEADER_DTYPE.fields["setup_data"][1] == 0x250
