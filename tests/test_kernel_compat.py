"""The kernel-compatible mode reads what real kernels write and kho's strict mode refuses.

Each scenario is something a Linux kernel can hand over (spec/hardening.md cites the
behaviour): double preservation, ranges preserved without the MAX_PAGE_ORDER cap, pages
preserved inside CMA scratch, a zero kho-v1 map pointer, sub-tree names libfdt writes but
the Devicetree Specification forbids, a boot DTB relying on the kernel's default cell
counts.  The strict decode refuses each with KHOFormatError; ``strict=False`` returns
what the kernel would reserve.  Then the command line: ``kho units/dump --lenient``.
"""

import json
import struct

import libfdt
import numpy as np
import pytest
from fuzz.samples import ARENA, PS, ArenaAllocator, handover_allocator, machine, tracker

from kho.cli.main import main
from kho.currentkernel.tracker import Tracker
from kho.devicetree import KHOFdt, parse_chosen
from kho.encodings import get_encoding
from kho.errors import KHOFormatError
from kho.handover.imagefile import save_image
from kho.handover.outgoing import KHO
from kho.memory.physical import PhysicalMemory, ScratchArea

MiB = 1 << 20
MAP = "preserved-memory-map"


def u64(value):
    return struct.pack("<Q", value)


def both(encoding, memory, props, **options):
    """(strict error, lenient result)."""
    enc = get_encoding(encoding, PS, **options)
    with pytest.raises(KHOFormatError) as err:
        enc.decode(memory, props)
    return err.value, enc.decode(memory, props, strict=False)


@pytest.mark.parametrize("encoding, options", [("kho-v1", {}), ("kho-v1", {"bitmap_bytes": 512}), ("kho-v2", {})])
def test_double_preservation(encoding, options):
    """The kernel's tracker sets a bit per (order, pfn) and never checks overlaps: a folio and
    a page inside it both end up in the map, and the next kernel reserves both."""
    memory = machine()
    t = Tracker(memory, 4096 if options else "page", strict=False)
    t.preserve_folio(34 * MiB, 3)
    t.preserve_folio(34 * MiB + 2 * PS, 0)
    t.preserve_folio(12 * MiB, 0)
    t.finalize()
    encoded = get_encoding(encoding, PS, **options).encode(t, ArenaAllocator(memory))
    err, decoded = both(encoding, memory, encoded.props, **options)
    assert err.field == "unit" and "overlaps" in str(err)
    assert decoded.units() == [(12 * MiB, 0), (34 * MiB, 3), (34 * MiB + 2 * PS, 0)]


def test_uncapped_orders_from_preserve_phys():
    """Linux 6.16's kho_preserve_phys splits a range greedily without capping at
    MAX_PAGE_ORDER: a 1 GiB-aligned GiB becomes one order-18 unit, which the next kernel
    reserves (only restoring it fails)."""
    memory = PhysicalMemory.single_bank(4 << 30)
    chunk, bits = 64 * MiB, 65 * MiB
    memory.write(chunk, struct.pack("<QII", 0, 18, 1) + struct.pack("<QQ", 0, bits))
    memory.write(bits, bytes([0b10]))  # unit 1 of order 18: 1 GiB
    err, decoded = both("kho-v1", memory, {MAP: u64(chunk)})
    assert err.field == "chunk.order"
    assert decoded.units() == [(1 << 30, 18)]


def test_v2_order_above_max_page_order():
    memory = PhysicalMemory.single_bank(4 << 30)
    g = get_encoding("kho-v2", PS).geometry
    key = g.encode_key(1 << 30, 18)
    pages = [64 * MiB + i * PS for i in range(6)]
    for level, (node, child) in zip(range(g.root_level, 0, -1), zip(pages, pages[1:])):
        memory.write(node + 8 * g.table_index(key, level), u64(child))
    bit = g.bitmap_index(key)
    memory.write(pages[-1] + bit // 8, bytes([1 << (bit % 8)]))
    # Linux 7.x writes such units (kho_preserve_pages does not cap its split): both modes keep it.
    for strict in (True, False):
        assert get_encoding("kho-v2", PS).decode(memory, {MAP: u64(pages[0])}, strict=strict).units() == [(1 << 30, 18)]


@pytest.mark.parametrize("encoding", ["kho-v1", "kho-v2"])
def test_units_in_scratch(encoding):
    """6.16 does not refuse preserving a (movable, CMA) page inside scratch."""
    memory = PhysicalMemory(machine().banks, PS)  # no scratch yet: the tracker would refuse
    t = tracker(memory, "folio")
    t_units = t.units()
    encoded = get_encoding(encoding, PS).encode(t, ArenaAllocator(memory))
    memory.set_scratch([ScratchArea(32 * MiB, 4 * MiB, "global")])  # the next kernel's view
    err, decoded = both(encoding, memory, encoded.props)
    assert err.field == "unit" and "scratch" in str(err)
    assert decoded.units() == t_units


def test_zero_map_pointer_on_6_16():
    """The 6.16 reader treats a zero kho-v1 map pointer as an empty list."""
    err, decoded = both("kho-v1", machine(), {MAP: u64(0)})
    assert err.field == f"fdt.{MAP}" and len(decoded) == 0
    tree = libfdt.FdtSw()
    tree.finish_reservemap()
    with tree.add_node(""):
        tree.property_string("compatible", "kho-v1")
        tree.property(MAP, u64(0))
    blob = bytes(tree.as_fdt().as_bytearray())
    with pytest.raises(KHOFormatError):
        KHOFdt.from_dtb(blob)
    assert KHOFdt.from_dtb(blob, strict=False).memory_map() == 0


def kernel_style_fdt(subtree_name: str) -> bytes:
    """A KHO FDT written the way kho_finalize does: libfdt sequential write, compatible,
    the map pointer placeholder, then one sub-node per kho_add_subtree call."""
    tree = libfdt.FdtSw()
    tree.finish_reservemap()
    with tree.add_node(""):
        tree.property_string("compatible", "kho-v1")
        tree.property(MAP, u64(ARENA))
        with tree.add_node(subtree_name):
            tree.property("fdt", u64(12 * MiB))
    return bytes(tree.as_fdt().as_bytearray())


def test_sub_tree_names_the_kernel_accepts():
    """kho_add_subtree passes any string to fdt_begin_node; the specification's node-name
    rules are kho's strict reading only."""
    blob = kernel_style_fdt("LUO state#1")
    assert KHOFdt.from_dtb(kernel_style_fdt("memblock")).retrieve_subtree("memblock") == 12 * MiB
    with pytest.raises(KHOFormatError) as err:
        KHOFdt.from_dtb(blob)
    assert err.value.field == "fdt.node.name"
    assert KHOFdt.from_dtb(blob, strict=False).retrieve_subtree("LUO state#1") == 12 * MiB


def test_chosen_without_cell_counts():
    """drivers/of/fdt.c assumes 1-cell addresses and sizes when the root does not say."""
    tree = libfdt.FdtSw()
    tree.finish_reservemap()
    with tree.add_node(""):
        with tree.add_node("chosen"):
            tree.property("linux,kho-fdt", struct.pack(">II", 0x200000, PS))
            tree.property("linux,kho-scratch", struct.pack(">II", 0x201000, 32))
    blob = bytes(tree.as_fdt().as_bytearray())
    with pytest.raises(KHOFormatError):
        parse_chosen(blob)
    chosen = parse_chosen(blob, strict=False)
    assert (chosen.fdt_phys, chosen.fdt_size, chosen.scratch_phys, chosen.scratch_size) == (0x200000, PS, 0x201000, 32)


# -- the command line ------------------------------------------------------------------------------

@pytest.fixture
def overlapping_image(tmp_path):
    """A handover image whose kho-v2 map holds a folio and a page inside it."""
    memory = machine()
    base = tracker(machine(), "folio")
    kho = KHO(memory, handover_allocator(memory, base), "kho-v2", strict=False)
    kho.tracker.preserve_folio(34 * MiB, 3)
    kho.tracker.preserve_folio(34 * MiB + PS, 0)
    path = tmp_path / "overlap.kho"
    save_image(path, kho.finalize())
    return str(path)


def test_cli_units_lenient(overlapping_image, capsys):
    assert main(["units", overlapping_image]) == 3
    err = capsys.readouterr().err
    assert err.startswith("kho: EINVAL: unit") and err.count("\n") == 1
    assert main(["units", "--lenient", overlapping_image]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{34 * MiB:#x} 3", f"{34 * MiB + PS:#x} 0"]


def test_cli_dump_lenient(overlapping_image, capsys):
    assert main(["dump", "--json", overlapping_image]) == 3
    capsys.readouterr()
    assert main(["dump", "--json", "--lenient", overlapping_image]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["units"] == 2 and report["preserved_pages"] == 9
    assert np.array_equal([o["order"] for o in report["per_order"]], [0, 3])
