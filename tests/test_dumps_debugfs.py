"""kho.dumps on debugfs kho/out and kho/in directories, including the truncated out/fdt."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_dumps import build, sub_fdt

from kho.dumps import open_dump, read_debugfs
from kho.errors import KHOError, KHOFormatError

SHARED_BLOBS = Path(__file__).resolve().parents[2] / "shared" / "realkernel" / "linux-7.3-x86_64" / "blobs"


def debugfs_dir(root: Path, fdt: bytes, blobs: dict[str, bytes], scratch=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "fdt").write_bytes(fdt)
    (root / "sub_fdts").mkdir(exist_ok=True)
    for name, data in blobs.items():
        (root / "sub_fdts" / name).write_bytes(data)
    if scratch is not None:
        (root / "scratch_phys").write_bytes(np.array([a for a, _ in scratch], "<u8").tobytes())
        (root / "scratch_len").write_bytes(np.array([s for _, s in scratch], "<u8").tobytes())
    return root


@pytest.fixture(scope="module")
def kernel_out():
    """What kho's handover would show in debugfs: its FDT blob and the sub-node blobs."""
    m, handover, _ = build()
    fdt = handover.kho_fdt()
    blob = fdt.to_dtb()
    blobs = {name: m.memory.read(phys, fdt.subtree_size(name)) for name, phys in fdt.subtrees().items()}
    return handover, blob, blobs


def test_whole_directory(kernel_out, tmp_path):
    handover, blob, blobs = kernel_out
    d = debugfs_dir(tmp_path / "out", blob, blobs, scratch=[(0x1000000, 0x200000), (0x4000000, 0x400000)])
    found = open_dump(d)
    assert found.format == "debugfs" and not found.truncated and found.compatible == "kho-v2"
    assert found.fdt.subtrees() == handover.subtrees
    assert {n.name: (n.phys, n.size, n.format, n.compatible) for n in found.subnodes} == {
        "memblock": (handover.subtrees["memblock"], len(blobs["memblock"]), "fdt", "memblock-v1"),
        "workload": (handover.subtrees["workload"], 32, "binary", "luo-v5"),
    }
    assert [(a.addr, a.size, a.kind) for a in found.scratch] == [(0x1000000, 0x200000, "lowmem"),
                                                                 (0x4000000, 0x400000, "global")]


def test_truncated_out_fdt(kernel_out, tmp_path):
    _, blob, blobs = kernel_out
    cut = len(blob) - 60  # the strings block and the end of the structure are missing
    found = read_debugfs(debugfs_dir(tmp_path / "out", blob[:cut], blobs))
    assert found.truncated and found.fdt is None and found.totalsize == len(blob)
    assert found.notes and f"holds {cut} of the FDT's {len(blob)} bytes" in found.notes[0]
    assert found.compatible == "kho-v2"
    assert [n.name for n in found.partial][:2] == ["/", "/memblock"]
    assert any(name.startswith("<nameoff") for name in found.partial[0].props)
    assert {n.name for n in found.subnodes} == set(blobs)  # the sub-node blobs are whole


def test_scratch_files_of_different_lengths_are_noted(kernel_out, tmp_path):
    _, blob, blobs = kernel_out
    d = debugfs_dir(tmp_path / "out", blob, blobs)
    (d / "scratch_phys").write_bytes(bytes(16))
    (d / "scratch_len").write_bytes(bytes(8))
    found = read_debugfs(d)
    assert found.scratch == [] and "not two u64 arrays" in found.notes[-1]


@pytest.mark.parametrize("content, match", [
    (None, "without an 'fdt' file"),
    (b"", "not an FDT"),
    (sub_fdt("memblock-v1"), "none of"),
    (b"not an fdt at all" * 4, "not an FDT"),
    (b"\xd0\x0d\xfe\xed" + bytes(60), "fdt.header"),
])
def test_bad_directories(tmp_path, content, match):
    d = tmp_path / "in"
    d.mkdir()
    if content is not None:
        (d / "fdt").write_bytes(content)
    with pytest.raises(KHOFormatError, match=match):
        open_dump(d)


def test_a_directory_takes_no_base(kernel_out, tmp_path):
    _, blob, blobs = kernel_out
    d = debugfs_dir(tmp_path / "out", blob, blobs)
    with pytest.raises(KHOError, match="no physical addresses"):
        open_dump(d, base=0)


@pytest.mark.skipif(not SHARED_BLOBS.is_dir(), reason="needs ../shared/realkernel")
def test_real_kernel_debugfs(tmp_path):
    out = tmp_path / "out"
    (out / "sub_fdts").mkdir(parents=True)
    shutil.copy(SHARED_BLOBS / "out__fdt", out / "fdt")
    for name in ("LUO", "kexec-metadata", "kho_test", "memblock"):
        shutil.copy(SHARED_BLOBS / f"out__sub_fdts__{name}", out / "sub_fdts" / name)
    found = open_dump(out)
    assert found.truncated and (len(found.fdt_bytes), found.totalsize) == (233, 405) and found.compatible == "kho-v4"
    assert [n.name for n in found.partial] == ["/", "/memblock", "/LUO", "/kho_test"]
    assert {n.name: (n.format, n.compatible) for n in found.subnodes} == {
        "LUO": ("binary", "luo-v5"), "kexec-metadata": ("binary", None),
        "kho_test": ("fdt", "kho-test-v1"), "memblock": ("fdt", "memblock-v1")}
    nodes = {n.name: n for n in found.subnodes}  # each blob decoded alone: what points elsewhere is named
    assert nodes["memblock"].decoded.to_json()["regions"][0]["name"] == "realk_small"
    assert nodes["kexec-metadata"].decoded.to_json()["previous_release"] == "7.3.0-rc7"
    assert "luo.flbs_pa" in nodes["LUO"].error and "debugfs holds the blob only" in nodes["LUO"].error
    assert "kho_test.folios_info" in nodes["kho_test"].error
    whole = tmp_path / "in"
    (whole / "sub_fdts").mkdir(parents=True)
    shutil.copy(SHARED_BLOBS / "in__fdt", whole / "fdt")
    for name in os.listdir(out / "sub_fdts"):
        shutil.copy(SHARED_BLOBS / f"in__sub_fdts__{name}", whole / "sub_fdts" / name)
    found = open_dump(whole)
    assert not found.truncated and found.fdt.compatible == "kho-v4"
    # the same addresses as in the first kernel's memory (the dump's FDT at 0x344000)
    assert found.fdt.subtrees() == {"kexec-metadata": 0x34a000, "kho_test": 0x2fc000, "LUO": 0x3563000,
                                    "memblock": 0x2de1000}
    assert {n.name: n.size for n in found.subnodes} == {"kexec-metadata": 73, "kho_test": 240, "LUO": 32, "memblock": 214}


def test_debugfs_json(kernel_out, tmp_path):
    _, blob, blobs = kernel_out
    found = read_debugfs(debugfs_dir(tmp_path / "out", blob[:len(blob) - 60], blobs)).to_json()
    assert found["source"]["format"] == "debugfs" and found["truncated"] and found["totalsize"] == len(blob)
    assert found["partial"][0]["node"] == "/" and {s["name"] for s in found["subtrees"]} == set(blobs)
    assert json.loads(json.dumps(found)) == found
