"""kho check and kho extract on dumps, kho images and debugfs directories, through the CLI."""

import json
from pathlib import Path

import pytest
from test_dumps import build

from kho.cli.main import main
from kho.dumps.writers import write_raw
from kho.handover.imagefile import save_image

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "linux-7.3-x86_64"
FIXTURE = FIXTURES / "mem-stage1-handover.raw.zst"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "realkernel" / "linux-7.3-x86_64"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_the_real_handover(capsys):
    code, out, err = run(capsys, "check", FIXTURE)
    assert code == 0 and not err
    assert "KHO FDT 0x344000 [kho-v4]: 141 preserved units" in out and "ok: every referenced range is preserved" in out
    code, out, _ = run(capsys, "check", FIXTURE, "--json", "--fdt", "0x344000")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and report["findings"] == [] and report["source"]["format"] == "zstd"
    assert len(report["unreferenced"]) == 69


def test_check_finds_an_unpreserved_blob(capsys, tmp_path):
    m, handover, _ = build()
    m.memory.write(0x1000000, b"not preserved")
    kho_fdt = handover.kho_fdt()
    kho_fdt.add_subtree("external", 0x1000000, 13)
    m.memory.write(handover.fdt_phys, kho_fdt.to_dtb())
    write_raw(m.memory, tmp_path / "mem.raw")
    code, out, _ = run(capsys, "check", tmp_path / "mem.raw", "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert [(f["kind"], f["phys"], f["size"]) for f in report["findings"]] == [("not-preserved", 0x1000000, 13)]
    code, out, _ = run(capsys, "check", tmp_path / "mem.raw")
    assert code == 1 and "not-preserved: external blob: 13 of its 13 bytes" in out


def test_check_a_kho_image(capsys, tmp_path):
    _, handover, _ = build()
    save_image(tmp_path / "h.kho", handover)
    code, out, _ = run(capsys, "check", tmp_path / "h.kho")
    assert code == 0 and "kho handover image" in out


@pytest.mark.parametrize("argv, message", [
    (["check", "/nonexistent/dump"], "no such file"),
    (["check", FIXTURES / "debugfs"], "without an 'fdt' file"),
    (["check", FIXTURE, "--ram", "0x0+1G"], "not inside the dump"),
    (["check", FIXTURE, "--fdt", "0x343000"], "no KHO FDT at the requested address"),
    (["extract", FIXTURE, "--base", "0x123", "--out", "/tmp"], "not a page-aligned"),
])
def test_bad_input_is_one_line_and_exit_3(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 3 and not out and err.startswith("kho: ") and err.count("\n") == 1 and message in err


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["check", str(FIXTURE), "--ram", "nonsense"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        main(["extract", str(FIXTURE)])  # --out is required


def test_check_refuses_debugfs(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fdt").write_bytes((FIXTURES / "kho-fdt-0x344000.dtb").read_bytes())
    code, _, err = run(capsys, "check", tmp_path / "out")
    assert code == 3 and "no memory map to check" in err


def test_extract(capsys, tmp_path):
    code, out, _ = run(capsys, "extract", FIXTURE, "--out", tmp_path / "x")
    assert code == 0
    files = [line for line in out.splitlines() if not line.startswith("note: ")]
    assert sorted(Path(p).relative_to(tmp_path / "x").as_posix() for p in files) == [
        "fdt.dtb", "sub_fdts/LUO.bin", "sub_fdts/kexec-metadata.bin", "sub_fdts/kho_test.dtb",
        "sub_fdts/memblock.dtb", "units.txt"]
    assert (tmp_path / "x" / "fdt.dtb").read_bytes() == (FIXTURES / "kho-fdt-0x344000.dtb").read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "fdt").write_bytes((FIXTURES / "debugfs" / "out__fdt").read_bytes())
    code, out, _ = run(capsys, "extract", tmp_path / "in", "--out", tmp_path / "y")
    assert code == 0 and "holds 233 of the FDT's 405 bytes" in out


@pytest.mark.skipif(not (SHARED / "mem-stage1.raw.zst").is_file(), reason="needs ../shared/realkernel")
def test_the_full_shared_dump_through_the_cli(capsys, tmp_path):
    code, out, _ = run(capsys, "check", SHARED / "mem-stage1.raw.zst", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["units"] == 141 and report["fdt_phys"] == 0x344000
    code, out, _ = run(capsys, "extract", SHARED / "mem-stage1.raw.zst", "--out", tmp_path / "x")
    assert code == 0
    assert (tmp_path / "x" / "fdt.dtb").read_bytes() == (SHARED / "kho-fdt-0x344000.dtb").read_bytes()
    units = sorted((tmp_path / "x" / "units.txt").read_text().splitlines())
    assert units == sorted(f"{int(p, 16):#x} {o}" for p, o in (line.split() for line in
                                                                (SHARED / "units-0x344000.txt").read_text().splitlines()))
