"""kho dump shows every sub-node decoded (text, --json, --dts with the sub-FDTs nested), on
images from kho simulate and kho serialize; bad sub-nodes are errors in the output, not
tracebacks; strings from the image are escaped before rich renders them."""

import json
import shutil
import subprocess

import pytest

from kho.cli.main import main
from kho.currentkernel.machine import Machine
from kho.handover.imagefile import save_image
from kho.handover.outgoing import KHO
from kho.simulation import system as SY
from kho.subsystems.kexec_metadata import pack_kexec_metadata
from kho.subsystems.kho_test import write_kho_test

MIB, GIB = 1 << 20, 1 << 30


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module", params=["arm64", "x86_64"])
def sim_image(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("dump") / f"{request.param}.kho"
    code = main(["simulate", "--ram", "1G", "--preserve", "8M", "--image-size", "8M", "--no-checks", "--json",
                 "--arch", request.param, "--save-image", str(path)])
    assert code == 0
    return path, request.param


def test_json_names_every_decoded_field(capsys, sim_image):
    path, arch = sim_image
    code, out, _ = run(capsys, "dump", path, "--json")
    report = json.loads(out)
    assert code == 0 and report["arch"] == arch and report["compatible"] == "kho-v4"
    assert report["source"]["format"] == "kho" and report["fdt_phys"] > 0
    assert report["units_by_order"]["11"] == 1  # the 8 MiB-aligned reserve_mem region
    subs = {s["name"]: s for s in report["subtrees"]}
    assert [s["name"] for s in report["subtrees"]] == ["memblock", "LUO", "kho_test", "kexec-metadata"]
    for s in report["subtrees"]:
        assert set(s) >= {"name", "phys", "size", "format", "decoded"} and s["error"] is None
    assert subs["memblock"]["format"] == "fdt" and subs["LUO"]["format"] == "binary"
    (region,) = subs["memblock"]["decoded"]["regions"]
    assert region["name"] == "kho_sim_big" and region["size"] == 8 * MIB and region["start"] % (8 * MIB) == 0
    meta = subs["kexec-metadata"]["decoded"]
    assert meta == {"version": 1, "previous_release": "7.3.0-kho-sim", "kexec_count": 1}
    luo = subs["LUO"]["decoded"]
    assert luo["liveupdate_num"] == 1 and luo["sessions_pa"]  # saved after LUO serialized at reboot
    files = {(s["name"], f["token"]): f for s in luo["sessions"] for f in s["files"]}
    assert set(files) == {(s, t) for s, t, _, _ in SY.MEMFDS}
    for session, token, size, seals in SY.MEMFDS:
        f = files[(session, token)]
        assert f["compatible"] == "memfd-v2" and f["data"] > 0
        assert f["memfd"]["size"] == size and f["memfd"]["seals"] == seals
        assert f["memfd"]["nr_folios"] == -(-size // 4096)
    test = subs["kho_test"]
    assert test["decoded"]["nr_folios"] == len(test["decoded"]["folios"]) > 0
    assert test["checksum"]["ok"] and test["checksum"]["computed"] == test["decoded"]["csum"]
    assert test["checksum"]["implementation"] == {"arm64": "generic", "x86_64": "x86_64"}[arch]


def test_text_shows_sessions_files_memfds_regions_and_checksum(capsys, sim_image):
    path, _ = sim_image
    code, out, _ = run(capsys, "dump", path)
    assert code == 0
    for needle in ('session "kho-sim-db": 2 file(s)', "memfd (memfd-v2): size 10,000 bytes", "(SEAL|SHRINK|GROW)",
                   "kho_sim_big: 0x", 'previous_release "7.3.0-kho-sim", kexec_count 1', "verified", "liveupdate_num 1"):
        assert needle in out, needle


def test_dts_nests_the_sub_fdts(capsys, sim_image):
    path, _ = sim_image
    code, out, _ = run(capsys, "dump", path, "--dts")
    assert code == 0 and out.startswith("/dts-v1/;")
    assert out.count("\t\tblob {") == 2  # memblock and kho_test are FDTs; LUO and kexec-metadata are not
    assert '\t\t\tcompatible = "memblock-v1";' in out and '\t\t\tcompatible = "kho-test-v1";' in out
    assert "\t\t\tkho_sim_big {" in out and "\t\t\t\tnr_folios = [" in out
    if shutil.which("dtc"):
        done = subprocess.run(["dtc", "-I", "dts", "-O", "dtb", "-o", "/dev/null", "-"], input=out.encode(),
                              capture_output=True, check=False)
        assert done.returncode == 0, done.stderr


@pytest.fixture
def bad_image(tmp_path):
    """A 7.3 handover whose sub-nodes are a markup-like name, a wrong kexec-metadata version,
    a LUO blob that is not luo-v5, a memblock blob that is not an FDT, and a self-test whose
    folio changed after its checksum was taken."""
    m = Machine.boot(512 * MIB, seed=2)
    kho = KHO(m.memory, m.allocator)
    kho.add_blob("zzzz", b"[bold]not markup[/bold]\0")  # renamed "[/x]" below: kho's writer refuses that name
    kho.add_blob("kexec-metadata", b"\x02" + pack_kexec_metadata("7.3.0", 1)[1:])
    kho.add_blob("LUO", b"luo-v9".ljust(32, b"\0"))
    kho.add_blob("memblock", b"\xd0\x0d\xfe\xed" + bytes(60))
    test = write_kho_test(m.memory, m.allocator, kho.tracker, 2 * MIB, seed=1, arch="generic")
    kho.add_subtree("kho_test", test.phys, test.size)
    m.memory.write(test.folios[0][0], b"\x01\x02\x03\x04")
    handover = kho.finalize()
    page = m.memory.read(handover.fdt_phys, m.memory.page_size)
    m.memory.write(handover.fdt_phys, page.replace(b"zzzz\0", b"[/x]\0"))
    path = tmp_path / "bad.kho"
    save_image(str(path), handover)
    return path


def test_bad_sub_nodes_are_errors_not_tracebacks(capsys, bad_image):
    code, out, err = run(capsys, "dump", bad_image)  # strict: the root FDT's node name is refused
    assert code == 3 and out == "" and err.startswith("kho: ") and "fdt.node.name" in err and err.count("\n") == 1
    code, out, err = run(capsys, "dump", bad_image, "--json", "--lenient")
    assert code == 0 and err == ""
    subs = {s["name"]: s for s in json.loads(out)["subtrees"]}
    assert subs["[/x]"]["decoded"] is None and subs["[/x]"]["error"] is None
    assert "kexec-metadata.version" in subs["kexec-metadata"]["error"]
    assert "luo.compatible" in subs["LUO"]["error"]
    assert subs["memblock"]["error"] and subs["memblock"]["decoded"] is None
    assert not subs["kho_test"]["checksum"]["ok"]
    code, out, err = run(capsys, "dump", bad_image, "--lenient")
    assert code == 0 and err == ""
    assert "[/x]" in out and "[bold]not markup" not in out  # the name printed as it is
    assert "not decoded: kho has no reader" in out and "MISMATCH" in out
    assert out.count("error: ") == 3
    code, out, err = run(capsys, "dump", bad_image, "--dts", "--lenient")
    assert code == 0 and "\t[/x] {" in out


def test_serialized_image_without_sub_nodes(capsys, tmp_path):
    path = tmp_path / "s.kho"
    assert main(["serialize", "--ram", "1G", "--preserve-random", "4M", "--out", str(path)]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "dump", path, "--json")
    assert code == 0 and json.loads(out)["subtrees"] == []
    code, out, _ = run(capsys, "dump", path)
    assert code == 0 and "sub-nodes (0)" in out
