"""Writers of memory dumps for the tests: a modelled machine's memory as a sparse raw file, a
zstd-compressed raw file and an ELF core (the layout QEMU's ``dump-guest-memory`` writes:
ELF64 little-endian ``ET_CORE``, one ``PT_LOAD`` a RAM bank with ``p_paddr`` the bank's
address), plus the x86 and arm64 handoffs a next kernel would find in memory.

Only the pages a :class:`~kho.memory.physical.PhysicalMemory` holds (stored or generated)
are written; everything else is a hole of the sparse file.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import zstandard

from kho.abi.setup_data import (
    BOOT_FLAG,
    BOOT_PARAMS_DTYPE,
    KHO_DATA_DTYPE,
    SETUP_DATA_DTYPE,
    SETUP_HEADER_MAGIC,
    SETUP_KEXEC_KHO,
    SETUP_RNG_SEED,
)
from kho.memory.physical import PhysicalMemory

#: ``Elf64_Ehdr`` and ``Elf64_Phdr`` (include/uapi/linux/elf.h), little-endian.
ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
assert (ELF64_EHDR.size, ELF64_PHDR.size) == (64, 56)
ET_CORE, ET_EXEC, EM_X86_64, PT_LOAD, PT_NOTE, PF_R = 4, 2, 62, 1, 4, 4


def contents(memory: PhysicalMemory) -> list[tuple[int, bytes]]:
    """``(phys, bytes)`` of every page run the memory holds, by address."""
    ps = memory.page_size
    out = [(pfn * ps, page) for pfn, page in memory.stored_pages()]
    out += [(start * ps, memory.read(start * ps, (end - start) * ps)) for start, end, _ in memory.generated_runs()]
    return sorted(out)


def write_raw(memory: PhysicalMemory, path, *, base: int = 0, end: int | None = None) -> None:
    """A sparse raw dump of ``[base, end)`` (default: up to the end of the last bank)."""
    end = memory.banks[-1].end if end is None else end
    with open(path, "wb") as f:
        for phys, data in contents(memory):
            lo, hi = max(phys, base), min(phys + len(data), end)
            if lo < hi:
                f.seek(lo - base)
                f.write(data[lo - phys:hi - phys])
        f.truncate(end - base)


def write_zstd(raw_path, path, *, frames: int = 1) -> None:
    """Compress a raw dump with zstd, streaming, as ``frames`` independent frames."""
    size = os.path.getsize(raw_path)
    step = -(-size // frames)
    cctx = zstandard.ZstdCompressor(level=3)
    with open(raw_path, "rb") as src, open(path, "wb") as dst:
        for start in range(0, size, step):
            with cctx.stream_writer(dst, closefd=False, size=min(step, size - start)) as writer:
                left = min(step, size - start)
                while left:
                    chunk = src.read(min(left, 8 << 20))
                    writer.write(chunk)
                    left -= len(chunk)


def write_elf_core(memory: PhysicalMemory, path, *, segments: list[tuple[int, int]] | None = None,
                   e_type: int = ET_CORE, note: bytes = b"") -> None:
    """An ELF64 core: an optional ``PT_NOTE`` then one ``PT_LOAD`` per ``(phys, size)``
    segment (default: the RAM banks), data page-aligned in the file, holes left sparse."""
    ps = memory.page_size
    segments = segments if segments is not None else [(b.start, b.size) for b in memory.banks]
    phnum = len(segments) + (1 if note else 0)
    offset = -(-(ELF64_EHDR.size + phnum * ELF64_PHDR.size + len(note)) // ps) * ps
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    headers = [ELF64_EHDR.pack(ident, e_type, EM_X86_64, 1, 0, ELF64_EHDR.size, 0, 0, ELF64_EHDR.size,
                               ELF64_PHDR.size, phnum, 0, 0, 0)]
    if note:
        headers.append(ELF64_PHDR.pack(PT_NOTE, 0, ELF64_EHDR.size + phnum * ELF64_PHDR.size, 0, 0, len(note), 0, 0))
    placed = []
    for phys, size in segments:
        headers.append(ELF64_PHDR.pack(PT_LOAD, PF_R, offset, 0, phys, size, size, ps))
        placed.append((phys, size, offset))
        offset += -(-size // ps) * ps
    with open(path, "wb") as f:
        f.write(b"".join(headers) + note)
        for phys, data in contents(memory):
            for start, size, file_offset in placed:
                lo, hi = max(phys, start), min(phys + len(data), start + size)
                if lo < hi:
                    f.seek(file_offset + lo - start)
                    f.write(data[lo - phys:hi - phys])
        f.truncate(offset)


def write_boot_params(memory: PhysicalMemory, phys: int, setup_data_phys: int, fdt: tuple[int, int],
                      scratch: tuple[int, int]) -> None:
    """An x86 ``boot_params`` at ``phys`` whose ``setup_data`` chain is an RNG seed node then a
    ``SETUP_KEXEC_KHO`` node (both in the page at ``setup_data_phys``), as kexec leaves them."""
    params = np.zeros(1, BOOT_PARAMS_DTYPE)
    params["hdr"]["boot_flag"] = BOOT_FLAG
    params["hdr"]["header"] = SETUP_HEADER_MAGIC
    params["hdr"]["setup_data"] = setup_data_phys
    memory.write(phys, params.tobytes())
    rng = np.zeros(1, SETUP_DATA_DTYPE)
    kho_node = setup_data_phys + SETUP_DATA_DTYPE.itemsize + 32
    rng[0] = (kho_node, SETUP_RNG_SEED, 32)
    kho = np.zeros(1, SETUP_DATA_DTYPE)
    kho[0] = (0, SETUP_KEXEC_KHO, KHO_DATA_DTYPE.itemsize)
    data = np.zeros(1, KHO_DATA_DTYPE)
    data[0] = (*fdt, *scratch)
    memory.write(setup_data_phys, rng.tobytes() + bytes(32) + kho.tobytes() + data.tobytes())
