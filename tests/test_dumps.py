"""kho.dumps: raw, zstd and ELF-core dumps of a handover kho wrote, found and decoded; the
x86 and arm64 handoffs; a second kernel's dump with a stale FDT; sparse dumps."""

import fdt as fdtlib
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from kho.abi.kexec_handover import KHO_FDT_MEMORY_MAP_PROP_NAME
from kho.abi.setup_data import (
    BOOT_FLAG,
    BOOT_PARAMS_DTYPE,
    KHO_DATA_DTYPE,
    SETUP_DATA_DTYPE,
    SETUP_HEADER_MAGIC,
    SETUP_KEXEC_KHO,
    SETUP_RNG_SEED,
)
from kho.currentkernel.machine import Machine
from kho.devicetree import KHOFdt
from kho.devicetree.flat import new_tree, to_dtb
from kho.devicetree.layout import pack_u64
from kho.dumps import open_dump
from kho.dumps.writers import write_elf_core, write_raw, write_zstd
from kho.encodings import get_encoding
from kho.errors import KHOError, KHOFormatError
from kho.handover.imagefile import save_image
from kho.handover.outgoing import KHO
from kho.memory.physical import Bank

MiB = 1 << 20
GiB = 1 << 30


def write_boot_params(memory, phys: int, setup_data_phys: int, fdt: tuple[int, int], scratch: tuple[int, int]) -> None:
    """An x86 ``boot_params`` at ``phys`` whose ``setup_data`` chain is an RNG seed node then a
    ``SETUP_KEXEC_KHO`` node (both in the page at ``setup_data_phys``), as kexec leaves them."""
    params = np.zeros(1, BOOT_PARAMS_DTYPE)
    params["hdr"]["boot_flag"] = BOOT_FLAG
    params["hdr"]["header"] = SETUP_HEADER_MAGIC
    params["hdr"]["setup_data"] = setup_data_phys
    memory.write(phys, params.tobytes())
    rng, kho, data = np.zeros(1, SETUP_DATA_DTYPE), np.zeros(1, SETUP_DATA_DTYPE), np.zeros(1, KHO_DATA_DTYPE)
    rng[0] = (setup_data_phys + SETUP_DATA_DTYPE.itemsize + 32, SETUP_RNG_SEED, 32)
    kho[0] = (0, SETUP_KEXEC_KHO, KHO_DATA_DTYPE.itemsize)
    data[0] = (*fdt, *scratch)
    memory.write(setup_data_phys, rng.tobytes() + bytes(32) + kho.tobytes() + data.tobytes())


def sub_fdt(compatible: str) -> bytes:
    tree = new_tree()
    tree.root.append(fdtlib.PropStrings("compatible", compatible))
    return to_dtb(tree)


def build(ram=512 * MiB, banks=None, seed=1):
    """A finalized handover: folios of three orders, a text blob and an FDT blob."""
    m = Machine.boot(ram, seed=seed, banks=banks)
    kho = KHO(m.memory, m.allocator, "kho-v2")
    for order, count in ((0, 40), (3, 10), (9, 2)):
        kho.tracker.preserve_many(m.allocator.alloc_many(count, order), order)
    kho.add_blob("workload", b"luo-v5\0" + bytes(25))
    kho.add_blob("memblock", sub_fdt("memblock-v1"))
    handover = kho.finalize()
    fdt = KHOFdt.from_dtb(m.memory.read(handover.fdt_phys, handover.fdt_size))
    reference = get_encoding("kho-v2").decode(m.memory, fdt.props)
    return m, handover, reference


def spans(areas):
    return sorted((a.addr, a.size) for a in areas)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    m, handover, reference = build()
    d = tmp_path_factory.mktemp("dumps")
    write_raw(m.memory, d / "mem.raw")
    write_zstd(m.memory, d / "mem.raw.zst", level=3)
    write_elf_core(m.memory, d / "mem.elf")
    return m, handover, reference, d


@pytest.mark.parametrize("name, fmt", [("mem.raw", "raw"), ("mem.raw.zst", "zstd"), ("mem.elf", "elf")])
def test_each_format_decodes_to_the_same_units(written, name, fmt):
    m, handover, reference, d = written
    with open_dump(d / name) as dump:
        assert dump.format == fmt
        assert [(b.start, b.size) for b in dump.memory.banks] == [(0, 512 * MiB)]
        found = dump.handover()
        assert found.fdt_phys == handover.fdt_phys and found.compatible == "kho-v2"
        assert found.units() == reference.units()
        assert np.array_equal(found.decoded.metadata_pages, reference.metadata_pages)
        nodes = {n.name: n for n in found.subnodes}
        assert list(nodes) == ["memblock", "workload"]  # newest first, as the kernel adds them
        assert (nodes["workload"].phys, nodes["workload"].size) == (handover.subtrees["workload"], 32)
        assert (nodes["workload"].format, nodes["workload"].compatible) == ("binary", "luo-v5")
        assert nodes["workload"].decoded.to_json()["compatible"] == "luo-v5"  # read by its compatible
        assert (nodes["memblock"].format, nodes["memblock"].compatible) == ("fdt", "memblock-v1")
        assert nodes["memblock"].data == sub_fdt("memblock-v1")
        assert found.scratch == [] and found.handoff is None  # nothing in memory names the FDT
        assert [c.kind for c in found.candidates].count("kho") == 1
        assert {c.compatible[0] for c in found.candidates if c.kind == "other"} == {"memblock-v1"}


def test_strict_decoding_and_the_same_handover_twice(written):
    _, handover, reference, d = written
    with open_dump(d / "mem.raw") as dump:
        assert dump.handover(strict=True).units() == reference.units()
        assert dump.handover() is dump.handover()


def test_zstd_with_several_frames(written, tmp_path):
    _, _, reference, d = written
    raw = (d / "mem.raw").read_bytes()
    step = len(raw) // 5
    cctx = zstandard.ZstdCompressor(level=1)
    (tmp_path / "frames.zst").write_bytes(b"".join(cctx.compress(raw[i:i + step]) for i in range(0, len(raw), step)))
    with open_dump(tmp_path / "frames.zst") as dump:
        assert dump.memory.ram_size == 512 * MiB
        assert dump.handover().units() == reference.units()


def test_raw_dump_at_a_base_and_given_ram(tmp_path):
    m, handover, reference = build(banks=[Bank(GiB, 256 * MiB), Bank(2 * GiB, 256 * MiB)])
    write_raw(m.memory, tmp_path / "high.raw", base=GiB)
    with open_dump(tmp_path / "high.raw", base=GiB, ram=[(GiB, 256 * MiB), (2 * GiB, 256 * MiB)]) as dump:
        assert [(b.start, b.size) for b in dump.memory.banks] == [(GiB, 256 * MiB), (2 * GiB, 256 * MiB)]
        assert dump.handover().units() == reference.units()
    with pytest.raises(KHOError, match="not inside the dump") as err:
        open_dump(tmp_path / "high.raw", base=GiB, ram=[(0, 256 * MiB)])
    assert err.value.errno_name == "EINVAL"
    write_elf_core(m.memory, tmp_path / "high.elf")
    with open_dump(tmp_path / "high.elf") as dump:
        assert [(b.start, b.size) for b in dump.memory.banks] == [(GiB, 256 * MiB), (2 * GiB, 256 * MiB)]
        assert dump.handover().units() == reference.units()


def test_elf_core_with_a_note_and_overlapping_segments(written, tmp_path):
    m, _, reference, _ = written
    # a vmcore maps the kernel text twice: a second PT_LOAD inside the first
    write_elf_core(m.memory, tmp_path / "vmcore", segments=[(0, 512 * MiB), (16 * MiB, 32 * MiB)], note=b"CORE" * 8)
    with open_dump(tmp_path / "vmcore") as dump:
        assert [(b.start, b.size) for b in dump.memory.banks] == [(0, 512 * MiB)]
        assert dump.handover().units() == reference.units()


def test_x86_handoff_gives_the_scratch_areas(tmp_path):
    m, handover, reference = build()
    params, chain = m.allocator.alloc_pages(0), m.allocator.alloc_pages(0)
    write_boot_params(m.memory, params, chain, (handover.fdt_phys, handover.fdt_size),
                      (handover.scratch_phys, handover.scratch_size))
    write_raw(m.memory, tmp_path / "x86.raw")
    with open_dump(tmp_path / "x86.raw") as dump:
        found = dump.handover()
        assert spans(found.scratch) == spans(m.memory.scratch)
        assert found.handoff.fdt_addr == handover.fdt_phys and "setup_data" in found.handoff.source
        (bp,) = found.boot_params  # its chain: an RNG seed node, then the KHO node
        assert bp.phys == params and bp.error is None and bp.handoff == found.handoff
        assert spans(dump.memory.scratch) == spans(m.memory.scratch)
        assert dump.handover(strict=True).units() == reference.units()


def test_arm64_handoff_from_the_boot_dtb(tmp_path):
    m, handover, reference = build()
    dtb = handover.boot_dtb()
    phys = m.allocator.alloc_pages(1)
    m.memory.write(phys, dtb)
    write_raw(m.memory, tmp_path / "arm64.raw")
    with open_dump(tmp_path / "arm64.raw") as dump:
        found = dump.handover()
        assert found.handoff.source == f"/chosen of the DTB at {phys:#x}"
        assert spans(found.scratch) == spans(m.memory.scratch)
        assert "boot-dtb" in [c.kind for c in found.candidates]


def stale_copy(m, handover, garbage: bool) -> int:
    """Write a copy of the KHO FDT elsewhere, its map pointer at a page of garbage (a map whose
    pages were reused) or at the real map (a second FDT that decodes too); returns its phys."""
    fdt = KHOFdt.from_dtb(m.memory.read(handover.fdt_phys, handover.fdt_size))
    root = fdt.memory_map()
    if garbage:
        root = m.allocator.alloc_pages(0)
        m.memory.write(root, b"\xa5" * 4096)
    copy = KHOFdt("kho-v2", {KHO_FDT_MEMORY_MAP_PROP_NAME: pack_u64(root)})
    for name, phys in fdt.subtrees().items():
        copy.add_subtree(name, phys, fdt.subtree_size(name))
    phys = m.allocator.alloc_pages(0)
    m.memory.write(phys, copy.to_dtb())
    return phys


def test_second_kernel_dump_with_a_stale_fdt(tmp_path):
    m, handover, reference = build()
    stale = stale_copy(m, handover, garbage=True)
    # the second kernel's boot_params still name the FDT it received: the stale one
    params, chain = m.allocator.alloc_pages(0), m.allocator.alloc_pages(0)
    write_boot_params(m.memory, params, chain, (stale, 4096), (handover.scratch_phys, handover.scratch_size))
    write_raw(m.memory, tmp_path / "stage2.raw")
    with open_dump(tmp_path / "stage2.raw") as dump:
        found = dump.handover()
        assert found.fdt_phys == handover.fdt_phys and found.units() == reference.units()
        kho = {c.phys: c for c in found.candidates if c.kind == "kho"}
        assert set(kho) == {handover.fdt_phys, stale}
        assert not kho[stale].decodes and "radix" in kho[stale].error
        assert any("only KHO FDT whose map decodes" in n for n in found.notes)
        assert any(f"other KHO FDT {stale:#x}" in n for n in found.notes)
        with pytest.raises(KHOFormatError, match="does not decode"):
            dump.handover(fdt=stale)
        with pytest.raises(KHOFormatError, match="no KHO FDT at the requested address"):
            dump.handover(fdt=params)


def test_two_fdts_that_decode(tmp_path):
    m, handover, reference = build()
    twin = stale_copy(m, handover, garbage=False)
    write_raw(m.memory, tmp_path / "two.raw")
    with open_dump(tmp_path / "two.raw") as dump:
        with pytest.raises(KHOError, match="2 KHO FDTs decode, choose one with fdt=ADDR") as err:
            dump.handover()
        assert err.value.errno_name == "EINVAL"
        assert dump.handover(fdt=twin).units() == reference.units()
        assert dump.handover(fdt=handover.fdt_phys).fdt_phys == handover.fdt_phys
    params, chain = m.allocator.alloc_pages(0), m.allocator.alloc_pages(0)
    write_boot_params(m.memory, params, chain, (twin, 4096), (handover.scratch_phys, handover.scratch_size))
    write_raw(m.memory, tmp_path / "named.raw")
    with open_dump(tmp_path / "named.raw") as dump:
        assert dump.handover().fdt_phys == twin  # the handoff decides


def test_sparse_dump_of_a_large_machine(tmp_path):
    m, handover, reference = build(ram=16 * GiB)
    write_raw(m.memory, tmp_path / "big.raw")
    with open_dump(tmp_path / "big.raw") as dump:
        assert dump.memory.ram_size == 16 * GiB
        assert dump.handover().units() == reference.units()
        assert dump.scan().scanned_bytes < 64 * MiB  # holes are skipped


def test_a_dump_is_read_only(written):
    _, _, _, d = written
    with open_dump(d / "mem.raw") as dump:
        for call in (lambda: dump.memory.write(0, b"x"), lambda: dump.memory.discard(0, 4096),
                     lambda: dump.memory.fill_pattern(0, 4096, 1)):
            with pytest.raises(KHOError, match="read-only"):
                call()
        with pytest.raises(KHOError, match="outside RAM"):
            dump.memory.read(512 * MiB - 8, 16)


@pytest.mark.parametrize("options, encoding", [({}, "kho-v1 (page-byte bitmaps)"),
                                               ({"bitmap_bytes": 512}, "kho-v1 (512-byte bitmaps)")])
def test_kho_v1_dumps_with_either_bitmap_size(tmp_path, options, encoding):
    m = Machine.boot(512 * MiB, seed=2)
    kho = KHO(m.memory, m.allocator, "kho-v1", preserve_bits=4096 if options else "page", **options)
    for order, count in ((0, 300), (4, 20)):
        kho.tracker.preserve_many(m.allocator.alloc_many(count, order), order)
    kho.add_blob("workload", b"v1")
    handover = kho.finalize()
    write_raw(m.memory, tmp_path / "v1.raw")
    with open_dump(tmp_path / "v1.raw") as dump:
        found = dump.handover()
        assert (found.compatible, found.encoding) == ("kho-v1", encoding)
        assert found.units() == kho.tracker.units() and found.fdt_phys == handover.fdt_phys


@pytest.mark.parametrize("encoding", ["kho-v2", "ranges"])
def test_a_kho_image_opens_like_a_dump(tmp_path, encoding):
    m = Machine.boot(512 * MiB, seed=4)
    kho = KHO(m.memory, m.allocator, encoding)
    kho.tracker.preserve_many(m.allocator.alloc_many(50, 1), 1)
    kho.add_blob("workload", b"luo-v5\0")
    handover = kho.finalize()
    save_image(tmp_path / "h.kho", handover)
    with open_dump(tmp_path / "h.kho") as dump:
        assert dump.format == "kho" and f"kho handover image, {encoding}" in dump.description
        found = dump.handover()
        assert found.units() == kho.tracker.units() and found.fdt_phys == handover.fdt_phys
        assert spans(found.scratch) == spans(m.memory.scratch) and found.handoff.source.startswith("the image")
    with pytest.raises(KHOError, match="records its own RAM"):
        open_dump(tmp_path / "h.kho", base=0)


def test_scan_of_a_segment_ending_inside_a_page(tmp_path):
    """An ELF segment whose file bytes end mid-page: its last whole page is scanned, the
    partial one read as zeros past the file (never mapped beyond its end)."""
    m = Machine.boot(512 * MiB, seed=6)
    phys = 64 * MiB
    m.memory.write(phys, sub_fdt("memblock-v1"))
    write_elf_core(m.memory, tmp_path / "core", segments=[(0, phys + 100)])
    with open_dump(tmp_path / "core") as dump:
        assert dump.scan().fdt.tolist() == []  # the page at phys holds 100 bytes in the file: not whole
        assert dump.memory.ram_size == phys
    write_elf_core(m.memory, tmp_path / "core2", segments=[(0, phys + 4096 + 100)])
    with open_dump(tmp_path / "core2") as dump:
        assert dump.scan().fdt.tolist() == [phys]


def test_elf_segments_without_a_physical_address_are_skipped(written, tmp_path):
    """/proc/kcore style: segments of the vmalloc area or kernel text have p_paddr = -1."""
    m, _, reference, _ = written
    write_elf_core(m.memory, tmp_path / "kcore", segments=[((1 << 64) - 4096, 4096), (0, 512 * MiB)])
    with open_dump(tmp_path / "kcore") as dump:
        assert "(1 without a physical address skipped)" in dump.description
        assert dump.handover().units() == reference.units()
    write_elf_core(m.memory, tmp_path / "virtual", segments=[((1 << 64) - 4096, 4096)])
    with pytest.raises(KHOFormatError, match="1 beyond the physical address space"):
        open_dump(tmp_path / "virtual")


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), orders=st.lists(st.integers(0, 6), min_size=1, max_size=30),
       form=st.sampled_from(["raw", "zstd", "elf"]), base_mib=st.sampled_from([0, 256]))
def test_any_handover_reads_back_from_any_form(tmp_path_factory, seed, orders, form, base_mib):
    """Random folios on a machine with RAM at 0 or above 256 MiB, in each dump form: the
    same units and sub-nodes come back."""
    base = base_mib * MiB
    m = Machine.boot(0, seed=seed, banks=[Bank(base, 128 * MiB)], kho_scratch="8M,8M,8M")
    kho = KHO(m.memory, m.allocator, "kho-v2")
    for order in orders:
        kho.tracker.preserve_folio(m.allocator.alloc_pages(order), order)
    kho.add_blob("blob", bytes(range(256)) * (seed % 7 + 1))
    handover = kho.finalize()
    path = tmp_path_factory.mktemp("any") / f"dump.{form}"
    if form == "elf":
        write_elf_core(m.memory, path)
    else:
        (write_raw if form == "raw" else write_zstd)(m.memory, path, base=base)
    with open_dump(path, base=None if form == "elf" else base) as dump:
        found = dump.handover()
        assert found.units() == kho.tracker.units() and found.fdt_phys == handover.fdt_phys
        assert [(n.name, n.phys, n.data) for n in found.subnodes] == [
            ("blob", handover.subtrees["blob"], bytes(range(256)) * (seed % 7 + 1))]
