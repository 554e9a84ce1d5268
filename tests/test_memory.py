import numpy as np
import pytest

from kho.errors import KHOError
from kho.memory.contents import pattern_bytes, pattern_words
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea


def two_banks():
    return PhysicalMemory([Bank(0, 1 << 20), Bank(4 << 20, 2 << 20, node=1)])


def test_geometry_and_banks():
    m = two_banks()
    assert m.ram_size == 3 << 20 and m.nr_pages == 768 and m.page_shift == 12
    assert m.bank_of(0x1000).start == 0 and m.bank_of(2 << 20) is None
    assert m.in_ram(4 << 20, 2 << 20) and not m.in_ram((1 << 20) - 4096, 8192)
    ok = m.in_ram_array(np.array([0, 1 << 20, 5 << 20], dtype=np.uint64), np.array([4096, 4096, 1 << 20], dtype=np.uint64))
    assert ok.tolist() == [True, False, True]


@pytest.mark.parametrize("banks", [[], [(0, 100)], [(100, 4096)], [(0, 8192), (4096, 8192)], [(1 << 52, 4096)]])
def test_bad_banks(banks):
    with pytest.raises(KHOError) as info:
        PhysicalMemory(banks)
    assert info.value.errno_name == "EINVAL"


@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
def test_page_sizes(page_size):
    m = PhysicalMemory.single_bank(64 * page_size, page_size)
    assert m.geometry.max_order == {4096: 10, 16384: 11, 65536: 13}[page_size]
    m.write(page_size - 3, b"abcdef")
    assert m.read(page_size - 3, 6) == b"abcdef"


def test_bad_page_size():
    with pytest.raises(KHOError):
        PhysicalMemory.single_bank(1 << 20, 8192)


def test_unwritten_reads_zero_and_writes_stick():
    m = two_banks()
    assert m.read(0x2000, 16) == bytes(16)
    m.write(0x2ffc, b"12345678")
    assert m.read(0x2ff8, 16) == bytes(4) + b"12345678" + bytes(4)
    assert m.nr_stored_pages == 2
    m.write_u64(0x10, 0x1122334455667788)
    assert m.read_u64(0x10) == 0x1122334455667788
    assert m.read(0x10, 1) == b"\x88"  # little-endian


def test_read_outside_ram():
    m = two_banks()
    for phys, size in [((1 << 20) - 8, 16), (2 << 20, 1), (-8, 8)]:
        with pytest.raises(KHOError):
            m.read(phys, size)
    with pytest.raises(KHOError):
        m.write(3 << 20, b"x")


def test_pattern_is_deterministic_and_seed_dependent():
    a = pattern_bytes(7, 100, 2, 4096)
    assert a == pattern_bytes(7, 100, 2, 4096) and len(a) == 8192
    assert a[4096:] == pattern_bytes(7, 101, 1, 4096)
    assert a != pattern_bytes(8, 100, 2, 4096)
    w = pattern_words(7, 100, 1, 4096)
    assert len(set(w.tolist())) == 512


def test_generated_regions_and_overrides():
    m = two_banks()
    m.fill_pattern(0x10000, 0x8000, seed=3)
    assert m.read(0x10000, 0x8000) == pattern_bytes(3, 0x10, 8, 4096)
    assert m.nr_stored_pages == 0
    m.write(0x12000, b"hi")
    expect = bytearray(pattern_bytes(3, 0x10, 8, 4096))
    expect[0x2000:0x2002] = b"hi"
    assert m.read(0x10000, 0x8000) == bytes(expect)
    runs = list(m.generated_runs())
    assert runs == [(0x10, 0x12, 3), (0x13, 0x18, 3)]
    m.discard(0x10000, 0x8000)
    assert m.read(0x10000, 0x8000) == bytes(0x8000) and m.nr_stored_pages == 0
    assert list(m.generated_runs()) == []


def test_discard_requires_page_alignment():
    with pytest.raises(KHOError):
        two_banks().discard(0x10, 4096)


def test_digest_tracks_contents():
    m = two_banks()
    m.fill_pattern(0, 1 << 20, seed=1)
    d = m.digest(0, 1 << 20, chunk_pages=7)
    assert d == m.digest(0, 1 << 20)
    m.write(0x5000, b"\x00")
    assert d != m.digest(0, 1 << 20)


def test_scratch_overlap_queries():
    m = two_banks()
    m.set_scratch([ScratchArea(0x80000, 0x10000, "lowmem"), ScratchArea(5 << 20, 0x100000, "node1")])
    assert m.overlaps_scratch(0x8f000, 0x1000) and not m.overlaps_scratch(0x90000, 0x1000)
    assert m.overlaps_scratch(0x7f000, 0x2000) and not m.overlaps_scratch(0x7f000, 0x1000)
    arr = m.overlaps_scratch_array(np.array([0x7f000, 0x80000, 0x90000, 5 << 20], np.uint64), np.uint64(0x1000))
    assert arr.tolist() == [False, True, False, True]
    with pytest.raises(KHOError):
        m.set_scratch([ScratchArea(0x80000, 0x10000), ScratchArea(0x88000, 0x10000)])
    with pytest.raises(KHOError):
        m.set_scratch([ScratchArea(2 << 20, 0x1000)])
