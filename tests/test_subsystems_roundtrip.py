"""Round trips and properties of every sub-node structure kho.subsystems writes and reads,
with 4 KiB, 16 KiB and 64 KiB pages: what a writer hands over, a strict reader reads back
the same, and the lenient reader agrees on it."""

import json
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from subsystem_helpers import PAGE_SIZES, machine

from kho.abi.block import KHO_BLOCK_HEADER_DTYPE, kho_block_count_per_block
from kho.abi.kexec_handover import kho_vmalloc_size
from kho.abi.luo import LUO_FILE_SER_DTYPE, LUO_SESSION_SER_DTYPE, luo_flb_max
from kho.abi.memfd import (
    F_SEAL_GROW,
    F_SEAL_SEAL,
    MEMFD_LUO_FH_COMPATIBLE,
    MEMFD_LUO_FH_COMPATIBLE_V1,
)
from kho.devicetree.fdt_sw import SequentialFdt
from kho.devicetree.flat import parse_fdt, prop_bytes
from kho.errors import KHOError
from kho.subsystems.blocks import OutgoingBlockSet, read_block_set
from kho.subsystems.checksum import csum_partial
from kho.subsystems.kexec_metadata import read_kexec_metadata, write_kexec_metadata
from kho.subsystems.kho_test import read_kho_test, write_kho_test
from kho.subsystems.luo import OutgoingLuo, read_luo
from kho.subsystems.memblock import ReservedRegion, read_memblock, write_memblock
from kho.subsystems.memfd import preserve_memfd, read_memfd
from kho.subsystems.vmalloc import read_vmalloc, vmalloc

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=15)


def both_modes(read, *args):
    strict = read(*args, strict=True)
    assert read(*args, strict=False) == strict
    json.dumps(strict.to_json())
    return strict


# -- libfdt's sequential-write API ------------------------------------------------------------
PROP_NAMES = st.text(string.ascii_lowercase + ",-_#", min_size=1, max_size=20)
NODE_NAMES = st.text(string.ascii_lowercase + string.digits + "_-", min_size=1, max_size=20)
TREES = st.recursive(
    st.lists(st.tuples(PROP_NAMES, st.binary(max_size=24)), max_size=4).map(lambda props: ("props", props)),
    lambda kids: st.tuples(st.lists(st.tuples(PROP_NAMES, st.binary(max_size=24)), max_size=3),
                           st.lists(st.tuples(NODE_NAMES, kids), max_size=3)).map(lambda t: ("node", t)),
    max_leaves=6)


def _emit(writer, tree):
    kind, body = tree
    props, children = (body, []) if kind == "props" else body
    for name, value in props:
        writer.property(name, value)
    for name, child in children:
        writer.begin_node(name)
        _emit(writer, child)
        writer.end_node()


@FAST
@given(tree=TREES, reservations=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=2))
def test_sequential_fdt_is_libfdt_byte_for_byte(tree, reservations):
    libfdt = pytest.importorskip("libfdt")
    ours, theirs = SequentialFdt(1 << 16), libfdt.FdtSw()
    for address, size in reservations:
        ours.add_reservemap_entry(address, size)
        theirs.add_reservemap_entry(address, size)
    for w in (ours, theirs):
        w.finish_reservemap()
        w.begin_node("")
        _emit(w, tree)
        w.end_node()
    fdt = theirs.as_fdt()
    assert ours.finish() == bytes(fdt.as_bytearray())[:fdt.totalsize()]


def test_sequential_fdt_refuses_what_libfdt_refuses():
    with pytest.raises(KHOError) as err:
        SequentialFdt(16)
    assert err.value.errno_name == "ENOMEM"
    small = SequentialFdt(96)
    small.finish_reservemap()
    small.begin_node("")
    with pytest.raises(KHOError) as err:
        small.property("x", bytes(64))
    assert err.value.errno_name == "ENOMEM"
    with pytest.raises(KHOError):
        small.finish()  # a node is still open
    with pytest.raises(KHOError):
        SequentialFdt(4096).begin_node("")  # before fdt_finish_reservemap


# -- csum_partial -------------------------------------------------------------------------------
def _x86_reference(data: bytes, wsum: int) -> int:
    """arch/x86/lib/csum-partial_64.c step by step: 64-bit adds with the carry added back."""
    acc, mask = wsum, (1 << 64) - 1
    data += bytes(-len(data) % 8)
    for i in range(0, len(data), 8):
        acc += int.from_bytes(data[i:i + 8], "little")
        acc = (acc & mask) + (acc >> 64)
    rotated = ((acc >> 32) | (acc << 32)) & mask
    return ((acc + rotated) & mask) >> 32


def _generic_reference(data: bytes, wsum: int) -> int:
    """lib/checksum.c's do_csum (aligned buffer) and csum_partial."""
    result, carry = 0, 0
    whole = len(data) & ~3
    for i in range(0, whole, 4):
        word = int.from_bytes(data[i:i + 4], "little")
        result = (result + carry + word) & 0xFFFFFFFF
        carry = int(word > result)
    result += carry
    result = (result & 0xFFFF) + (result >> 16)
    if len(data) & 2:
        result += int.from_bytes(data[whole:whole + 2], "little")
    if len(data) & 1:
        result += data[-1]
    for _ in range(2):
        result = (result & 0xFFFF) + (result >> 16)
    total = (result + wsum) & 0xFFFFFFFF
    return (total + 1) & 0xFFFFFFFF if wsum > total else total


DATA = st.one_of(st.binary(max_size=300), st.integers(0, 80).map(lambda n: b"\xff" * (4 * n)),
                 st.integers(0, 80).map(lambda n: bytes(4 * n)))


@settings(max_examples=200, deadline=None)
@given(data=DATA, wsum=st.one_of(st.just(0), st.just(0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)))
def test_csum_partial_is_the_kernels(data, wsum):
    assert csum_partial(data, wsum, "x86_64") == _x86_reference(data, wsum)
    if len(data) % 2 == 0:
        assert csum_partial(data, wsum, "generic") == _generic_reference(data, wsum)


@settings(max_examples=100, deadline=None)
@given(a=st.binary(max_size=64).map(lambda b: b + bytes(-len(b) % 8)), b=st.binary(max_size=64))
def test_x86_csum_chains_like_one_call(a, b):
    """Folio by folio (as the self-test does) or in one go: the same x86_64 checksum."""
    assert csum_partial(b, csum_partial(a, 0)) == csum_partial(a + b, 0)


def test_csum_partial_edges():
    assert csum_partial(bytes(4096)) == 0
    assert csum_partial(b"\xff" * 4096) == 0xFFFFFFFF  # ones' complement: never 0 for nonzero data
    assert csum_partial(b"\x01\x00\x00\x00\x00\x00\x00\x00" * 2) == 2
    with pytest.raises(KHOError):
        csum_partial(b"", 1 << 32)
    with pytest.raises(KHOError):
        csum_partial(b"", 0, "sparc")


# -- kho_vmalloc --------------------------------------------------------------------------------
@FAST
@given(page_size=st.sampled_from(PAGE_SIZES), extra=st.integers(-2, 2), chunks=st.integers(0, 2), seed=st.integers(0, 99))
def test_vmalloc_round_trip(page_size, extra, chunks, seed):
    memory, allocator, tracker = machine(page_size, 64 << 20 if page_size == 4096 else 256 << 20)
    chunks = min(chunks, {4096: 2, 16384: 1, 65536: 0}[page_size])  # the pages' contents are host memory
    nr_pages = max(1, chunks * kho_vmalloc_size(page_size) + extra)
    data = np.random.default_rng(seed).bytes(nr_pages * page_size - seed)
    area = vmalloc(memory, allocator, tracker, data)
    assert len(area.chunks) == nr_pages // kho_vmalloc_size(page_size) + 1  # a full chunk is followed by another
    got = both_modes(lambda *a, **k: read_vmalloc(memory, area.descriptor(), **k))
    assert got == area and got.read(memory, len(data)) == data
    preserved = set(tracker.units())
    assert {(c, 0) for c in area.chunks} | {(b, 0) for b in area.blocks} <= preserved


# -- KHO blocks -----------------------------------------------------------------------------------
@FAST
@given(page_size=st.sampled_from(PAGE_SIZES), entry_size=st.sampled_from([16, 64, 80, 1000]), extra=st.integers(-1, 1),
       blocks=st.integers(0, 3))
def test_block_set_round_trip(page_size, entry_size, extra, blocks):
    memory, allocator, tracker = machine(page_size, 32 << 20 if page_size == 4096 else 128 << 20)
    per = kho_block_count_per_block(page_size, entry_size)
    count = max(0, blocks * per + extra)
    entries = [bytes([i % 251]) * entry_size for i in range(count)]
    out = OutgoingBlockSet(memory, allocator, tracker, entry_size)
    out.grow(count)
    assert len(out.blocks) == -(-count // per)
    head = out.serialize(entries)
    got = both_modes(lambda *a, **k: read_block_set(memory, head, entry_size, **k))
    assert list(got.entries) == entries and got.head == head
    assert [c for _, c in got.blocks] == [min(per, count - i * per) for i in range(len(out.blocks))]
    out.shrink(0)
    assert out.blocks == [] and not tracker.units()


def test_block_header_layout():
    assert KHO_BLOCK_HEADER_DTYPE.names == ("next", "count")
    assert kho_block_count_per_block(4096, LUO_SESSION_SER_DTYPE.itemsize) == 51
    assert kho_block_count_per_block(4096, LUO_FILE_SER_DTYPE.itemsize) == 63
    assert kho_block_count_per_block(4096, 32) == 127  # the kernel's own example: 4 u64s


# -- kexec-metadata ---------------------------------------------------------------------------------
@FAST
@given(page_size=st.sampled_from(PAGE_SIZES), release=st.text(string.printable[:95], min_size=1, max_size=64),
       received=st.integers(0, 2**32 - 2))
def test_kexec_metadata_round_trip(page_size, release, received):
    memory, allocator, tracker = machine(page_size, 4 << 20)
    blob = write_kexec_metadata(memory, allocator, tracker, release, received)
    assert blob.size == 73 and tracker.units() == [(blob.phys, 0)]
    got = both_modes(lambda **k: read_kexec_metadata(memory, blob.phys, blob.size, **k))
    assert got.to_json() == {"version": 1, "previous_release": release, "kexec_count": received + 1}


def test_kexec_count_counts_chained_kexecs():
    count = 0
    for _ in range(3):
        memory, allocator, tracker = machine()
        blob = write_kexec_metadata(memory, allocator, tracker, "7.3.0", count)
        count = read_kexec_metadata(memory, blob.phys, blob.size).kexec_count
    assert count == 3


# -- memblock -------------------------------------------------------------------------------------------
@FAST
@given(page_size=st.sampled_from(PAGE_SIZES), names=st.lists(NAMES, min_size=0, max_size=6, unique=True),
       data=st.data())
def test_memblock_round_trip(page_size, names, data):
    memory, allocator, tracker = machine(page_size, 64 << 20 if page_size == 4096 else 512 << 20)
    regions = []
    for name in names:
        order = data.draw(st.integers(0, 4))
        pages = data.draw(st.integers(1, 1 << order))
        regions.append(ReservedRegion(name, allocator.alloc_pages(order), pages * page_size))
    blob = write_memblock(memory, allocator, tracker, regions)
    got = both_modes(lambda **k: read_memblock(memory, blob.phys, blob.size, **k))
    assert list(got.regions) == regions
    fdt = parse_fdt(memory.read(blob.phys, blob.size), strict=True)
    assert prop_bytes(fdt.root.get_property("compatible")) == b"memblock-v1\0"
    preserved = sum(page_size << o for p, o in tracker.units())
    assert preserved == page_size + sum(r.size for r in regions)


def test_memblock_writer_refuses_bad_regions():
    memory, allocator, tracker = machine()
    for regions in ([("a", 0x100000, 0)], [("a", 0x100800, 4096)], [("a" * 16, 0x100000, 4096)],
                    [("a", 0x100000, 4096), ("a", 0x200000, 4096)], [("bad name", 0x100000, 4096)]):
        with pytest.raises(KHOError) as err:
            write_memblock(memory, allocator, tracker, regions)
        assert err.value.errno_name == "EINVAL"
    assert not tracker.units()


# -- kho_test ----------------------------------------------------------------------------------------------
@FAST
@given(page_size=st.sampled_from(PAGE_SIZES), pages=st.integers(1, 64), seed=st.integers(0, 10**6),
       arch=st.sampled_from(["x86_64", "generic"]))
def test_kho_test_round_trip(page_size, pages, seed, arch):
    memory, allocator, tracker = machine(page_size, 64 << 20 if page_size == 4096 else 512 << 20)
    written = write_kho_test(memory, allocator, tracker, pages * page_size, seed=seed, arch=arch)
    got = both_modes(lambda **k: read_kho_test(memory, written.phys, written.size, **k))
    assert got == written
    assert sum(page_size << o for _, o in got.folios) == pages * page_size
    assert got.checksum(memory, arch) == got.csum
    units = set(tracker.units())
    assert set(got.folios) <= units and (got.phys, 1) in units  # nr_folios * 8 + PAGE_SIZE bytes: an order-1 folio
    blob = parse_fdt(memory.read(got.phys, got.size), strict=True)
    assert bytes(blob.get_node("data").get_property("csum").data) == got.csum.to_bytes(4, "little")


def test_kho_test_default_max_mem_is_two_max_order_blocks():
    memory, allocator, tracker = machine(4096, 64 << 20)
    written = write_kho_test(memory, allocator, tracker, seed=5)
    assert sum(4096 << o for _, o in written.folios) == 8 << 20
    assert max(o for _, o in written.folios) <= 10


def test_kho_test_data_is_checksummed():
    memory, allocator, tracker = machine()
    written = write_kho_test(memory, allocator, tracker, 64 << 10, seed=1)
    phys, _ = written.folios[0]
    memory.write(phys + 100, b"\x01")
    assert written.checksum(memory) != written.csum


# -- memfd ------------------------------------------------------------------------------------------------
@FAST
@given(page_size=st.sampled_from(PAGE_SIZES), contents=st.binary(max_size=3 * 4096), tail=st.integers(0, 2 * 65536),
       pos=st.integers(0, 2**40), seals=st.sampled_from([0, F_SEAL_SEAL, F_SEAL_SEAL | F_SEAL_GROW, 0x3F]),
       v1=st.booleans())
def test_memfd_round_trip(page_size, contents, tail, pos, seals, v1):
    memory, allocator, tracker = machine(page_size, 32 << 20 if page_size == 4096 else 128 << 20)
    compatible = MEMFD_LUO_FH_COMPATIBLE_V1 if v1 else MEMFD_LUO_FH_COMPATIBLE
    seals = 0 if v1 else seals
    size = len(contents) + tail
    phys = preserve_memfd(memory, allocator, tracker, contents, size=size, pos=pos, seals=seals, compatible=compatible)
    got = both_modes(lambda **k: read_memfd(memory, phys, compatible, **k))
    assert (got.size, got.pos, got.seals, got.flags, got.nr_folios) == (size, pos, seals, 0, -(-size // page_size))
    assert got.contents(memory) == contents + bytes(tail)
    assert sorted(f.index for f in got.folios) == list(range(got.nr_folios))
    assert {(f.phys, 0) for f in got.folios} <= set(tracker.units())


def test_memfd_writer_refuses_unknown_seals_and_rolls_back():
    memory, allocator, tracker = machine()
    for seals, compatible in ((0x40, MEMFD_LUO_FH_COMPATIBLE), (F_SEAL_SEAL, MEMFD_LUO_FH_COMPATIBLE_V1)):
        with pytest.raises(KHOError):
            preserve_memfd(memory, allocator, tracker, b"x", seals=seals, compatible=compatible)
    free = allocator.nr_free_pages
    small, small_alloc, small_tracker = machine(4096, 64 << 10)
    with pytest.raises(KHOError) as err:
        preserve_memfd(small, small_alloc, small_tracker, bytes(15 * 4096))
    assert err.value.errno_name == "ENOMEM" and not small_tracker.units()
    assert allocator.nr_free_pages == free and not tracker.units()


# -- LUO ------------------------------------------------------------------------------------------------------
@FAST
@given(page_size=st.sampled_from([4096, 16384]), sessions=st.lists(
    st.tuples(NAMES, st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=5000)), max_size=4, unique_by=lambda f: f[0])),
    max_size=4, unique_by=lambda s: s[0]), flbs=st.integers(0, 3), received=st.integers(0, 1000))
def test_luo_round_trip(page_size, sessions, flbs, received):
    memory, allocator, tracker = machine(page_size, 64 << 20 if page_size == 4096 else 256 << 20)
    luo = OutgoingLuo(memory, allocator, tracker, received)
    assert read_luo(memory, luo.phys, luo.blob.size).to_json()["sessions"] == []
    expected = []
    for name, files in sessions:
        luo.create_session(name)
        entries = []
        for token, contents in files:
            if token % 2:
                data = luo.preserve_memfd(name, token, contents)
                entries.append({"compatible": "memfd-v2", "token": token, "data": data,
                                "memfd": read_memfd(memory, data).to_json()})
            else:
                luo.preserve_file(name, token, "opaque-v1", token // 2)
                entries.append({"compatible": "opaque-v1", "token": token, "data": token // 2})
        expected.append({"name": name, "files": entries})
    for i in range(flbs):
        luo.set_flb(f"flb-v{i}", i, i)  # count 0 is not handed over
    sessions_pa = luo.serialize()
    got = both_modes(lambda **k: read_luo(memory, luo.phys, luo.blob.size, **k))
    assert got.to_json() == {"compatible": "luo-v5", "liveupdate_num": received + 1, "sessions_pa": sessions_pa,
                             "flbs_pa": luo.flbs_pa, "sessions": expected,
                             "flbs": [{"name": f"flb-v{i}", "data": i, "count": i} for i in range(1, flbs)]}
    assert (sessions_pa == 0) == (not sessions)
    assert {(r.phys, 0) for r in got.referenced_ranges(page_size) if r.size == page_size and r.what.endswith("block")} <= set(tracker.units())


def test_luo_blocks_span_pages_and_enforce_names_and_tokens():
    memory, allocator, tracker = machine()
    luo = OutgoingLuo(memory, allocator, tracker)
    for i in range(52):  # 51 sessions fill a block
        luo.create_session(f"s{i}")
    for token in range(64):  # 63 files fill a block
        luo.preserve_file("s0", token, "opaque-v1", token)
    with pytest.raises(KHOError) as err:
        luo.create_session("s1")
    assert err.value.errno_name == "EEXIST"
    with pytest.raises(KHOError) as err:
        luo.preserve_file("s0", 5, "opaque-v1", 0)
    assert err.value.errno_name == "EEXIST"
    with pytest.raises(KHOError) as err:
        luo.preserve_file("nope", 5, "opaque-v1", 0)
    assert err.value.errno_name == "ENOENT"
    for name in ("", "x" * 64, "caf\u00e9"):
        with pytest.raises(KHOError):
            luo.create_session(name)
    for i in range(luo_flb_max(4096)):
        luo.set_flb(f"f{i}", i, 1)
    with pytest.raises(KHOError):
        luo.set_flb("one-too-many", 0, 1)
    luo.serialize()
    got = read_luo(memory, luo.phys, 32)
    assert len(got.sessions) == 52 and len(got.session_blocks.blocks) == 2
    assert len(got.sessions[0].files) == 64 and len(got.sessions[0].file_blocks.blocks) == 2
    assert [f.token for f in got.sessions[0].files] == list(range(64)) and len(got.flbs) == luo_flb_max(4096)


# -- with the 7.x tracker -------------------------------------------------------------------------------------
def covered(units, phys, size, page_size):
    """True when every page of [phys, phys + size) lies in a preserved unit."""
    return all(any(p <= page < p + (page_size << o) for p, o in units)
               for page in range(phys - phys % page_size, phys + size, page_size))


def test_every_referenced_range_is_preserved_with_the_radix_tracker():
    """A 7.3-like set of sub-nodes written through the stateless radix tracker: every page any
    sub-node references is in the map, and an 8 MiB-aligned reserve_mem region is one order-11 unit."""
    radix_tracker = pytest.importorskip("kho.currentkernel.radix_tracker")
    memory, allocator, _ = machine(4096, 128 << 20)
    region = 96 << 20
    allocator.reserve(region, 8 << 20)
    tracker = radix_tracker.RadixTracker(memory, allocator)
    metadata = write_kexec_metadata(memory, allocator, tracker, "7.3.0", 0)
    memblock = write_memblock(memory, allocator, tracker, [("big", region, 8 << 20)])
    selftest = write_kho_test(memory, allocator, tracker, 1 << 20, seed=4)
    luo = OutgoingLuo(memory, allocator, tracker)
    luo.create_session("s")
    luo.preserve_memfd("s", 1, b"m" * 10000)
    luo.serialize()
    ranges = (read_kexec_metadata(memory, metadata.phys, metadata.size).referenced_ranges(4096)
              + read_memblock(memory, memblock.phys, memblock.size).referenced_ranges(4096)
              + read_kho_test(memory, selftest.phys, selftest.size).referenced_ranges(4096)
              + read_luo(memory, luo.phys, 32).referenced_ranges(4096))
    phys, order = tracker.units_array()
    units = list(zip(phys.tolist(), order.tolist()))
    assert (region, 11) in units
    assert {r.what for r in ranges} >= {"kexec-metadata", "memblock FDT", "kho_test folio", "memfd folio",
                                        "luo_file_ser block", "kho_vmalloc chunk"}
    for r in ranges:
        assert covered(units, r.phys, r.size, 4096), r
