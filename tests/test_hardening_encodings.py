"""Strict and kernel-compatible decoding of kho's own encodings (ranges, ranges-packed, maple,
instructions): one test per check that differs between the modes, and the checks both keep.

No kernel writes these formats; their lenient mode relaxes what the kernel's readers of
kho-v1/kho-v2 do not check (placement in scratch, overlaps, metadata in preserved memory,
orders above MAX_PAGE_ORDER) wherever the format's structure allows.  The malformations
every mode refuses are covered at length by tests/test_encodings_bad_input.py.
"""

import struct

import numpy as np
import pytest
from fuzz.samples import ARENA, PS, encode_map, load_map, machine

from kho.encodings import get_encoding
from kho.encodings.maple import MAPLE_NODE, NODE_MAGIC
from kho.errors import KHOFormatError

MiB = 1 << 20
MAP = "preserved-memory-map"
FOLIO = (34 * MiB, 3)  # the "folio" sample's only unit


def u64(value):
    return struct.pack("<Q", value % (1 << 64))


def decode(name, memory, props, strict):
    return get_encoding(name, PS).decode(memory, props, strict=strict)


def check(name, memory, props, field, modes):
    with pytest.raises(KHOFormatError) as err:
        decode(name, memory, props, True)
    assert err.value.field.startswith(field), err.value
    if modes == "both":
        with pytest.raises(KHOFormatError):
            decode(name, memory, props, False)
        return None
    return decode(name, memory, props, False)


# -- ranges ----------------------------------------------------------------------------------

def ranges(*pairs):
    return {"mem": b"".join(u64(a) + u64(n) for a, n in pairs)}


@pytest.mark.parametrize("pairs, expect", [
    pytest.param([(12 * MiB, 8 * PS), (12 * MiB + 4 * PS, 8 * PS)], [(12 * MiB, 3), (12 * MiB + 8 * PS, 2)], id="overlap"),
    pytest.param([(34 * MiB, PS), (12 * MiB, PS)], [(12 * MiB, 0), (34 * MiB, 0)], id="unsorted"),
    pytest.param([(12 * MiB, PS), (12 * MiB, PS)], [(12 * MiB, 0)], id="repeated"),
    pytest.param([(12 * MiB, PS), (14 * MiB, 0)], [(12 * MiB, 0)], id="empty-range"),
    pytest.param([(4 * MiB, 2 * PS)], [(4 * MiB, 1)], id="in-scratch"),
])
def test_ranges_strict_only(pairs, expect):
    decoded = check("ranges", machine(), ranges(*pairs), "fdt.mem", "strict")
    assert decoded.units() == expect and not decoded.exact_orders


@pytest.mark.parametrize("pairs", [
    pytest.param([(12 * MiB + 8, PS)], id="misaligned"),
    pytest.param([((1 << 64) - PS, 2 * PS)], id="wraps"),
    pytest.param([(15 * MiB, 2 * MiB)], id="past-the-bank"),
    pytest.param([(20 * MiB, PS)], id="in-the-hole"),
])
def test_ranges_refused_in_both_modes(pairs):
    check("ranges", machine(), ranges(*pairs), "fdt.mem", "both")


def test_ranges_partial_entry():
    check("ranges", machine(), {"mem": u64(12 * MiB) + u64(PS) + b"\0" * 8}, "fdt.mem", "both")


# -- chunk-list encodings: metadata placement ---------------------------------------------------

def moved(name, to):
    """The one-chunk (or one-node) "folio" sample with its metadata page copied to ``to`` and
    the root pointer following it."""
    memory, props = load_map(encode_map(name, "folio").data)
    root = int.from_bytes(props[MAP], "little")
    page = root & ~(PS - 1)
    memory.write(to, memory.read(page, PS))
    return memory, {MAP: u64(to + root - page)}


@pytest.mark.parametrize("name, inside_unit_field", [
    ("ranges-packed", "ranges-packed.chunk"), ("maple", "maple.node"), ("instructions", "instructions.chunk")])
@pytest.mark.parametrize("to", [pytest.param(4 * MiB + 2 * PS, id="in-scratch"), pytest.param(FOLIO[0] + PS, id="inside-the-unit")])
def test_metadata_placement_is_strict_only(name, inside_unit_field, to):
    memory, props = moved(name, to)
    field = f"fdt.{MAP}" if to < 8 * MiB else inside_unit_field
    assert check(name, memory, props, field, "strict").units() == [FOLIO]


def test_metadata_pointer_outside_ram_in_both_modes():
    for name in ("ranges-packed", "maple", "instructions"):
        memory, props = load_map(encode_map(name, "folio").data)
        check(name, memory, {MAP: u64(20 * MiB)}, "fdt", "both")


# -- ranges-packed entries --------------------------------------------------------------------

def packed(*entries):
    """A one-chunk ranges-packed list at the arena holding ``(pfn, pages)`` entries."""
    sample = encode_map("ranges-packed", "folio")
    memory, props = load_map(sample.data)
    header = memory.read(ARENA, 16)
    body = b"".join(u64(pfn << 12 | pages) for pfn, pages in entries)
    memory.write(ARENA, header[:8] + struct.pack("<I", len(entries)) + header[12:16] + body)
    return memory, props


@pytest.mark.parametrize("entries, expect", [
    pytest.param([(3072, 1), (3072, 0)], [(12 * MiB, 0)], id="zero-length"),
    pytest.param([(3080, 8), (3072, 1)], [(12 * MiB, 0), (12 * MiB + 8 * PS, 3)], id="unsorted"),
    pytest.param([(3072, 8), (3076, 8)], [(12 * MiB, 3), (12 * MiB + 8 * PS, 2)], id="overlap"),
    pytest.param([(1024, 2)], [(4 * MiB, 1)], id="in-scratch"),
])
def test_ranges_packed_entries_strict_only(entries, expect):
    memory, props = packed(*entries)
    assert check("ranges-packed", memory, props, "ranges-packed.entry", "strict").units() == expect


def test_ranges_packed_entry_outside_ram_in_both_modes():
    memory, props = packed((5120, 1))  # 20 MiB: the hole between the banks
    check("ranges-packed", memory, props, "ranges-packed.entry", "both")


# -- maple leaves -----------------------------------------------------------------------------

def maple_leaf(units):
    """A one-leaf maple tree (the root) at the arena holding ``units`` (sorted)."""
    memory = machine()
    node = np.zeros(1, dtype=MAPLE_NODE)
    node["magic"], node["count"] = NODE_MAGIC, len(units)
    for i, (phys, order) in enumerate(units):
        if i < 15:
            node["pivot"][0, i] = phys + (PS << order) - 1
        node["slot"][0, i] = order << 1 | 1
    if len(units) == 16:
        raise ValueError("keep the last pivot explicit")
    memory.write(ARENA, node.tobytes())
    return memory, {MAP: u64(ARENA)}


@pytest.mark.parametrize("units, field", [
    pytest.param([(4 * MiB, 0)], "maple.leaf", id="unit-in-scratch"),
    pytest.param([(0, 11)], "maple.slot", id="order-above-MAX_PAGE_ORDER"),
    pytest.param([(ARENA, 0)], "maple.node", id="node-inside-its-unit"),
])
def test_maple_units_strict_only(units, field):
    memory, props = maple_leaf(units)
    assert check("maple", memory, props, field, "strict").units() == units


def test_maple_order_beyond_the_address_space_in_both_modes():
    memory, props = maple_leaf([(0, 45)])
    check("maple", memory, props, "maple.slot", "both")
