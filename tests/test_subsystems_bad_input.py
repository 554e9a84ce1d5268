"""Malformed sub-node data: every reader refuses it with a KHOFormatError naming the field and
the address, in the modes the module docstrings state, with work bounded by the input."""

import struct
from itertools import pairwise

import numpy as np
import pytest
from subsystem_helpers import machine

from kho.abi.block import KHO_MAX_BLOCKS
from kho.abi.luo import LUO_SER_DTYPE
from kho.devicetree.fdt_sw import SequentialFdt
from kho.errors import KHOFormatError
from kho.subsystems.blocks import OutgoingBlockSet, read_block_set
from kho.subsystems.kexec_metadata import pack_kexec_metadata, read_kexec_metadata
from kho.subsystems.kho_test import kho_test_fdt, read_kho_test, write_kho_test
from kho.subsystems.luo import OutgoingLuo, read_luo
from kho.subsystems.memblock import read_memblock, write_memblock
from kho.subsystems.memfd import preserve_memfd, read_memfd
from kho.subsystems.vmalloc import read_vmalloc, vmalloc

MODES = (True, False)


def refused(field, read, *args, modes=MODES, at=None, **kwargs):
    """``read`` raises KHOFormatError whose field starts with ``field`` in every mode of ``modes``."""
    for strict in modes:
        with pytest.raises(KHOFormatError) as err:
            read(*args, strict=strict, **kwargs)
        assert err.value.field.startswith(field), (strict, err.value)
        if at is not None:
            assert err.value.location == at, (strict, err.value)


# -- kho_vmalloc ---------------------------------------------------------------------------------
@pytest.fixture
def area():
    memory, allocator, tracker = machine()
    return memory, vmalloc(memory, allocator, tracker, bytes(600 * 4096))


def test_vmalloc_loop_and_pointers(area):
    memory, a = area
    memory.write_u64(a.chunks[1], a.chunks[0])  # the second chunk points back at the first
    refused("kho_vmalloc", read_vmalloc, memory, a.descriptor())
    memory.write_u64(a.chunks[0], 1 << 40)  # outside RAM
    refused("kho_vmalloc.chunk", read_vmalloc, memory, a.descriptor(), at=1 << 40)


def test_vmalloc_counts(area):
    memory, a = area
    desc = bytearray(a.descriptor())
    desc[8:12] = struct.pack("<I", 599)
    refused("kho_vmalloc.chunk.phys", read_vmalloc, memory, bytes(desc))  # an entry beyond total_pages
    desc[8:12] = struct.pack("<I", 601)
    refused("kho_vmalloc.total_pages", read_vmalloc, memory, bytes(desc))
    refused("kho_vmalloc", read_vmalloc, memory, bytes(desc[:15]))


def test_vmalloc_blocks(area):
    memory, a = area
    memory.write_u64(a.chunks[0] + 16, a.blocks[0] + 8)  # misaligned block: the kernel reads it anyway
    refused("kho_vmalloc.chunk.phys", read_vmalloc, memory, a.descriptor(), modes=(True,))
    assert read_vmalloc(memory, a.descriptor(), strict=False).blocks[1] == a.blocks[0] + 8
    memory.write_u64(a.chunks[0] + 16, 1 << 40)
    refused("kho_vmalloc.chunk.phys", read_vmalloc, memory, a.descriptor(), at=a.chunks[0] + 16)


def test_vmalloc_flags_order_and_shape(area):
    memory, a = area
    desc = bytearray(a.descriptor())
    desc[12:14] = struct.pack("<H", 0x80)  # the kernel drops unknown flag bits
    refused("kho_vmalloc.flags", read_vmalloc, memory, bytes(desc), modes=(True,))
    assert read_vmalloc(memory, bytes(desc), strict=False).flags == 0x80
    desc[12:16] = struct.pack("<HH", 1, 60)
    refused("kho_vmalloc.order", read_vmalloc, memory, bytes(desc))
    memory.write_u64(a.chunks[0] + 8 * 100, 0)  # a hole in a full chunk: entries follow a zero
    refused("kho_vmalloc.chunk.phys", read_vmalloc, memory, a.descriptor(), modes=(True,))
    refused("kho_vmalloc.total_pages", read_vmalloc, memory, a.descriptor(), modes=(False,))  # the kernel skips the rest


def test_vmalloc_empty_chunk_chain_is_bounded():
    memory, allocator, tracker = machine()
    a = vmalloc(memory, allocator, tracker, bytes(4096))
    chunks = [allocator.alloc_pages(0) for _ in range(5)]
    memory.write_u64(a.chunks[0], chunks[0])
    for here, there in pairwise(chunks):
        memory.write_u64(here, there)  # empty chunks, each pointing at the next
    refused("kho_vmalloc.chunk", read_vmalloc, memory, a.descriptor())


# -- KHO blocks ------------------------------------------------------------------------------------
def blocks(count, entry_size=64):
    memory, allocator, tracker = machine()
    out = OutgoingBlockSet(memory, allocator, tracker, entry_size)
    out.grow(count)
    out.serialize([bytes(entry_size)] * count)
    return memory, out


def test_block_cycle_and_counts():
    memory, out = blocks(200)
    memory.write_u64(out.blocks[3], out.blocks[1])
    refused("block.next", read_block_set, memory, out.head, 64, at=out.blocks[1])
    memory, out = blocks(200)
    for bad in (0, 64):
        memory.write_u64(out.blocks[1] + 8, bad)
        refused("block.count", read_block_set, memory, out.head, 64, at=out.blocks[1] + 8)
    memory.write_u64(out.blocks[1] + 8, 10)  # a short block in the middle: what the kernel accepts
    refused("block.count", read_block_set, memory, out.head, 64, modes=(True,))
    assert len(read_block_set(memory, out.head, 64, strict=False).entries) == 63 + 10 + 63 + 11
    refused("block", read_block_set, memory, 1 << 40, 64)


def test_block_sets_stop_at_the_kernels_10000_blocks():
    memory, _, _ = machine(4096, 64 << 20)
    first = 0x10000
    for i in range(KHO_MAX_BLOCKS + 1):
        phys = first + i * 4096
        memory.write(phys, struct.pack("<QQ", phys + 4096 if i < KHO_MAX_BLOCKS else 0, 1))
    refused("block.next", read_block_set, memory, first, 4080, at=first + KHO_MAX_BLOCKS * 4096)
    memory.write_u64(first + (KHO_MAX_BLOCKS - 1) * 4096, 0)
    assert len(read_block_set(memory, first, 4080).blocks) == KHO_MAX_BLOCKS


# -- kexec-metadata -----------------------------------------------------------------------------------
def test_kexec_metadata_bad_blobs():
    memory, _, _ = machine()
    memory.write(0x10000, pack_kexec_metadata("7.3.0", 4))
    for size, field in ((3, "kexec-metadata.blob-size"), (40, "kexec-metadata.blob-size")):
        refused(field, read_kexec_metadata, memory, 0x10000, size)
    memory.write(0x10000, struct.pack("<I", 2))
    refused("kexec-metadata.version", read_kexec_metadata, memory, 0x10000, 73, at=0x10000)
    refused("kexec-metadata", read_kexec_metadata, memory, 1 << 40, 73)
    raw = bytearray(pack_kexec_metadata("7.3.0", 4))
    raw[4:69] = b"x" * 65  # no NUL: strscpy keeps 64 characters
    memory.write(0x10000, bytes(raw))
    refused("kexec-metadata.previous_release", read_kexec_metadata, memory, 0x10000, 73, modes=(True,))
    assert read_kexec_metadata(memory, 0x10000, 73, strict=False).previous_release == "x" * 64
    assert read_kexec_metadata(memory, 0x10000, 80, strict=False).kexec_count == 4  # a bigger blob is fine for the kernel
    refused("kexec-metadata.blob-size", read_kexec_metadata, memory, 0x10000, 80, modes=(True,))


# -- memblock -------------------------------------------------------------------------------------------
def memblock_blob(build):
    memory, _, _ = machine()
    fdt = SequentialFdt(4096)
    fdt.finish_reservemap()
    fdt.begin_node("")
    build(fdt)
    fdt.end_node()
    memory.write(0x10000, fdt.finish())
    return memory, fdt.totalsize


def region(fdt, name="r", compatible="reserve-mem-v1", start=0x100000, size=0x2000, u64=8):
    fdt.begin_node(name)
    fdt.property_string("compatible", compatible)
    fdt.property("start", start.to_bytes(8, "little")[:u64])
    fdt.property("size", size.to_bytes(8, "little"))
    fdt.end_node()


def test_memblock_root_and_regions():
    memory, size = memblock_blob(lambda f: (f.property_string("compatible", "memblock-v2"), region(f)))
    refused("memblock.compatible", read_memblock, memory, 0x10000, size, at=0x10000)
    memory, size = memblock_blob(lambda f: (f.property_string("compatible", "memblock-v1"), region(f, compatible="x"),
                                            region(f, "ok")))
    refused("memblock/r.compatible", read_memblock, memory, 0x10000, size, modes=(True,))
    assert [r.name for r in read_memblock(memory, 0x10000, size, strict=False).regions] == ["ok"]
    memory, size = memblock_blob(lambda f: (f.property_string("compatible", "memblock-v1"), region(f, u64=4)))
    refused("memblock/r.start", read_memblock, memory, 0x10000, size, modes=(True,))
    assert read_memblock(memory, 0x10000, size, strict=False).regions == ()
    memory, size = memblock_blob(lambda f: (f.property_string("compatible", "memblock-v1"), region(f, "a"),
                                            region(f, "b", start=0x101000)))
    refused("memblock/b.start", read_memblock, memory, 0x10000, size, modes=(True,))
    memory, size = memblock_blob(lambda f: (f.property_string("compatible", "memblock-v1"), region(f, start=1 << 40)))
    refused("memblock/r.start", read_memblock, memory, 0x10000, size, modes=(True,))


def test_memblock_garbage_and_sizes():
    memory, allocator, tracker = machine()
    blob = write_memblock(memory, allocator, tracker, [("r", 0x200000, 0x1000)])
    memory.write(blob.phys, b"\xd0\x0d\xfe\xed" + bytes(60))
    refused("memblock", read_memblock, memory, blob.phys, blob.size)
    refused("memblock.blob-size", read_memblock, memory, blob.phys, 8)
    refused("memblock.blob-size", read_memblock, memory, blob.phys, 8192, modes=(True,))


# -- kho_test ----------------------------------------------------------------------------------------------
@pytest.fixture
def selftest():
    memory, allocator, tracker = machine()
    return memory, write_kho_test(memory, allocator, tracker, 256 << 10, seed=7)


def rewrite(memory, t, **changes):
    """Write the self-test's FDT blob again with some values changed; its size."""
    values = {"nr": t.nr_folios, "desc": t.folios_info.descriptor(), "csum": t.csum} | changes
    blob = kho_test_fdt(values["nr"], values["desc"], values["csum"], memory.page_size).blob()
    memory.write(t.phys, blob)
    return len(blob)


def test_kho_test_bad_fdt(selftest):
    memory, t = selftest
    raw = bytearray(memory.read(t.phys, t.size))
    at = raw.index(b"!OHK")
    raw[at] = 0
    memory.write(t.phys, bytes(raw))
    refused("kho_test.magic", read_kho_test, memory, t.phys, t.size)
    raw[at] = 0x21
    raw[raw.index(b"kho-test-v1")] = ord("K")
    memory.write(t.phys, bytes(raw))
    refused("kho_test.compatible", read_kho_test, memory, t.phys, t.size)


def test_kho_test_counts_and_folios(selftest):
    memory, t = selftest
    size = rewrite(memory, t, nr=513)  # more records than the one-page array holds
    refused("kho_test.nr_folios", read_kho_test, memory, t.phys, size)
    rewrite(memory, t)
    page = t.folios_info.blocks[0]
    first = memory.read_u64(page)
    memory.write_u64(page, (1 << 40) | (first & 0xFFF))
    refused("kho_test.folios_info[0]", read_kho_test, memory, t.phys, t.size, at=1 << 40)
    memory.write_u64(page, t.folios[1][0] | t.folios[0][1])  # the first folio recorded over the second one
    refused("kho_test.folios_info", read_kho_test, memory, t.phys, t.size, modes=(True,))
    assert read_kho_test(memory, t.phys, t.size, strict=False).folios[0] == (t.folios[1][0], t.folios[0][1])
    memory.write_u64(page, first | 11)  # order 11: above MAX_PAGE_ORDER
    refused("kho_test.folios_info[0]", read_kho_test, memory, t.phys, t.size, modes=(True,))


# -- memfd --------------------------------------------------------------------------------------------------
@pytest.fixture
def memfd():
    memory, allocator, tracker = machine()
    return memory, preserve_memfd(memory, allocator, tracker, b"data" * 3000, seals=1)


def test_memfd_seals_flags_and_counts(memfd):
    memory, phys = memfd
    memory.write(phys + 16, struct.pack("<I", 0x40))
    refused("memfd.seals", read_memfd, memory, phys, at=phys + 16)
    memory.write(phys + 16, struct.pack("<II", 1, 4))
    refused("memfd.flags", read_memfd, memory, phys, modes=(True,))
    assert read_memfd(memory, phys, strict=False).flags == 4
    memory.write(phys + 16, struct.pack("<IIQ", 1, 0, 257))  # 257 records do not fit one page
    refused("memfd.nr_folios", read_memfd, memory, phys)
    refused("memfd", read_memfd, memory, 1 << 40)
    refused("memfd.compatible", read_memfd, memory, phys, "memfd-v9")


def test_memfd_records(memfd):
    memory, phys = memfd
    got = read_memfd(memory, phys)
    page = got.vmalloc.blocks[0]
    memory.write_u64(page, 0)  # pfn 0: the kernel skips it
    refused("memfd.folios[0]", read_memfd, memory, phys, modes=(True,))
    assert [f.index for f in read_memfd(memory, phys, strict=False).folios] == [1, 2]
    memory.write_u64(page, (3 << 52) | ((1 << 40) >> 12))
    refused("memfd.folios[0]", read_memfd, memory, phys, at=1 << 40)
    memory.write(page, struct.pack("<QQ", (3 << 52) | (got.folios[1].phys >> 12), 1))  # folio and index twice
    refused("memfd.folios[1]", read_memfd, memory, phys, modes=(True,))


# -- LUO -----------------------------------------------------------------------------------------------------
@pytest.fixture
def luo():
    memory, allocator, tracker = machine()
    luo = OutgoingLuo(memory, allocator, tracker, 4)
    luo.create_session("a")
    luo.create_session("b")
    luo.preserve_memfd("a", 1, b"x" * 5000)
    luo.preserve_file("a", 2, "opaque-v1", 7)
    luo.set_flb("flb-v1", 3, 1)
    luo.serialize()
    return memory, luo


def test_luo_struct(luo):
    memory, out = luo
    refused("luo.blob-size", read_luo, memory, out.phys, 31)
    refused("luo.blob-size", read_luo, memory, out.phys, 33, modes=(True,))
    memory.write(out.phys, b"luo-v4\0\0")
    refused("luo.compatible", read_luo, memory, out.phys, 32, at=out.phys)
    memory.write(out.phys, b"luo-v5\0X")  # strncmp stops at the NUL
    refused("luo.compatible", read_luo, memory, out.phys, 32, modes=(True,))
    assert read_luo(memory, out.phys, 32, strict=False).liveupdate_num == 5
    refused("luo", read_luo, memory, 1 << 40, 32)


def test_luo_sessions_and_files(luo):
    memory, out = luo
    head = out.sessions_pa
    memory.write(head + 16 + 80, b"a\0")  # two sessions named "a": the kernel's EEXIST
    refused("luo.session[1].name", read_luo, memory, out.phys, 32)
    memory.write(head + 16 + 80, b"b\0")
    memory.write_u64(head + 16 + 72, 3)  # session "a" claims 3 files, its blocks hold 2
    refused("luo.session[a].files.count", read_luo, memory, out.phys, 32)
    memory.write_u64(head + 16 + 72, 2)
    files = memory.read_u64(head + 16 + 64)
    memory.write_u64(files + 16 + 64 + 56, 1)  # the second file takes the first one's token
    refused("luo.session[a].files[1].token", read_luo, memory, out.phys, 32, modes=(True,))
    memory.write_u64(files, files)  # the file block points at itself
    refused("luo.session[a].files.block.next", read_luo, memory, out.phys, 32)


def test_luo_flbs(luo):
    memory, out = luo
    memory.write(out.flbs_pa, struct.pack("<QQ", 1, 64))
    refused("luo.flb.count", read_luo, memory, out.phys, 32, at=out.flbs_pa + 8)
    memory.write(out.flbs_pa, struct.pack("<QQ", 2, 1))
    refused("luo.flb.pgcnt", read_luo, memory, out.phys, 32, modes=(True,))
    assert [f.name for f in read_luo(memory, out.phys, 32, strict=False).flbs] == ["flb-v1"]
    ser = np.frombuffer(memory.read(out.phys, 32), dtype=LUO_SER_DTYPE).copy()
    ser["flbs_pa"] = 0
    memory.write(out.phys, ser.tobytes())
    refused("luo.flbs_pa", read_luo, memory, out.phys, 32, modes=(True,))
    assert read_luo(memory, out.phys, 32, strict=False).flbs == ()
