"""``include/uapi/linux/elf.h``: the ELF64 headers of a core dump (QEMU ``dump-guest-memory``,
a kdump ``/proc/vmcore``), little-endian, as :mod:`kho.dumps.writers` writes them.

Reading goes through pyelftools; these layouts are for writing.  Sizes asserted.
"""

from __future__ import annotations

import struct

#: ``Elf64_Ehdr``: e_ident[16], e_type, e_machine, e_version, e_entry, e_phoff, e_shoff,
#: e_flags, e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx.
ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
assert ELF64_EHDR.size == 64
#: ``Elf64_Phdr``: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align.
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
assert ELF64_PHDR.size == 56

#: ``e_ident``: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_NONE, padding.
ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ELFDATA2MSB = 2
EV_CURRENT = 1
EI_NIDENT = 16
#: ``e_type`` values.
ET_EXEC = 2
ET_CORE = 4
#: ``e_machine`` values.
EM_X86_64 = 62
EM_AARCH64 = 183
#: ``p_type`` values and the read permission flag.
PT_LOAD = 1
PT_NOTE = 4
PF_R = 4
