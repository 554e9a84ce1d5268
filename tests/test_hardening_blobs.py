"""One test per validation of the devicetree readers (flattened blob, KHO FDT and its
sub-nodes, /chosen, the scratch-area array) and of the image loader's bounds, in both
modes: "both" = the kernel-compatible reader refuses it too, "strict" = it accepts it.

Blobs are written token by token (:func:`blob`) so that every malformation can be built.
"""

import io
import struct

import msgpack
import numpy as np
import pytest
from fuzz.corpus import seeds
from fuzz.samples import ARENA, PS, machine

from kho.devicetree import KHOFdt, parse_chosen, parse_fdt
from kho.devicetree.flat import MAX_DEPTH
from kho.devicetree.layout import FDT_BEGIN_NODE, FDT_END, FDT_END_NODE, FDT_MAGIC, FDT_NOP, FDT_PROP
from kho.encodings import DecodedMap
from kho.errors import KHOFormatError
from kho.handover.imagefile import MAX_BANKS, load_image
from kho.handover.scratch_array import MAX_SCRATCH_AREAS, read_scratch_array

MiB = 1 << 20
MAP = "preserved-memory-map"


def u64(value: int) -> bytes:
    return struct.pack("<Q", value % (1 << 64))


def be32(*values: int) -> bytes:
    return b"".join(struct.pack(">I", v) for v in values)


def blob(*items, version=17, last_comp=16, totalsize=None, rsvmap=b"\0" * 16, strings=None, pad=0):
    """A flattened devicetree from tokens: ``("begin", name)``, ``("prop", name, value)``,
    ``("end",)``, ``("nop",)``, ``("END",)``, ``("raw", bytes)``.  Names go to the strings
    block in order of first use (unless ``strings`` is given: then ``name`` is an offset)."""
    names, table = {}, bytearray()
    out = bytearray()
    for item in items:
        kind = item[0]
        if kind == "begin":
            name = item[1] if isinstance(item[1], bytes) else item[1].encode()
            out += be32(FDT_BEGIN_NODE) + name + b"\0"
            out += bytes(-len(out) % 4)
        elif kind == "prop":
            name, value = item[1], item[2]
            if strings is None:
                if name not in names:
                    names[name] = len(table)
                    table += (name if isinstance(name, bytes) else name.encode()) + b"\0"
                offset = names[name]
            else:
                offset = name
            out += be32(FDT_PROP, len(value), offset) + value + bytes(-len(value) % 4)
        elif kind == "end":
            out += be32(FDT_END_NODE)
        elif kind == "nop":
            out += be32(FDT_NOP)
        elif kind == "END":
            out += be32(FDT_END)
        else:
            out += item[1]
    table = bytes(table) if strings is None else strings
    off_rsv = 40
    off_struct = off_rsv + len(rsvmap)
    off_strings = off_struct + len(out)
    total = off_strings + len(table) if totalsize is None else totalsize
    header = struct.pack(">10I", FDT_MAGIC, total, off_struct, off_strings, off_rsv, version, last_comp, 0,
                         len(table), len(out))
    return header + rsvmap + bytes(out) + table + bytes(pad)


def kho_fdt(*root_props, subnodes=(), compatible=b"kho-v2\0", map_value=u64(0x1000)):
    """A KHO FDT: compatible, preserved-memory-map, extra root props, then sub-nodes
    ``(name, [(prop, value), ...])``."""
    items = [("begin", ""), ("prop", "compatible", compatible), ("prop", MAP, map_value), *root_props]
    for name, props in subnodes:
        items += [("begin", name), *[("prop", p, v) for p, v in props], ("end",)]
    return blob(*items, ("end",), ("END",))


GOOD = [("begin", ""), ("prop", "compatible", b"x\0"), ("begin", "n@1"), ("prop", "v", b"\1\2"), ("end",), ("end",), ("END",)]


def fails(fn, field, *args, **kwargs):
    with pytest.raises(KHOFormatError) as err:
        fn(*args, **kwargs)
    assert err.value.field == field, err.value
    return err.value


def check(fn, data, field, modes, *args):
    """``fn(data, ..., strict=True)`` fails naming ``field``; with ``strict=False`` it fails
    too ("both") or returns its result ("strict")."""
    fails(fn, field, data, *args, strict=True)
    if modes == "both":
        fails(fn, field, data, *args, strict=False)
        return None
    assert modes == "strict"
    return fn(data, *args, strict=False)


# -- the flattened blob ----------------------------------------------------------------------

def test_overlapping_blocks_are_strict_only():
    """The strings block laid over the structure block (or a reservation block running into
    it, as a fuzzer found): libfdt's header check allows it, the strict reader does not."""
    good = blob(*GOOD)
    head = list(struct.unpack(">10I", good[:40]))
    head[3] = head[2]  # off_dt_strings = off_dt_struct
    data = struct.pack(">10I", *head) + good[40:]
    with pytest.raises(KHOFormatError) as err:
        parse_fdt(data)
    assert err.value.field.startswith("fdt.header.off_dt_s") and "overlaps" in str(err.value)
    assert parse_fdt(data, strict=False).root is not None  # names now come from the structure block


def test_good_blob_parses_in_both_modes():
    for strict in (True, False):
        tree = parse_fdt(blob(*GOOD), strict=strict)
        assert tree.root.get_subnode("n@1").get_property("v").data == b"\1\2"


@pytest.mark.parametrize("data, field", [
    pytest.param(blob(*GOOD)[:20], "fdt.header", id="short"),
    pytest.param(b"\0" * 64, "fdt.header.magic", id="magic"),
    pytest.param(blob(*GOOD, version=15), "fdt.header.version", id="version-15"),
    pytest.param(blob(*GOOD, last_comp=18), "fdt.header.version", id="last-comp-18"),
    pytest.param(blob(*GOOD, totalsize=1 << 20), "fdt.header.totalsize", id="totalsize-past-the-data"),
    pytest.param(blob(*GOOD)[:4] + be32(30) + blob(*GOOD)[8:], "fdt.header.totalsize", id="totalsize-below-the-header"),
    pytest.param(blob(*GOOD, rsvmap=b""), "fdt.mem_rsvmap", id="no-reservation-block"),
])
def test_header(data, field):
    if field == "fdt.mem_rsvmap":  # libfdt's fdt_check_header does not read the reservation block
        assert check(parse_fdt, data, field, "strict") is not None
    else:
        check(parse_fdt, data, field, "both")


@pytest.mark.parametrize("items, field", [
    pytest.param([("begin", ""), ("raw", be32(7)), ("end",), ("END",)], "fdt.struct", id="unknown-token"),
    pytest.param([("begin", ""), ("begin", "a"), ("end",)], "fdt.struct", id="no-end"),
    pytest.param([("begin", ""), ("prop", "v", b"x" * 4), ("raw", be32(FDT_PROP, 1 << 20, 0)), ("end",), ("END",)],
                 "fdt.prop.len", id="value-past-the-block"),
    pytest.param([("begin", ""), ("raw", be32(FDT_PROP, 0, 1 << 16)), ("end",), ("END",)], "fdt.prop.nameoff",
                 id="name-offset-outside"),
    pytest.param([("raw", be32(FDT_BEGIN_NODE) + b"abcd")], "fdt.node.name", id="name-not-terminated"),
    pytest.param([("end",), ("END",)], "fdt.struct", id="end-node-outside"),
    pytest.param([("prop", "v", b""), ("END",)], "fdt.struct", id="property-outside"),
    pytest.param([("begin", "")] + [("begin", f"n{i}") for i in range(MAX_DEPTH + 1)] + [("end",)] * (MAX_DEPTH + 2) + [("END",)],
                 "fdt.struct", id="nested-too-deep"),
])
def test_structure_refused_in_both_modes(items, field):
    check(parse_fdt, blob(*items), field, "both")


@pytest.mark.parametrize("items, field", [
    pytest.param([("begin", "root"), ("end",), ("END",)], "fdt.node.name", id="named-root"),
    pytest.param([("begin", ""), ("begin", "bad name"), ("end",), ("end",), ("END",)], "fdt.node.name", id="node-name"),
    pytest.param([("begin", ""), ("begin", b"caf\xe9"), ("end",), ("end",), ("END",)], "fdt.node.name", id="non-ascii"),
    pytest.param([("begin", ""), ("begin", "a"), ("end",), ("begin", "a"), ("end",), ("end",), ("END",)], "fdt.node.name",
                 id="duplicate-node"),
    pytest.param([("begin", ""), ("prop", "v", b"1"), ("prop", "v", b"2"), ("end",), ("END",)], "fdt.prop.name",
                 id="duplicate-property"),
    pytest.param([("begin", ""), ("prop", "bad name", b"1"), ("end",), ("END",)], "fdt.prop.name", id="property-name"),
    pytest.param([("begin", ""), ("begin", "a"), ("end",), ("prop", "v", b"1"), ("end",), ("END",)], "fdt.prop",
                 id="property-after-a-sub-node"),
    pytest.param([("begin", ""), ("end",), ("nop",), ("END",)], "fdt.struct", id="token-after-the-root"),
    pytest.param([("begin", ""), ("end",), ("raw", be32(0x77))], "fdt.struct", id="garbage-after-the-root"),
])
def test_structure_accepted_by_the_kernel_reader(items, field):
    tree = check(parse_fdt, blob(*items), field, "strict")
    assert tree.root is not None


def test_lenient_reader_sees_what_libfdt_lookups_see():
    data = blob(("begin", ""), ("prop", "v", b"first"), ("prop", "v", b"second"), ("begin", "a"), ("prop", "w", b"1"),
                ("end",), ("begin", "a"), ("prop", "w", b"2"), ("end",), ("prop", "late", b"x"), ("end",), ("END",))
    root = parse_fdt(data, strict=False).root
    assert root.get_property("v").data == b"first" and root.get_property("late") is None
    assert [n.name for n in root.nodes] == ["a"] and root.get_subnode("a").get_property("w").data == b"1"


# -- the KHO FDT --------------------------------------------------------------------------------

def test_kho_fdt_compatible_string_matching():
    data = kho_fdt(compatible=b"\x01vendor\0kho-v1\0")
    assert check(KHOFdt.from_dtb, data, "fdt.compatible", "strict").compatible == "kho-v1"
    check(KHOFdt.from_dtb, kho_fdt(compatible=b"kho-v1"), "fdt.compatible", "both")  # never NUL-terminated
    check(KHOFdt.from_dtb, kho_fdt(compatible=b"kho-v12\0"), "fdt.compatible", "both")


@pytest.mark.parametrize("compatible, modes", [(b"kho-v1\0", "strict"), (b"kho-v2\0", "both")])
def test_kho_fdt_zero_memory_map(compatible, modes):
    """Linux 6.16 reads a zero kho-v1 map pointer as "nothing preserved"; kho-v2 kernels refuse it."""
    check(KHOFdt.from_dtb, kho_fdt(compatible=compatible, map_value=u64(0)), f"fdt.{MAP}", modes)


def test_kho_fdt_larger_than_a_page():
    data = kho_fdt(("prop", "padding", bytes(PS)))
    assert check(KHOFdt.from_dtb, data, "fdt.header.totalsize", "strict").props["padding"] == bytes(PS)


def units(*pairs):
    phys = np.array([p for p, _ in pairs], dtype=np.uint64)
    return DecodedMap(phys, np.array([o for _, o in pairs], dtype=np.uint8), True, np.empty(0, np.uint64))


@pytest.mark.parametrize("props, field", [
    pytest.param([], "fdt.s.preserved-data", id="no-pointer"),
    pytest.param([("preserved-data", b"\1" * 4)], "fdt.s.preserved-data", id="pointer-4-bytes"),
    pytest.param([("preserved-data", u64(20 * MiB))], "fdt.s.preserved-data", id="pointer-in-the-hole"),
    pytest.param([("preserved-data", u64(12 * MiB)), ("blob-size", b"\1")], "fdt.s.blob-size", id="size-1-byte"),
    pytest.param([("preserved-data", u64(15 * MiB)), ("blob-size", u64(2 * MiB))], "fdt.s.blob-size", id="blob-past-RAM"),
    pytest.param([("preserved-data", u64(12 * MiB + PS))], "fdt.s.preserved-data", id="not-preserved"),
    pytest.param([("preserved-data", u64(12 * MiB)), ("blob-size", u64(PS + 1))], "fdt.s.preserved-data",
                 id="blob-past-its-unit"),
])
def test_sub_node_checks(props, field):
    fdt = KHOFdt.from_dtb(kho_fdt(subnodes=[("s", props)]))
    fails(fdt.check_subtrees, field, machine(), units((12 * MiB, 0)))


def test_sub_node_checks_pass_for_a_preserved_blob_and_refuse_nesting():
    good = KHOFdt.from_dtb(kho_fdt(subnodes=[("s", [("preserved-data", u64(12 * MiB)), ("blob-size", u64(PS))])]))
    good.check_subtrees(machine(), units((12 * MiB, 0)))
    nested = blob(("begin", ""), ("prop", "compatible", b"kho-v2\0"), ("prop", MAP, u64(1)), ("begin", "s"),
                  ("prop", "preserved-data", u64(12 * MiB)), ("begin", "t"), ("end",), ("end",), ("end",), ("END",))
    fails(KHOFdt.from_dtb(nested).check_subtrees, "fdt.s", machine())


# -- /chosen ---------------------------------------------------------------------------------------

def chosen_dtb(fdt_value, scratch_value, cells=(2, 2)):
    root = [("begin", ""), ("prop", "compatible", b"linux,dummy-virt\0")]
    if cells is not None:
        root += [("prop", "#address-cells", be32(cells[0])), ("prop", "#size-cells", be32(cells[1]))]
    return blob(*root, ("begin", "chosen"), ("prop", "linux,kho-fdt", fdt_value), ("prop", "linux,kho-scratch", scratch_value),
                ("end",), ("end",), ("END",))


def test_chosen_default_cells_are_the_kernels_when_lenient():
    """No #address-cells/#size-cells: the specification says 2 and 1, the kernel assumes 1 and 1."""
    data = chosen_dtb(be32(0x200000, PS), be32(0x201000, 32), cells=None)
    chosen = check(parse_chosen, data, "chosen.linux,kho-fdt", "strict")
    assert (chosen.fdt_phys, chosen.fdt_size, chosen.scratch_phys, chosen.scratch_size) == (0x200000, PS, 0x201000, 32)


def test_chosen_three_cells_keep_the_low_64_bits_when_lenient():
    data = chosen_dtb(be32(7, 0, 0x200000, 0, PS), be32(7, 0, 0x201000, 0, 32), cells=(3, 2))
    chosen = check(parse_chosen, data, "dtb.#address-cells", "strict")
    assert (chosen.fdt_phys, chosen.scratch_phys) == (0x200000, 0x201000)


@pytest.mark.parametrize("data, field", [
    pytest.param(chosen_dtb(be32(0, 0x200000, 0), be32(0, 1, 0, 32)), "chosen.linux,kho-fdt", id="pair-too-short"),
    pytest.param(chosen_dtb(be32(0, 1, 0, 1), be32(0, 1, 0, 32), cells=(0, 2)), "dtb.#address-cells", id="zero-cells"),
    pytest.param(blob(("begin", ""), ("end",), ("END",)), "dtb.chosen", id="no-chosen"),
])
def test_chosen_refused_in_both_modes(data, field):
    check(parse_chosen, data, field, "both")


# -- the scratch-area array ----------------------------------------------------------------------

def read_array(entries, size=None, strict=True, tail=b""):
    memory = machine()
    data = b"".join(u64(a) + u64(s) for a, s in entries) + tail
    memory.write(ARENA, data)
    return read_scratch_array(memory, ARENA, len(data) if size is None else size, strict=strict)


GOOD_AREAS = [(4 * MiB, MiB), (38 * MiB, MiB)]


@pytest.mark.parametrize("kwargs, field, modes", [
    pytest.param(dict(entries=GOOD_AREAS, tail=b"\1" * 8), "scratch.size", "strict", id="partial-entry"),
    pytest.param(dict(entries=GOOD_AREAS + [(40 * MiB + 8, MiB)]), "scratch.area", "strict", id="misaligned-area"),
    pytest.param(dict(entries=GOOD_AREAS + [(4 * MiB + PS, MiB)]), "scratch.area", "strict", id="overlapping-areas"),
    pytest.param(dict(entries=[]), "scratch.size", "both", id="no-entry"),
    pytest.param(dict(entries=[(4 * MiB, 0), (5 * MiB, 0)], size=32), "scratch.size", "both", id="only-empty-areas"),
    pytest.param(dict(entries=GOOD_AREAS, size=16 * (MAX_SCRATCH_AREAS + 1)), "scratch.size", "both", id="too-many"),
    pytest.param(dict(entries=GOOD_AREAS + [(15 * MiB, 2 * MiB)]), "scratch.area", "both", id="area-past-RAM"),
])
def test_scratch_array(kwargs, field, modes):
    strict_field, lenient_field = field if isinstance(field, tuple) else (field, field)
    fails(read_array, strict_field, strict=True, **kwargs)
    if modes == "both":
        fails(read_array, lenient_field, strict=False, **kwargs)
    else:
        assert [(a.addr, a.size) for a in read_array(strict=False, **kwargs)][:2] == GOOD_AREAS


def test_scratch_array_empty_entry_is_skipped_in_both_modes():
    """The kernel writes an empty entry for an area whose size came out as zero."""
    for strict in (True, False):
        assert [(a.addr, a.size) for a in read_array(strict=strict, entries=GOOD_AREAS + [(40 * MiB, 0)])] == GOOD_AREAS


def test_scratch_array_outside_ram():
    with pytest.raises(KHOFormatError) as err:
        read_scratch_array(machine(), 20 * MiB, 32, strict=False)
    assert err.value.field == "scratch.phys"


# -- the image loader's bounds ----------------------------------------------------------------------

def edited_image(**changes):
    top = msgpack.unpackb(seeds("image")[2], raw=False)  # the kho-v2 handover
    for key, value in changes.items():
        top[key] = value(top) if callable(value) else value
    return io.BytesIO(msgpack.packb(top, use_bin_type=True))


@pytest.mark.parametrize("changes, field", [
    pytest.param(dict(banks=[[i * 2 * PS, PS, 0] for i in range(MAX_BANKS + 1)]), "image.banks", id="too-many-banks"),
    pytest.param(dict(scratch=[[0, PS, "x"]] * (MAX_SCRATCH_AREAS + 1)), "image.scratch", id="too-many-areas"),
    pytest.param(dict(fdt=lambda t: [t["fdt"][0] & ~(8 * MiB - 1), 8 * MiB]), "image.fdt", id="fdt-of-8-MiB"),
    pytest.param(dict(scratch_array=lambda t: [t["scratch_array"][0], 16 * (MAX_SCRATCH_AREAS + 1)]), "image.scratch_array",
                 id="scratch-array-too-long"),
    pytest.param(dict(options={b"bitmap_bytes": 512}), "image.options", id="option-name-not-a-string"),
])
def test_image_bounds(changes, field):
    fails(load_image, field, edited_image(**changes))


def test_image_sub_tree_outside_preserved_memory_is_strict_only():
    image = load_image(io.BytesIO(seeds("image")[2]))
    decoded = image.decode()
    tree = image.kho_fdt()
    size = tree.subtree_size("kho-test")
    tree.remove_subtree("kho-test")
    tree.add_subtree("kho-test", ARENA, size)  # a page nobody preserved
    data = tree.to_dtb()
    image.memory.write(image.fdt_phys, data + bytes(image.fdt_size - len(data)))
    fails(image.decode, "fdt.kho-test.preserved-data")
    assert image.decode(strict=False).units() == decoded.units()
