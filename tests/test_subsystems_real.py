"""The sub-nodes a real Linux 7.3 kernel wrote decode to what ../shared/realkernel/linux-7.3-x86_64/README.md
states, and kho's writers reproduce them byte for byte (fixtures: tests/fixtures/linux-7.3-x86_64/subnodes)."""

import struct

import numpy as np
import pytest
from subsystem_helpers import (
    REAL_SUBNODES,
    SHARED,
    fixture_blob,
    fixture_pages,
    real_memory,
)

from kho.abi.memfd import F_SEAL_SEAL, MEMFD_LUO_FOLIO_DIRTY, MEMFD_LUO_FOLIO_UPTODATE
from kho.devicetree.flat import parse_fdt, prop_bytes
from kho.errors import KHOFormatError
from kho.subsystems.kexec_metadata import pack_kexec_metadata, read_kexec_metadata
from kho.subsystems.kho_test import kho_test_fdt, read_kho_test
from kho.subsystems.luo import read_luo
from kho.subsystems.memblock import ReservedRegion, memblock_fdt, read_memblock
from kho.subsystems.memfd import read_memfd
from kho.subsystems.registry import read_subnode

#: What the shared README and the self-test's folio list state.
KHO_TEST_FIRST_FOLIOS = [(0x400000, 8), (0x500000, 6), (0x3C8000, 3)]
KHO_TEST_CSUM = 0x130D8C75


@pytest.fixture(scope="module")
def memory():
    return real_memory()


def test_fixture_pages_hold_the_debugfs_blobs():
    pages = fixture_pages()
    for name, blob in (("memblock", "out__sub_fdts__memblock"), ("LUO", "out__sub_fdts__LUO"),
                       ("kho_test", "out__sub_fdts__kho_test"), ("kexec-metadata", "out__sub_fdts__kexec-metadata")):
        phys, size = REAL_SUBNODES[name]
        assert pages[phys][:size] == fixture_blob(blob), name


def test_kexec_metadata(memory):
    phys, size = REAL_SUBNODES["kexec-metadata"]
    got = read_kexec_metadata(memory, phys, size)
    assert got.to_json() == {"version": 1, "previous_release": "7.3.0-rc7", "kexec_count": 1}
    assert pack_kexec_metadata("7.3.0-rc7", 1) == fixture_blob("out__sub_fdts__kexec-metadata")
    # the second kernel, kexec'ed once, hands over count 2
    assert pack_kexec_metadata("7.3.0-rc7", 2) == fixture_blob("out__sub_fdts__kexec-metadata.2")


def test_memblock(memory):
    phys, size = REAL_SUBNODES["memblock"]
    got = read_memblock(memory, phys, size)
    assert got.to_json() == {"compatible": "memblock-v1",
                             "regions": [{"name": "realk_small", "start": 0x1D6F9000, "size": 1052 << 10}]}
    fdt = memblock_fdt([ReservedRegion("realk_small", 0x1D6F9000, 1052 << 10)], 4096)
    assert fdt.blob() == fixture_blob("out__sub_fdts__memblock") == fixture_blob("out__sub_fdts__memblock.2")[:size]
    assert bytes(fdt.buffer) == fixture_pages()[phys]  # the whole page, the stale strings at its end included


def test_kho_test(memory):
    phys, size = REAL_SUBNODES["kho_test"]
    got = read_kho_test(memory, phys, size)
    assert got.nr_folios == 60 and got.csum == KHO_TEST_CSUM and got.magic == 0x4B484F21
    assert got.folios_info.to_json() == {"first": 0x2E0000, "total_pages": 1, "flags": 1, "order": 0,
                                         "chunks": [0x2E0000], "blocks": [0x2DF000]}
    assert list(got.folios[:3]) == KHO_TEST_FIRST_FOLIOS
    assert sum(4096 << o for _, o in got.folios) == 32 << 20
    if (SHARED / "test_kho-folios.txt").exists():
        listed = [(int(p, 16), int(o)) for p, o in (line.split() for line in (SHARED / "test_kho-folios.txt").open())]
        assert list(got.folios) == listed
    fdt = kho_test_fdt(60, got.folios_info.descriptor(), KHO_TEST_CSUM, 4096)
    assert fdt.blob() == fixture_blob("out__sub_fdts__kho_test")
    pages = fixture_pages()
    assert bytes(fdt.buffer) == (pages[phys] + pages[phys + 4096])[:len(fdt.buffer)]


def test_luo(memory):
    phys, size = REAL_SUBNODES["LUO"]
    got = read_luo(memory, phys, size)
    assert got.to_json() == {"compatible": "luo-v5", "liveupdate_num": 1, "sessions_pa": 0, "flbs_pa": 0x3564000,
                             "sessions": [], "flbs": []}
    second = np.frombuffer(fixture_blob("out__sub_fdts__LUO.2"), dtype="<u8")
    assert fixture_blob("out__sub_fdts__LUO.2")[:8] == b"luo-v5\0\0" and second[1] == 2 and second[2] == 0


def test_luo_freed_by_the_next_kernel_is_refused(memory):
    """The second kernel's kho/in shows the LUO blob after it was freed and reused."""
    data = fixture_blob("in__sub_fdts__LUO")
    memory.write(0x200000, data)
    for strict in (True, False):
        with pytest.raises(KHOFormatError) as err:
            read_luo(memory, 0x200000, len(data), strict=strict)
        assert err.value.field == "luo.compatible" and err.value.location == 0x200000


def test_the_preserved_memfd(memory):
    """LUO preserved a 64-page memfd; its sessions are not serialized yet, but its memfd_luo_ser is in the map."""
    got = read_memfd(memory, 0x35CE000)
    assert (got.size, got.nr_folios, got.seals, got.pos, got.flags) == (64 << 12, 64, F_SEAL_SEAL, 0, 0)
    assert [f.index for f in got.folios] == list(range(64))
    assert {f.flags for f in got.folios} == {MEMFD_LUO_FOLIO_DIRTY | MEMFD_LUO_FOLIO_UPTODATE}
    assert got.folios[0].phys == 0x1F784000 and got.vmalloc.chunks == (0x3635000,) and got.vmalloc.blocks == (0x34D0000,)


def _stream_dump(wanted):
    """Stream mem-stage1.raw.zst once, keeping only the byte ranges ``wanted`` ((phys, size) pairs)."""
    zstandard = pytest.importorskip("zstandard")
    ranges = sorted(wanted)
    out = {}
    step = 1 << 20
    with (SHARED / "mem-stage1.raw.zst").open("rb") as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(raw)
        offset = 0
        while ranges:
            chunk = reader.read(step)
            if not chunk:
                break
            end = offset + len(chunk)
            for phys, size in ranges:
                lo, hi = max(phys, offset), min(phys + size, end)
                if lo < hi:
                    out.setdefault(phys, bytearray(size))[lo - phys:hi - phys] = chunk[lo - offset:hi - offset]
            ranges = [(p, s) for p, s in ranges if p + s > end]
            offset = end
    return {p: bytes(v) for p, v in out.items()}


@pytest.mark.skipif(not (SHARED / "mem-stage1.raw.zst").exists(), reason="needs ../shared (the full real-kernel dump)")
def test_full_dump_checksum_and_fixture_provenance():
    """The self-test's csum (x86_64 csum_partial over its 32 MiB of folios) verifies on the full dump,
    and the committed fixture pages are what the dump holds at their addresses."""
    pages = fixture_pages()
    memory = real_memory()
    phys, size = REAL_SUBNODES["kho_test"]
    kho_test = read_kho_test(memory, phys, size)
    dump = _stream_dump([(p, 4096 << o) for p, o in kho_test.folios] + [(p, 4096) for p in pages])
    for p, data in pages.items():
        assert dump[p] == data, hex(p)
    for p, o in kho_test.folios:
        memory.write(p, dump[p])
    assert kho_test.checksum(memory, "x86_64") == kho_test.csum == KHO_TEST_CSUM
    assert kho_test.checksum(memory, "generic") != KHO_TEST_CSUM
    referenced = {r.phys for r in kho_test.referenced_ranges(4096)}
    assert {0x2FC000, 0x2E0000, 0x2DF000} <= referenced and struct.pack("<I", KHO_TEST_CSUM) in fixture_blob(
        "out__sub_fdts__kho_test")


def test_every_subnode_of_the_real_kho_fdt_decodes(memory):
    """Walk the real root FDT's sub-nodes (kho-v4: blob-size, preserved-data) and decode each by name."""
    root = parse_fdt(fixture_blob("kho-fdt-0x344000.dtb"), strict=True)
    decoded = {}
    for node in root.root.nodes:
        size = int.from_bytes(prop_bytes(node.get_property("blob-size")), "little")
        phys = int.from_bytes(prop_bytes(node.get_property("preserved-data")), "little")
        assert (phys, size) == REAL_SUBNODES[node.name]
        decoded[node.name] = read_subnode(memory, node.name, phys, size).to_json()
    assert list(decoded) == ["memblock", "LUO", "kho_test", "kexec-metadata"]  # newest first
    assert decoded["kexec-metadata"]["kexec_count"] == 1 and decoded["LUO"]["sessions"] == []
    assert decoded["memblock"]["regions"][0]["name"] == "realk_small" and decoded["kho_test"]["nr_folios"] == 60
    assert read_subnode(memory, "unknown", 0x1000, 8) is None
