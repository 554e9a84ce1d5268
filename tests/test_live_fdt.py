"""The live KHO root FDT of Linux 7.x (kho-v3/kho-v4), edited by libfdt in one page, against
the real kernel's blob (tests/fixtures/linux-7.3-x86_64, see its README)."""

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho.devicetree import KHOFdt
from kho.devicetree.fdt_rw import ReadWriteFdt
from kho.devicetree.fdt_sw import SequentialFdt
from kho.errors import KHOError

FIXTURES = Path(__file__).parent / "fixtures" / "linux-7.3-x86_64"
REAL = (FIXTURES / "kho-fdt-0x344000.dtb").read_bytes()
OUT_FDT = (FIXTURES / "debugfs" / "out__fdt").read_bytes()
#: The sub-nodes in the order the real kernel added them: (name, preserved-data, blob-size).
SUBTREES = [("kexec-metadata", 0x34A000, 73), ("kho_test", 0x2FC000, 240), ("LUO", 0x3563000, 32),
            ("memblock", 0x2DE1000, 214)]


def u64(value):
    return struct.pack("<Q", value)


def real_like():
    fdt = KHOFdt("kho-v4", {"preserved-memory-map": u64(0x343000)})
    for name, phys, size in SUBTREES:
        fdt.add_subtree(name, phys, size)
    return fdt


def test_writer_reproduces_the_real_kernel_blob_byte_for_byte():
    fdt = real_like()
    assert fdt.to_dtb() == REAL
    # debugfs out/fdt: the live page's first 233 bytes (the size when the file was made)
    assert fdt.page_image()[:len(OUT_FDT)] == OUT_FDT


def test_reading_the_real_blob():
    fdt = KHOFdt.from_dtb(REAL)
    assert fdt.compatible == "kho-v4" and fdt.memory_map() == 0x343000 and fdt.live
    assert list(fdt.subtrees()) == ["memblock", "LUO", "kho_test", "kexec-metadata"]  # newest first
    assert {n: fdt.subtree_size(n) for n in fdt.subtrees()} == {n: s for n, _, s in SUBTREES}
    assert fdt.retrieve_subtree("LUO") == 0x3563000
    assert list(fdt.subnode_props()["LUO"]) == ["blob-size", "preserved-data"]
    assert fdt.to_dtb() == REAL  # re-serialized as the kernel would have built it


def test_v3_sub_trees_need_a_blob_size():
    fdt = KHOFdt("kho-v3", {"preserved-memory-map": u64(0x1000)})
    with pytest.raises(KHOError) as err:
        fdt.add_subtree("x", 0x2000)
    assert err.value.errno_name == "EINVAL"
    # a kho-v4 sub-node without blob-size (hand-made): retrieving it is EINVAL, as in the kernel
    sw = SequentialFdt(4096)
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", "kho-v4")
    sw.property("preserved-memory-map", u64(0x1000))
    sw.begin_node("old")
    sw.property("preserved-data", u64(0x2000))
    sw.end_node()
    sw.end_node()
    parsed = KHOFdt.from_dtb(sw.finish())
    with pytest.raises(KHOError) as err:
        parsed.retrieve_subtree("old")
    assert err.value.errno_name == "EINVAL"


def test_page_overflow_is_e2big_and_changes_nothing():
    fdt = KHOFdt("kho-v4", {"preserved-memory-map": u64(0x1000)})
    added = 0
    with pytest.raises(KHOError) as err:
        for i in range(200):
            fdt.add_subtree(f"subsystem-{i:03d}-with-a-long-name", 0x1000 * i, 1)
            added += 1
    assert err.value.errno_name == "E2BIG"
    assert len(fdt.subtrees()) == added and len(fdt.to_dtb()) <= 4096


def test_remove_then_add_keeps_libfdt_order():
    fdt = real_like()
    fdt.remove_subtree("LUO")
    fdt.add_subtree("LUO", 0x3563000, 32)
    assert list(fdt.subtrees())[0] == "LUO"
    assert KHOFdt.from_dtb(fdt.to_dtb()).subtrees() == fdt.subtrees()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True),
                          st.integers(0, 2**64 - 1), st.integers(1, 2**64 - 1)),
                max_size=12, unique_by=lambda t: t[0]))
def test_live_blob_round_trips(subtrees):
    fdt = KHOFdt("kho-v4", {"preserved-memory-map": u64(0x343000)})
    for name, phys, size in subtrees:
        fdt.add_subtree(name, phys, size)
    back = KHOFdt.from_dtb(fdt.to_dtb())
    assert back.subtrees() == fdt.subtrees() == {n: p for n, p, _ in reversed(subtrees)}
    assert all(back.subtree_size(n) == s for n, _, s in subtrees)
    assert back.to_dtb() == fdt.to_dtb()


def test_libfdt_edit_primitives():
    sw = SequentialFdt(256)
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property("a", b"\x01")
    sw.end_node()
    rw = ReadWriteFdt(sw.finish(), 256, sw.buffer)
    node = rw.add_subnode(0, "n")
    with pytest.raises(KHOError):
        rw.add_subnode(0, "n")
    rw.setprop(node, "size", u64(1))  # "size" is new: appended to the strings block
    rw.setprop(node, "blob-size", u64(2))
    rw.setprop(node, "size", b"\x07")  # resized in place
    rw.pack()
    blob = rw.blob()
    strings = blob[struct.unpack(">I", blob[12:16])[0]:]
    assert strings == b"a\0size\0blob-size\0"
    again = ReadWriteFdt(blob, 256)
    n = again.subnode_offset(0, "n")
    again.del_node(n)
    again.pack()
    assert again.subnode_offset(0, "n") is None
