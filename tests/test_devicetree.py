"""The KHO FDT, the boot DTB's /chosen, the scratch array, and the strict blob reader."""

import shutil
import struct
import subprocess
from pathlib import Path

import libfdt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho.devicetree import ChosenKHO, KHOFdt, build_boot_dtb, parse_chosen, parse_fdt
from kho.devicetree.layout import FDT_NOP
from kho.errors import KHOError, KHOFormatError
from kho.handover.scratch_array import read_scratch_array, write_scratch_array
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea

ROOT = Path(__file__).resolve().parent.parent
BINDINGS = ROOT / "spec" / "bindings"
MAP = "preserved-memory-map"
PS = 4096


def u64(value):
    return struct.pack("<Q", value)


def sample(compatible="kho-v2", subtrees=(("memblock", 0x2000, None), ("luo", 0x3000, 100))):
    k = KHOFdt(compatible, {MAP: u64(0x1000)})
    for name, phys, size in subtrees:
        k.add_subtree(name, phys, size)
    return k


def libfdt_ok(blob):
    tree = libfdt.Fdt(blob)
    return libfdt.fdt_check_full(tree._fdt, len(blob)) == 0, tree


def errno_of(fn, *args):
    with pytest.raises(KHOError) as err:
        fn(*args)
    return err.value.errno_name


# -- building ---------------------------------------------------------------------------------

@pytest.mark.parametrize("compatible, prop", [("kho-v1", "fdt"), ("kho-v2", "preserved-data")])
def test_built_fdt_passes_libfdt(compatible, prop):
    blob = sample(compatible).to_dtb()
    ok, tree = libfdt_ok(blob)
    assert ok and len(blob) <= PS
    assert libfdt.fdt_node_check_compatible(tree._fdt, 0, compatible) == 0
    assert bytes(tree.getprop(0, MAP)) == u64(0x1000)
    assert bytes(tree.getprop(tree.path_offset("/memblock"), prop)) == u64(0x2000)
    assert bytes(tree.getprop(tree.path_offset("/luo"), "blob-size")) == u64(100)
    assert tree.version() == 17 and tree.last_comp_version() == 16 and tree.num_mem_rsv() == 0


def test_subtree_api_and_kernel_errors():
    k = sample()
    assert k.subtrees() == {"luo": 0x3000, "memblock": 0x2000}  # newest first, as fdt_add_subnode places them
    assert list(k.subtrees()) == ["luo", "memblock"]
    assert k.retrieve_subtree("memblock") == 0x2000 and k.subtree_size("luo") == 100 and k.subtree_size("memblock") is None
    assert errno_of(k.add_subtree, "memblock", 0x9000) == "EEXIST"
    assert errno_of(k.retrieve_subtree, "nope") == "ENOENT"
    assert errno_of(k.remove_subtree, "nope") == "ENOENT"
    assert errno_of(k.add_subtree, "bad name!", 0) == "EINVAL"
    assert errno_of(k.add_subtree, "x", -1) == "EINVAL"
    k.remove_subtree("memblock")
    assert k.subtrees() == {"luo": 0x3000}
    assert errno_of(KHOFdt, "kho-v2", {"compatible": b"x\0"}) == "EINVAL"


def test_retrieve_with_wrong_property_length_is_einval():
    blob = sample().to_dtb()
    tree = libfdt.Fdt(blob)
    tree.setprop(tree.path_offset("/memblock"), "preserved-data", b"\0" * 4)
    k = KHOFdt.from_dtb(bytes(tree.as_bytearray()))
    assert errno_of(k.retrieve_subtree, "memblock") == "EINVAL"
    assert k.subtrees() == {"luo": 0x3000}  # invalid entries are left out


def test_fdt_must_fit_in_one_page():
    k = KHOFdt("kho-v2", {MAP: u64(0x1000)})
    added = 0
    with pytest.raises(KHOError) as err:
        for i in range(1000):
            k.add_subtree(f"subsystem-{i:04d}", 0x1000 * i)
            added += 1
    assert err.value.errno_name == "E2BIG" and 20 < added < 1000
    assert len(k.to_dtb()) <= PS and len(k.subtrees()) == added  # the failed add left nothing behind
    big = KHOFdt("kho-v2", {MAP: u64(0x1000)}, max_size=4 * PS)
    for i in range(added + 5):
        big.add_subtree(f"subsystem-{i:04d}", 0x1000 * i)
    assert len(big.to_dtb()) > PS
    assert errno_of(KHOFdt, "kho-ranges", {"mem": bytes(2 * PS)}) == "E2BIG"


# -- reading back --------------------------------------------------------------------------------

def test_round_trip_keeps_every_byte():
    blob = sample("kho-v1").to_dtb()
    back = KHOFdt.from_dtb(blob)
    assert back.compatible == "kho-v1" and back.props == {MAP: u64(0x1000)}
    assert back.subtrees() == {"luo": 0x3000, "memblock": 0x2000} and back.to_dtb() == blob
    assert back.memory_map() == 0x1000
    assert KHOFdt.from_dtb(blob + bytes(PS - len(blob))).to_dtb() == blob  # a whole page read back


def fdt_with(**props):
    """A KHO FDT built with libfdt directly (so we can write what kho would refuse to)."""
    tree = libfdt.Fdt.create_empty_tree(PS)
    for name, value in props.items():
        tree.setprop(0, name.replace("_", "-"), value)
    return bytes(tree.as_bytearray())


@pytest.mark.parametrize("blob, field", [
    pytest.param(b"\xd0\x0d\xfe", "fdt.header", id="short"),
    pytest.param(b"\0" * 64, "fdt.header.magic", id="magic"),
    pytest.param(fdt_with(compatible=b"kho-v5\0", preserved_memory_map=u64(1)), "fdt.compatible", id="compatible"),
    pytest.param(fdt_with(preserved_memory_map=u64(1)), "fdt.compatible", id="no-compatible"),
    pytest.param(fdt_with(compatible=b"kho-v2\0", preserved_memory_map=u64(1)[:4]), "fdt.preserved-memory-map", id="map-4-bytes"),
    pytest.param(fdt_with(compatible=b"kho-v2\0", preserved_memory_map=u64(0)), "fdt.preserved-memory-map", id="map-zero"),
    pytest.param(fdt_with(compatible=b"kho-v2\0"), "fdt.preserved-memory-map", id="no-map"),
    # both wrong: the compatible is checked first, as in the kernel
    pytest.param(fdt_with(compatible=b"kho-v9\0", preserved_memory_map=b"\1"), "fdt.compatible", id="order"),
])
def test_validation_in_kernel_order(blob, field):
    with pytest.raises(KHOFormatError) as err:
        KHOFdt.from_dtb(blob)
    assert err.value.field == field


def test_compatible_list_and_explicit_abi():
    blob = fdt_with(compatible=b"vendor,kho\0kho-v1\0", preserved_memory_map=u64(0x1000))
    assert KHOFdt.from_dtb(blob).compatible == "kho-v1"
    with pytest.raises(KHOFormatError):
        KHOFdt.from_dtb(blob, "kho-v2")


def with_nops(blob):
    """Insert an FDT_NOP token after the root's BEGIN_NODE and before its END_NODE (header fixed up)."""
    head = list(struct.unpack(">10I", blob[:40]))
    struct_off, struct_size = head[2], head[9]
    nop = struct.pack(">I", FDT_NOP)
    body = blob[struct_off:struct_off + struct_size]
    body = body[:8] + nop + body[8:-8] + nop + body[-8:]
    out = blob[:struct_off] + body + blob[struct_off + struct_size:]
    head[1] += 8
    head[3] += 8
    head[9] += 8
    return struct.pack(">10I", *head) + out[40:]


def test_nop_tokens_are_skipped():
    blob = sample().to_dtb()
    nopped = with_nops(blob)
    ok, _ = libfdt_ok(nopped)
    assert ok and nopped != blob
    back = KHOFdt.from_dtb(nopped)
    assert back.subtrees() == sample().subtrees() and back.to_dtb() == blob


@pytest.mark.parametrize("mutate, field", [
    (lambda b: b[:100], "fdt.header.totalsize"),
    (lambda b: b[:4] + struct.pack(">I", 10_000) + b[8:], "fdt.header.totalsize"),
    (lambda b: b[:20] + struct.pack(">I", 1) + b[24:], "fdt.header.version"),
    (lambda b: b[:8] + struct.pack(">I", 57) + b[12:], "fdt.header.off_dt_struct"),
    (lambda b: b[:16] + struct.pack(">I", 44) + b[20:], "fdt.header.off_mem_rsvmap"),
])
def test_bad_headers(mutate, field):
    with pytest.raises(KHOFormatError) as err:
        parse_fdt(mutate(sample().to_dtb()))
    assert err.value.field == field


def test_nop_after_the_root_is_refused_like_libfdt():
    blob = sample().to_dtb()
    head = list(struct.unpack(">10I", blob[:40]))
    end = head[2] + head[9] - 4  # the FDT_END token
    bad = blob[:end] + struct.pack(">I", FDT_NOP) + blob[end:]
    head[1] += 4
    head[3] += 4
    head[9] += 4
    bad = struct.pack(">10I", *head) + bad[40:]
    ok, _ = libfdt_ok(bad)
    with pytest.raises(KHOFormatError) as err:
        parse_fdt(bad)
    assert not ok and err.value.field == "fdt.struct"


def test_structure_errors():
    blob = bytearray(sample().to_dtb())
    struct_off = struct.unpack(">I", blob[8:12])[0]
    for token, field in ((0x7, "fdt.struct"), (0x2, "fdt.struct")):
        bad = bytearray(blob)
        bad[struct_off:struct_off + 4] = struct.pack(">I", token)
        with pytest.raises(KHOFormatError) as err:
            parse_fdt(bytes(bad))
        assert err.value.field == field


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupt_blobs_never_crash(data):
    blob = bytearray(sample().to_dtb())
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    for _ in range(data.draw(st.integers(0, 6))):
        if blob:
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        k = KHOFdt.from_dtb(bytes(blob))
    except KHOFormatError:
        return
    k.subtrees()
    k.to_dts()
    ok, _ = libfdt_ok(bytes(blob))  # what kho accepts, libfdt accepts too
    assert ok


def test_to_dts_shows_little_endian_values():
    dts = sample().to_dts()
    assert 'compatible = "kho-v2";' in dts and "/* u64 LE 0x1000 */" in dts and "luo {" in dts


@pytest.mark.skipif(shutil.which("dtc") is None, reason="dtc not installed (apt-get install device-tree-compiler)")
@pytest.mark.parametrize("make", [lambda: sample("kho-v1").to_dtb(), lambda: sample("kho-v2").to_dtb(),
                                  lambda: with_nops(sample().to_dtb()), lambda: build_boot_dtb(0x1000, PS, 0x2000, 48)])
def test_dtc_reads_every_blob(make, tmp_path):
    path = tmp_path / "x.dtb"
    path.write_bytes(make())
    run = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Warning" not in run.stderr and "/ {" in run.stdout


# -- /chosen ---------------------------------------------------------------------------------------

def test_boot_dtb_round_trip():
    dtb = build_boot_dtb(0x8_0000_1000, PS, 0x7fff_e000, 48)
    assert parse_chosen(dtb) == ChosenKHO(0x8_0000_1000, PS, 0x7fff_e000, 48)
    ok, tree = libfdt_ok(dtb)
    chosen = tree.path_offset("/chosen")
    assert ok and bytes(tree.getprop(chosen, "linux,kho-fdt")) == struct.pack(">IIII", 8, 0x1000, 0, PS)
    assert errno_of(build_boot_dtb, -1, 0, 0, 0) == "EINVAL"


def test_chosen_with_one_cell_sizes():
    tree = libfdt.Fdt(build_boot_dtb(0, 0, 0, 0))
    tree.setprop_u32(0, "#size-cells", 1)
    chosen = tree.path_offset("/chosen")
    tree.setprop(chosen, "linux,kho-fdt", struct.pack(">III", 0, 0x5000, PS))
    tree.setprop(chosen, "linux,kho-scratch", struct.pack(">III", 1, 0, 32))
    assert parse_chosen(bytes(tree.as_bytearray())) == ChosenKHO(0x5000, PS, 1 << 32, 32)


@pytest.mark.parametrize("edit, field", [
    (lambda t: t.delprop(t.path_offset("/chosen"), "linux,kho-fdt"), "chosen.linux,kho-fdt"),
    (lambda t: t.setprop(t.path_offset("/chosen"), "linux,kho-scratch", b"\0" * 12), "chosen.linux,kho-scratch"),
    (lambda t: t.setprop_u32(0, "#address-cells", 3), "dtb.#address-cells"),
    (lambda t: t.del_node(t.path_offset("/chosen")), "dtb.chosen"),
])
def test_chosen_errors(edit, field):
    tree = libfdt.Fdt(build_boot_dtb(0x1000, PS, 0x2000, 48))
    edit(tree)
    with pytest.raises(KHOFormatError) as err:
        parse_chosen(bytes(tree.as_bytearray()))
    assert err.value.field == field


# -- the scratch array ---------------------------------------------------------------------------------

def memory():
    return PhysicalMemory([Bank(0, 64 << 20), Bank(128 << 20, 64 << 20, 1)])


def test_scratch_array_round_trip():
    m = memory()
    areas = [ScratchArea(0x200000, 0x200000, "lowmem"), ScratchArea(0x1000000, 0x400000, "global"),
             ScratchArea(130 << 20, 0x200000, "node0")]
    size = write_scratch_array(m, 0x5000, areas)
    assert size == 48 and m.read(0x5000, 16) == struct.pack("<QQ", 0x200000, 0x200000)
    assert read_scratch_array(m, 0x5000, size) == areas


SCRATCH_ERRORS = [
    ([(0x200000, 0x200000)], 20, "scratch.size"),
    ([(0x200000, 0x200000)], 0, "scratch.size"),
    ([(0x200100, 0x200000)], 16, "scratch.area"),
    ([(0x200000, 0)], 16, "scratch.size"),  # an empty entry is skipped: no area is left
    ([(60 << 20, 8 << 20)], 16, "scratch.area"),  # crosses the end of bank 0
    ([(0x200000, 0x200000), (0x300000, 0x200000)], 32, "scratch.area"),
]


def test_scratch_array_skips_empty_entries():
    """The kernel writes lowmem at index 0 and global at 1 even when one came out empty."""
    m = memory()
    m.write(0x5000, struct.pack("<QQ", 0x200000, 0x200000) + struct.pack("<QQ", 0, 0) + struct.pack("<QQ", 0x600000, 0x200000))
    areas = read_scratch_array(m, 0x5000, 48)
    assert [(a.addr, a.kind) for a in areas] == [(0x200000, "lowmem"), (0x600000, "node0")]


@pytest.mark.parametrize("entries, size, field", SCRATCH_ERRORS)
def test_scratch_array_errors(entries, size, field):
    m = memory()
    m.write(0x5000, b"".join(struct.pack("<QQ", a, s) for a, s in entries))
    with pytest.raises(KHOFormatError) as err:
        read_scratch_array(m, 0x5000, size)
    assert err.value.field == field


def test_scratch_array_outside_ram():
    with pytest.raises(KHOFormatError) as err:
        read_scratch_array(memory(), (64 << 20) - 8, 16)
    assert err.value.field == "scratch.phys"


# -- dtschema ----------------------------------------------------------------------------------------

def dt_validate(paths, limit=None):
    cmd = [shutil.which("dt-validate"), "-s", str(BINDINGS)] + (["-l", limit] if limit else []) + [str(p) for p in paths]
    run = subprocess.run(cmd, capture_output=True, text=True)
    return run.returncode, run.stderr


@pytest.mark.skipif(shutil.which("dt-validate") is None, reason="dt-validate (dtschema) not installed")
def test_bindings_accept_emitted_blobs_and_reject_broken_ones(tmp_path):
    """KHO FDTs against our bindings only (-l kho: they are not hardware trees, so the core
    root-node schema does not apply); boot DTBs against every schema, core ones included.
    Good and broken blobs go through one dt-validate run each (schema processing is slow)."""
    no_pointer = KHOFdt("kho-v2", {MAP: u64(0x1000)})
    no_pointer.add_subtree("memblock", 0x2000)
    no_pointer.tree.root.get_subnode("memblock").remove_property("preserved-data")
    wrong_prop = sample("kho-v1")
    wrong_prop.tree.root.get_subnode("memblock").remove_property("fdt")
    wrong_prop.tree.root.get_subnode("memblock").set_property("preserved-data", u64(1))
    kho_blobs = {"good-v1": sample("kho-v1").to_dtb(), "good-v2": sample("kho-v2").to_dtb(),
                 "no-pointer": no_pointer.to_dtb(), "wrong-prop": wrong_prop.to_dtb()}
    half = libfdt.Fdt(build_boot_dtb(0x1000, PS, 0x2000, 48))
    half.delprop(half.path_offset("/chosen"), "linux,kho-scratch")
    boot_blobs = {"good-boot": build_boot_dtb(0x1000, PS, 0x2000, 48), "half-boot": bytes(half.as_bytearray())}
    for name, blob in {**kho_blobs, **boot_blobs}.items():
        (tmp_path / f"{name}.dtb").write_bytes(blob)
    _, kho_err = dt_validate([tmp_path / f"{n}.dtb" for n in kho_blobs], "kho")
    _, boot_err = dt_validate([tmp_path / f"{n}.dtb" for n in boot_blobs])
    assert "good-v1" not in kho_err and "good-v2" not in kho_err and "good-boot" not in boot_err, kho_err + boot_err
    assert "no-pointer.dtb" in kho_err and "wrong-prop.dtb" in kho_err and "required property" in kho_err
    assert "half-boot.dtb" in boot_err and "linux,kho-scratch" in boot_err


REAL_ARM64_DTB = (Path(__file__).parent / "fixtures" / "linux-7.3-arm64" / "next-kernel-dtb-0x5d600000.dtb").read_bytes()


def chosen_property_names(tree: libfdt.Fdt) -> list[str]:
    """``/chosen``'s property names in blob order (pylibfdt)."""
    names, off = [], tree.first_property_offset(tree.path_offset("/chosen"))
    while off >= 0:
        names.append(tree.get_property_by_offset(off).name)
        off = tree.next_property_offset(off, libfdt.QUIET_NOTFOUND)
    return names


def test_boot_dtb_chosen_as_a_real_7_3_arm64_kexec_writes_it():
    """Same /chosen properties in the same order, the KHO pairs in the same cells, as the DTB a
    real Linux 7.3 kexec_file_load built (QEMU's own stdout-path aside)."""
    real = libfdt.Fdt(REAL_ARM64_DTB)
    real_chosen = real.path_offset("/chosen")
    real_props = chosen_property_names(real)
    real_kho = {name: bytes(real.getprop(real_chosen, name)) for name in ("linux,kho-fdt", "linux,kho-scratch")}
    initrd_start = int.from_bytes(bytes(real.getprop(real_chosen, "linux,initrd-start")), "big")
    initrd_end = int.from_bytes(bytes(real.getprop(real_chosen, "linux,initrd-end")), "big")
    mine = libfdt.Fdt(build_boot_dtb(0x409CE000, 0x1000, 0x5D7F0000, 0x30, initrd=(initrd_start, initrd_end - initrd_start),
                                     bootargs="console=ttyAMA0"))
    chosen = mine.path_offset("/chosen")
    assert chosen_property_names(mine) == [p for p in real_props if p != "stdout-path"]
    assert {name: bytes(mine.getprop(chosen, name)) for name in real_kho} == real_kho
    assert [mine.get_mem_rsv(i) for i in range(mine.num_mem_rsv())] == [real.get_mem_rsv(i) for i in range(real.num_mem_rsv())]
    assert len(mine.getprop(chosen, "rng-seed")) == len(real.getprop(real_chosen, "rng-seed"))
