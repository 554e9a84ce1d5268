"""kho.dumps.extract: the KHO FDT, sub-node blobs, scratch array and units as files."""

import shutil
import subprocess
from pathlib import Path

import pytest
from test_dumps import build, write_boot_params

from kho.devicetree.flat import parse_fdt
from kho.dumps import open_dump
from kho.dumps.debugfs import DebugfsHandover
from kho.dumps.extract import extract
from kho.dumps.find import SubNode
from kho.dumps.writers import write_raw
from kho.errors import KHOError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "linux-7.3-x86_64"


def test_extract_the_real_handover(tmp_path):
    with open_dump(FIXTURES / "mem-stage1-handover.raw.zst") as dump:
        found = dump.handover()
        written = extract(found, dump.memory, tmp_path / "out")
    names = sorted(str(Path(p).relative_to(tmp_path / "out")) for p in written)
    assert names == ["fdt.dtb", "sub_fdts/LUO.bin", "sub_fdts/kexec-metadata.bin", "sub_fdts/kho_test.dtb",
                     "sub_fdts/memblock.dtb", "units.txt"]
    fdt = (tmp_path / "out" / "fdt.dtb").read_bytes()
    assert len(fdt) == 405 and parse_fdt(fdt).root.get_subnode("LUO") is not None
    units = sorted((tmp_path / "out" / "units.txt").read_text().splitlines())
    kernel = sorted(f"{int(p, 16):#x} {o}" for p, o in (line.split() for line in
                                                         (FIXTURES / "units-0x344000.txt").read_text().splitlines()))
    assert units == kernel
    assert (tmp_path / "out" / "sub_fdts" / "LUO.bin").read_bytes()[:6] == b"luo-v5"
    if shutil.which("dtc"):
        for name in ("fdt.dtb", "sub_fdts/kho_test.dtb", "sub_fdts/memblock.dtb"):
            dts = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(tmp_path / "out" / name)], capture_output=True,
                                 text=True, check=True).stdout
            assert "compatible" in dts


def test_extract_writes_the_handed_over_scratch_array(tmp_path):
    m, handover, _ = build()
    params, chain = m.allocator.alloc_pages(0), m.allocator.alloc_pages(0)
    write_boot_params(m.memory, params, chain, (handover.fdt_phys, 4096), (handover.scratch_phys, handover.scratch_size))
    write_raw(m.memory, tmp_path / "mem.raw")
    with open_dump(tmp_path / "mem.raw") as dump:
        extract(dump.handover(), dump.memory, tmp_path / "out")
    assert (tmp_path / "out" / "scratch.bin").read_bytes() == m.memory.read(handover.scratch_phys, handover.scratch_size)


def test_extract_from_debugfs_and_name_collisions(tmp_path):
    (tmp_path / "in" / "sub_fdts").mkdir(parents=True)
    fdt = (FIXTURES / "debugfs" / "out__fdt").read_bytes()
    (tmp_path / "in" / "fdt").write_bytes(fdt)
    (tmp_path / "in" / "sub_fdts" / "LUO").write_bytes(b"luo-v5\0\0" + bytes(24))
    source = open_dump(tmp_path / "in")
    extract(source, None, tmp_path / "out")
    assert (tmp_path / "out" / "fdt.dtb").read_bytes() == fdt  # truncated as the kernel shows it
    assert (tmp_path / "out" / "sub_fdts" / "LUO.bin").stat().st_size == 32
    clash = DebugfsHandover("x", fdt, len(fdt), None, None, False, [], [SubNode("a b", None, 1, b"1", "binary"),
                                                                        SubNode("a_b", None, 1, b"2", "binary")], [], [])
    with pytest.raises(KHOError, match="would overwrite sub_fdts/a_b.bin") as err:
        extract(clash, None, tmp_path / "clash")
    assert err.value.errno_name == "EEXIST"
