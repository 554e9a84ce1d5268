"""kho.dumps on a real Linux 7.3 x86_64 handover: the reduced fixture cut from the shared
dump (always), as zstd, raw and ELF core, with a stale FDT added; and the full shared dump
(where ``../shared`` is)."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kho.abi.kexec_handover import KHO_FDT_MEMORY_MAP_PROP_NAME
from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.radix_tracker import RadixTracker
from kho.devicetree import KHOFdt
from kho.devicetree.layout import pack_u64
from kho.dumps import open_dump
from kho.encodings import get_encoding
from kho.dumps.cut import cut, referenced_pages
from kho.dumps.open import parse_ranges
from kho.dumps.writers import write_elf_core, write_raw
from kho.memory.physical import PhysicalMemory

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "linux-7.3-x86_64"
FIXTURE = FIXTURES / "mem-stage1-handover.raw.zst"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "realkernel" / "linux-7.3-x86_64"
FDT_PHYS = 0x344000
#: What the shared README states about the dump's map.
ORDER_COUNTS = {0: 83, 1: 9, 2: 12, 3: 6, 4: 1, 5: 6, 6: 5, 7: 5, 8: 8, 9: 2, 10: 4}


def kernel_units() -> list[tuple[int, int]]:
    """The units the kernel's map holds (``units-0x344000.txt``), by address."""
    lines = (FIXTURES / "units-0x344000.txt").read_text().split("\n")
    return sorted((int(phys, 16), int(order)) for phys, order in (line.split() for line in lines if line.strip()))


def check_real_handover(found) -> None:
    """The facts the shared README states, as decoded from any form of the dump."""
    assert (found.fdt_phys, found.fdt_size, found.compatible) == (FDT_PHYS, 405, "kho-v4")
    assert found.units() == kernel_units()
    assert dict(Counter(found.decoded.order.tolist())) == ORDER_COUNTS
    assert found.decoded.metadata_pages.size == 50 and found.fdt.memory_map() == 0x343000
    nodes = {n.name: n for n in found.subnodes}
    assert list(nodes) == ["memblock", "LUO", "kho_test", "kexec-metadata"]  # newest first
    assert all(n.error is None and n.decoded is not None for n in nodes.values())
    assert nodes["memblock"].decoded.to_json()["regions"] == [{"name": "realk_small", "start": 0x1d6f9000,
                                                               "size": 1052 << 10}]
    luo = nodes["LUO"].decoded
    assert (luo.compatible, luo.liveupdate_num, luo.sessions_pa) == ("luo-v5", 1, 0)  # sessions come at reboot
    meta = nodes["kexec-metadata"].decoded
    assert (meta.version, meta.previous_release, meta.kexec_count) == (1, "7.3.0-rc7", 1)
    test = nodes["kho_test"].decoded
    assert test.nr_folios == len(test.folios) == 60
    assert [b.phys for b in found.boot_params] == [0x10000, 0x1d8f8000]
    assert all(b.handoff is None and b.error is None for b in found.boot_params)  # a first kernel: no SETUP_KEXEC_KHO
    assert found.handoff is None and found.scratch == []


def subnode_json(found) -> dict:
    return {n.name: n.decoded.to_json() for n in found.subnodes}


@pytest.fixture(scope="module")
def fixture_dump():
    with open_dump(FIXTURE) as dump:
        yield dump


def test_the_fixture_holds_the_real_handover(fixture_dump):
    assert fixture_dump.format == "zstd" and fixture_dump.memory.ram_size == 512 << 20
    check_real_handover(fixture_dump.handover())
    kinds = {c.phys: (c.kind, c.compatible) for c in fixture_dump.handover().candidates}
    assert kinds == {0x2fc000: ("other", ["kho-test-v1"]), FDT_PHYS: ("kho", ["kho-v4"]),
                     0x2de1000: ("other", ["memblock-v1"])}


def test_the_fixture_is_the_referenced_pages_only(fixture_dump):
    pages = referenced_pages(fixture_dump.handover(), 4096)
    assert pages.size == 60 and FDT_PHYS in pages.tolist()
    with_contents = referenced_pages(fixture_dump.handover(), 4096, contents=True)
    assert with_contents.size > 60 + 32 * 256  # the self-test's 32 MiB and the reserve_mem region
    assert FIXTURE.stat().st_size < 2 << 20


@pytest.mark.parametrize("form", ["raw", "elf"])
def test_raw_and_elf_forms_decode_the_same(fixture_dump, tmp_path, form):
    reduced = cut(fixture_dump.memory, referenced_pages(fixture_dump.handover(), 4096))
    path = tmp_path / f"fixture.{form}"
    (write_raw if form == "raw" else write_elf_core)(reduced, path)
    with open_dump(path) as dump:
        assert dump.format == form
        found = dump.handover()
        check_real_handover(found)
        assert subnode_json(found) == subnode_json(fixture_dump.handover())


def test_stage2_like_dump_with_a_stale_fdt(fixture_dump, tmp_path):
    """A later kernel's dump: the real FDT, plus a stale KHO FDT whose map page was reused."""
    memory = cut(fixture_dump.memory, referenced_pages(fixture_dump.handover(), 4096))
    stale_fdt, stale_map = 0x400000, 0x401000
    fdt = fixture_dump.handover().fdt
    copy = KHOFdt("kho-v4", {KHO_FDT_MEMORY_MAP_PROP_NAME: pack_u64(stale_map)})
    for name, phys in fdt.subtrees().items():
        copy.add_subtree(name, phys, fdt.subtree_size(name))
    memory.write(stale_fdt, copy.to_dtb())
    memory.write(stale_map, np.full(512, 0x5A5A5A5A5A5A5000, np.uint64).tobytes())
    write_raw(memory, tmp_path / "stage2.raw")
    with open_dump(tmp_path / "stage2.raw") as dump:
        found = dump.handover()
        check_real_handover(found)
        stale = next(c for c in found.candidates if c.phys == stale_fdt)
        assert stale.kind == "kho" and not stale.decodes


@pytest.mark.skipif(not (SHARED / "mem-stage1.raw.zst").is_file(), reason="needs ../shared/realkernel")
def test_the_full_shared_dump():
    with open_dump(SHARED / "mem-stage1.raw.zst") as dump:
        found = dump.handover()
        check_real_handover(found)
        test = next(n.decoded for n in found.subnodes if n.name == "kho_test")
        assert test.checksum(dump.memory) == test.csum  # the self-test's folios, whole
        folios = (SHARED / "test_kho-folios.txt").read_text().split()
        assert list(test.folios) == [(int(folios[i], 16), int(folios[i + 1])) for i in range(0, len(folios), 2)]
        with open_dump(FIXTURE) as fixture:  # the fixture keeps every page the handover references
            assert np.array_equal(referenced_pages(found, 4096), referenced_pages(fixture.handover(), 4096))


def test_the_guests_ram_ranges():
    """RAM as the guest's e820 map gave it (/proc/iomem style, END inclusive)."""
    ram = parse_ranges("0x1000-0x9fbff, 0x100000-0x1ffdffff")
    with open_dump(FIXTURE, ram=ram) as dump:
        assert [(b.start, b.end) for b in dump.memory.banks] == [(0x1000, 0x9f000), (0x100000, 0x1ffe0000)]
        check_real_handover(dump.handover())


def test_json_of_the_real_handover(fixture_dump):
    found = json.loads(json.dumps({"source": fixture_dump.source_json(), **fixture_dump.handover().to_json()}))
    assert found["source"]["format"] == "zstd" and (found["fdt_phys"], found["compatible"]) == (FDT_PHYS, "kho-v4")
    assert found["units_by_order"] == {str(k): v for k, v in ORDER_COUNTS.items()} and found["map_pages"] == 50
    assert [(s["name"], s["format"], s["size"]) for s in found["subtrees"]] == [
        ("memblock", "fdt", 214), ("LUO", "binary", 32), ("kho_test", "fdt", 240), ("kexec-metadata", "binary", 73)]
    assert found["subtrees"][3]["decoded"] == {"version": 1, "previous_release": "7.3.0-rc7", "kexec_count": 1}
    assert [c["kind"] for c in found["candidates"]] == ["other", "kho", "other"] and found["handoff"] is None


def test_kho_writes_the_real_kernels_radix_pages(fixture_dump):
    """kho's 7.x tracker, given the real kernel's 141 units, builds the same 50 radix pages: the
    leaves byte for byte, and every table byte for byte once each child pointer is read as the
    node it points at (which pages hold the nodes is the allocator's choice, not the ABI's)."""
    ps = 4096
    memory = PhysicalMemory.single_bank(512 << 20)
    tracker = RadixTracker(memory, PageAllocator(memory, [(0, 64 << 20)]), strict=False)
    for phys, order in kernel_units():
        tracker.preserve_folio(phys, order)
    g = tracker.geometry
    real = {(g.root_level, 0): 0x343000}  # (level, prefix) -> phys in the real dump
    for level in range(g.root_level, 0, -1):
        for (lvl, prefix), phys in list(real.items()):
            if lvl != level:
                continue
            table = np.frombuffer(fixture_dump.memory.read(phys, ps), "<u8")
            for slot in np.flatnonzero(table).tolist():
                real[(level - 1, (prefix << g.table_log2) | slot)] = int(table[slot])
    ours = {(level, prefix): phys for level, nodes in enumerate(tracker._nodes) for prefix, phys in nodes.items()}
    assert set(ours) == set(real) and len(ours) == 50
    to_real = {ours[key]: real[key] for key in ours}
    for key, phys in ours.items():
        page = np.frombuffer(memory.read(phys, ps), "<u8").copy()
        if key[0] > 0:  # a table: read each child pointer as the node it names
            used = np.flatnonzero(page)
            page[used] = [to_real[int(child)] for child in page[used].tolist()]
        assert page.tobytes() == fixture_dump.memory.read(real[key], ps), key


def test_strict_decode_of_the_real_map(fixture_dump):
    """The real 7.3 kernel's map decodes in strict mode to exactly its listed units (an
    order above MAX_PAGE_ORDER or any unit check kho adds would refuse it otherwise)."""
    memory = fixture_dump.memory
    fdt = KHOFdt.from_dtb(memory.read(FDT_PHYS, 4096), strict=True)
    decoded = get_encoding(fdt.compatible, 4096).decode(memory, fdt.props, strict=True)
    assert fdt.compatible == "kho-v4" and decoded.units() == kernel_units()
