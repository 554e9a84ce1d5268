"""kdump-compressed vmcores (makedumpfile -c/-l/-p/-z), read by kho.dumps.kdump.

Two independent checks: the committed vmcores were written by makedumpfile itself (see
tests/fixtures/linux-7.3-x86_64/README.md), and libkdumpfile (through drgn, when installed)
reads both those and kho's own writer's files to the same bytes as kho."""

import json
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from fixtures.make_kdump import add_kernel_pages, vmcoreinfo
from test_cli_dump_formats import FIXTURE, FIXTURES, run

from kho.dumps import open_dump
from kho.dumps.cut import cut, referenced_pages
from kho.dumps.kdump import DISK_DUMP_HEADER, PAGE_DESC, KdumpSource
from kho.dumps.writers import KDUMP_COMPRESSORS, write_kdump
from kho.errors import KHOError, KHOFormatError

FDT = 0x344000
#: The radix tree's root page in the fixture (the map's first page).
RADIX_ROOT = 0x343000
MAKEDUMPFILE = {"zlib": "vmcore-handover.kdump-zlib.zst", "lzo": "vmcore-handover.kdump-lzo.zst"}


@pytest.fixture(scope="module")
def memory():
    """The fixture's handover pages and the kernel pages make_kdump.py adds (the memory the
    makedumpfile vmcores hold)."""
    with open_dump(FIXTURE) as dump:
        memory = cut(dump.memory, referenced_pages(dump.handover(), dump.page_size))
    add_kernel_pages(memory)
    return memory


@pytest.fixture(scope="module")
def reference_units():
    with open_dump(FIXTURE) as dump:
        return dump.handover().units()


@pytest.fixture(scope="module")
def makedumpfile_vmcores(tmp_path_factory):
    d = tmp_path_factory.mktemp("kdump")
    out = {}
    for kind, name in MAKEDUMPFILE.items():
        out[kind] = d / name.removesuffix(".zst")
        out[kind].write_bytes(zstandard.ZstdDecompressor().decompress((FIXTURES / name).read_bytes()))
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory, memory):
    """kho's writer, every compression, with makedumpfile's VMCOREINFO, one page left out."""
    d = tmp_path_factory.mktemp("kdump-written")
    out = {}
    for kind in KDUMP_COMPRESSORS:
        out[kind] = d / f"vmcore.{kind}"
        write_kdump(memory, out[kind], compression=kind, excluded=[EXCLUDED // 4096], vmcoreinfo=vmcoreinfo())
    return out


#: A page the written vmcores leave out: the reserve_mem region's first page (contents only).
EXCLUDED = 0x1D6F9000


@pytest.mark.parametrize("kind", list(MAKEDUMPFILE))
def test_makedumpfile_vmcores_hold_the_fixtures_handover(makedumpfile_vmcores, reference_units, kind):
    with open_dump(makedumpfile_vmcores[kind]) as dump:
        assert isinstance(dump.source, KdumpSource) and dump.format == "kdump"
        assert dump.source.header_version == 6 and dump.source.dump_level == 1
        assert dump.source.utsname["release"] == "7.3.0-rc7" and dump.source.dumped_pages == 131072
        found = dump.handover()
        assert found.fdt_phys == FDT and found.compatible == "kho-v4" and found.units() == reference_units
        assert [n.name for n in found.subnodes] == ["memblock", "LUO", "kho_test", "kexec-metadata"]
        assert dump.handover(strict=True).units() == reference_units  # kho's strict decoding too


@pytest.mark.parametrize("kind", list(MAKEDUMPFILE))
def test_cli_reads_makedumpfile_vmcores(capsys, makedumpfile_vmcores, kind):
    code, out, err = run(capsys, "dump", makedumpfile_vmcores[kind], "--json")
    report = json.loads(out)
    assert code == 0 and not err and report["source"]["format"] == "kdump" and report["fdt_phys"] == FDT
    assert sum(report["units_by_order"].values()) == 141
    code, out, _ = run(capsys, "check", makedumpfile_vmcores[kind])
    assert code == 0 and "ok: every referenced range is preserved" in out


@pytest.mark.parametrize("kind", list(KDUMP_COMPRESSORS))
def test_written_vmcores_read_back(written, memory, reference_units, kind):
    with open_dump(written[kind]) as dump:
        assert dump.handover().units() == reference_units
        for phys, _ in memory.stored_pages(0, memory.banks[-1].end // 4096):
            phys *= 4096
            if phys != EXCLUDED:
                assert dump.memory.read(phys, 4096) == memory.read(phys, 4096), hex(phys)
        with pytest.raises(KHOFormatError, match="left out of the dump .makedumpfile dump level 1."):
            dump.memory.read(EXCLUDED, 8)
        assert dump.memory.read(EXCLUDED + 4096, 8) == bytes(8)  # a zero page, shared


def libkdumpfile_reads(path: Path, pages: list[int]) -> dict[int, bytes | None]:
    """Pages read by libkdumpfile through drgn (None where it faults)."""
    drgn = pytest.importorskip("drgn")
    prog = drgn.Program()
    prog.set_core_dump(str(path))
    out = {}
    for phys in pages:
        try:
            out[phys] = prog.read(phys, 4096, True)
        except drgn.FaultError:
            out[phys] = None
    return out


def test_libkdumpfile_reads_the_same_bytes(written, makedumpfile_vmcores, memory):
    pages = [int(p) * 4096 for p, _ in memory.stored_pages(0, memory.banks[-1].end // 4096)] + [EXCLUDED]
    for path in [*written.values(), *makedumpfile_vmcores.values()]:
        theirs = libkdumpfile_reads(path, pages)
        with open_dump(path) as dump:
            for phys, data in theirs.items():
                if data is None:
                    assert phys == EXCLUDED and path in written.values()
                    with pytest.raises(KHOFormatError):
                        dump.memory.read(phys, 4096)
                else:
                    assert dump.memory.read(phys, 4096) == data, (path.name, hex(phys))


def test_split_file_holds_its_range(tmp_path, memory):
    path = tmp_path / "vmcore.split"
    write_kdump(memory, path, split=(0, 0x344))  # the map's pages, not the FDT
    with open_dump(path) as dump:
        assert "split: pfns 0x0-0x344" in dump.description
        assert dump.memory.read(RADIX_ROOT, 4096) == memory.read(RADIX_ROOT, 4096)
        with pytest.raises(KHOFormatError, match="another file of this split dump"):
            dump.memory.read(FDT, 4096)


def test_page_size_is_the_block_size(tmp_path, written):
    with open_dump(written["zlib"]) as dump:
        assert dump.page_size == 4096
    with pytest.raises(KHOError, match="4096-byte pages, not 16384"):
        open_dump(written["zlib"], page_size=16384)


def patched(path: Path, out: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    out.write_bytes(bytes(raw))
    return out


def truncated(path: Path, out: Path, size: int) -> Path:
    out.write_bytes(path.read_bytes()[:size])
    return out


def field_offset(name: str) -> int:
    return DISK_DUMP_HEADER.fields[name][1]


def desc_offset(dump_path: Path, pfn: int) -> int:
    """File offset of ``pfn``'s page_desc in a vmcore (every RAM page dumped)."""
    with open_dump(dump_path) as dump:
        source = dump.source
        return source._desc_at + pfn * PAGE_DESC.itemsize


def data_offset(dump_path: Path, pfn: int) -> int:
    """File offset of ``pfn``'s stored data."""
    at = desc_offset(dump_path, pfn)
    return int(np.frombuffer(dump_path.read_bytes()[at:at + PAGE_DESC.itemsize], PAGE_DESC)[0]["offset"])


@pytest.mark.parametrize("damage, message", [
    (lambda p, t: truncated(p, t, 600), "sub_hdr_size"),
    (lambda p, t: patched(p, t, field_offset("block_size"), (12345).to_bytes(4, "little")), "block_size"),
    (lambda p, t: patched(p, t, field_offset("bitmap_blocks"), (1 << 30).to_bytes(4, "little")), "bitmap_blocks"),
    (lambda p, t: patched(p, t, field_offset("bitmap_blocks"), (3).to_bytes(4, "little")), "bitmap_blocks"),
    (lambda p, t: patched(p, t, field_offset("header_version"), (0).to_bytes(4, "little")), "header_version"),
    (lambda p, t: truncated(p, t, 50000), "page descriptors"),
    (lambda p, t: patched(p, t, desc_offset(p, FDT // 4096) + 12, (0x40).to_bytes(4, "little")), "unknown compression"),
    (lambda p, t: patched(p, t, desc_offset(p, FDT // 4096), (1 << 40).to_bytes(8, "little")), "file offset"),
    (lambda p, t: patched(p, t, desc_offset(p, FDT // 4096) + 8, (5).to_bytes(4, "little")), "not a 4096-byte page"),
    (lambda p, t: patched(p, t, data_offset(p, FDT // 4096), b"\xff\xff\xff"), "damaged zlib data"),
])
def test_damaged_vmcores_are_one_line(capsys, tmp_path, written, damage, message):
    bad = damage(written["zlib"], tmp_path / "bad")
    code, out, err = run(capsys, "dump", bad)
    assert code == 3 and not out and err.startswith("kho: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_headers_bitmaps_and_descriptors_only_refuse(tmp_path_factory, small_vmcore, data):
    """Any bytes in the headers, bitmaps and descriptors: opening, scanning, finding and
    reading refuse with KHOError or succeed, never anything else."""
    raw = bytearray(small_vmcore.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut_to = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    path = tmp_path_factory.mktemp("mut") / "vmcore"
    path.write_bytes(bytes(raw[:cut_to]))
    try:
        with open_dump(path) as dump:
            dump.scan()
            dump.memory.read(FDT, 4096)
            dump.handover()
    except KHOError:
        pass


@pytest.fixture(scope="module")
def small_vmcore(tmp_path_factory, memory):
    """A 16 MiB machine's vmcore holding the fixture's FDT page (headers, bitmaps and
    descriptors are most of the file)."""
    from kho.memory.physical import Bank, PhysicalMemory
    small = PhysicalMemory([Bank(0, 16 << 20)], 4096)
    small.write(FDT, memory.read(FDT, 4096))
    path = tmp_path_factory.mktemp("small") / "vmcore"
    write_kdump(small, path, compression="zlib")
    return path


def test_scan_holds_bounded_memory(written):
    """The scan keeps one descriptor chunk and the prefixes of its pages, whatever the dump
    size; every dumped page is visited once (the zero page's data decompressed once)."""
    with open_dump(written["zlib"]) as dump:
        scan = dump.scan()
        assert scan.scanned_bytes == dump.source.dumped_pages * 4096
        assert FDT in scan.fdt.tolist()


def test_ram_bitmap_is_the_extent(written):
    with open_dump(written["lzo"]) as dump:
        assert dump.source.extents == [(0, 512 << 20)]
        assert np.array_equal(dump.memory.read(FDT, 4), bytes.fromhex("d00dfeed"))


@settings(max_examples=200, deadline=None)
@given(bits=st.lists(st.booleans(), min_size=1, max_size=3 * 64 * 1024 + 70).map(np.array),
       lo=st.integers(0, 1 << 18), hi=st.integers(0, 1 << 18), dense=st.booleans())
def test_bitmap_helpers_agree_with_unpacked_bits(bits, lo, hi, dense):
    """The chunked bitmap helpers against plain numpy on the unpacked bits, across chunk ends."""
    from kho.dumps.kdump import _mask_outside, _runs, _set_bits
    if dense:
        bits = np.ones(bits.size, bool) ^ (np.arange(bits.size) % 977 == 0)
    bits = np.concatenate([bits, np.zeros(-bits.size % 64, bool)])
    words = np.packbits(bits, bitorder="little").view("<u8").copy()
    lo, hi = min(lo, hi), max(lo, hi)
    masked = bits.copy()
    masked[:lo] = masked[hi:] = False
    assert np.array_equal(np.unpackbits(_mask_outside(words, lo, hi).view(np.uint8), bitorder="little").astype(bool),
                          masked)
    rank = np.concatenate([[0], np.cumsum([bin(int(w)).count("1") for w in words])])
    chunks = list(_set_bits(words, rank))
    assert np.array_equal(np.concatenate([c for c, _ in chunks] or [np.empty(0, np.int64)]), np.flatnonzero(bits))
    assert all(r == int(np.count_nonzero(bits[:c[0]])) for c, r in chunks)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], bits.astype(np.int8), [0]])))
    assert _runs(words, 4096) == [(int(s) * 4096, int(e) * 4096) for s, e in zip(edges[0::2], edges[1::2])]


# -- what a hostile file cannot do (found in review) ----------------------------------------------

def _small(tmp_path, compression, pages=(0x100, 0x101, 0x200), size=16 << 20):
    """A vmcore of a ``size``-byte machine whose ``pages`` (pfns) hold their pfn's low byte."""
    from kho.memory.physical import Bank, PhysicalMemory
    m = PhysicalMemory([Bank(0, size)], 4096)
    for pfn in pages:
        m.write(pfn * 4096, bytes([pfn & 0xFF or 1]) * 4096)
    path = tmp_path / f"small.{compression}"
    write_kdump(m, path, compression=compression)
    return path


def _layout(path: Path) -> dict:
    h = np.frombuffer(path.read_bytes()[:DISK_DUMP_HEADER.itemsize], DISK_DUMP_HEADER)[0]
    bs, sub, blocks = int(h["block_size"]), int(h["sub_hdr_size"]), int(h["bitmap_blocks"])
    return {"bitmap_at": (1 + sub) * bs, "half": blocks // 2 * bs, "desc_at": (1 + sub + blocks) * bs}


def _point_page_at(path: Path, pfn: int, data: bytes, flags: int) -> None:
    """Append ``data`` to the file and point ``pfn``'s descriptor at it (every RAM page dumped)."""
    raw = bytearray(path.read_bytes())
    at = _layout(path)["desc_at"] + pfn * PAGE_DESC.itemsize
    raw[at:at + 16] = np.array([(len(raw), len(data), flags, 0)], PAGE_DESC).tobytes()[:16]
    path.write_bytes(bytes(raw) + data)


def test_a_zstd_frame_claiming_a_huge_size_is_refused_unread(tmp_path):
    import struct
    path = _small(tmp_path, "zstd")
    rle = (1 | (1 << 1) | ((128 << 10) << 3)).to_bytes(3, "little") + b"\x01"  # one 128 KiB RLE block
    frame = b"\x28\xb5\x2f\xfd" + bytes([(3 << 6) | (1 << 5)]) + struct.pack("<Q", 1 << 40) + rle
    _point_page_at(path, 0x100, frame, 0x20)
    with open_dump(path) as dump, pytest.raises(KHOFormatError, match="says it decompresses to more than"):
        dump.memory.read(0x100000, 4096)


def test_zlib_and_snappy_data_longer_than_a_page_are_refused(tmp_path):
    import zlib

    import cramjam
    for compression, data, flags in (("zlib", zlib.compress(b"\xab" * 8192), 1),
                                     ("snappy", bytes(cramjam.snappy.compress_raw(b"\xab" * 8192)), 4)):
        path = _small(tmp_path, compression)
        _point_page_at(path, 0x100, data, flags)
        with open_dump(path) as dump, pytest.raises(KHOFormatError, match="more than a 4096-byte page"):
            dump.memory.read(0x100000, 4096)


def test_a_dumped_page_outside_ram_keeps_the_ranks(tmp_path):
    """A bit set in the second bitmap but not the first still has its descriptor (libkdumpfile
    and crash count it): later pages keep theirs."""
    path = _small(tmp_path, "zlib")
    raw = bytearray(path.read_bytes())
    raw[_layout(path)["bitmap_at"] + 0x50 // 8] &= ~(1 << (0x50 % 8)) & 0xFF  # pfn 0x50: no RAM, still dumped
    path.write_bytes(bytes(raw))
    with open_dump(path) as dump:
        assert dump.memory.read(0x100000, 4) == b"\x01" * 4 and dump.memory.read(0x200000, 4) == b"\x01" * 4
        assert 0x50 * 4096 not in dump.scan().fdt.tolist()
        with pytest.raises(KHOError):
            dump.memory.read(0x50 * 4096, 8)  # not RAM


def test_a_ram_bitmap_of_a_million_ranges_is_refused(capsys, tmp_path):
    from kho.dumps.kdump import MAX_RAM_RANGES
    path = _small(tmp_path, "zlib", pages=(), size=8 << 30)
    lay = _layout(path)
    raw = bytearray(path.read_bytes())
    raw[lay["bitmap_at"]:lay["bitmap_at"] + lay["half"]] = b"\x55" * lay["half"]  # every other page RAM
    raw[lay["bitmap_at"] + lay["half"]:lay["desc_at"]] = bytes(lay["half"])  # none dumped
    path.write_bytes(bytes(raw[:lay["desc_at"]]))
    code, out, err = run(capsys, "units", path)
    assert code == 3 and f"more than {MAX_RAM_RANGES} ranges" in err and err.count("\n") == 1
