"""kho units, dump and boot on every format open_dump recognises (issue 13 items 1, 6, 7, 8):
raw, zstd and ELF-core dumps written from the reduced real-kernel fixture give the same
units and sub-nodes; --json fields; the next kernel booted on a dump; a kcore-like ELF
file through --live; bad input exits 3 with one kho: line."""

import json
from pathlib import Path

import pytest
from test_dumps import build

from kho.abi.elf import ELF64_EHDR, ELF64_PHDR
from kho.cli.main import main
from kho.dumps import open_dump
from kho.dumps.cut import cut, referenced_pages
from kho.dumps.writers import elf_note, write_elf_core, write_raw, write_zstd
from kho.handover.imagefile import save_image

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "linux-7.3-x86_64"
FIXTURE = FIXTURES / "mem-stage1-handover.raw.zst"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "realkernel" / "linux-7.3-x86_64"
#: x86_64's linear map (page_offset_base without KASLR), for the kcore-like file.
PAGE_OFFSET = 0xFFFF888000000000
#: Scratch areas for the reduced fixture, clear of its preserved units.
SCRATCH = "0x10000000+128M"
#: The real kernel's scratch areas (lowmem, global, node0), as the shared README gives them.
REAL_SCRATCH = "0x1b400000+32M,0x19400000+32M,0x17400000+32M"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """The fixture's handover pages written as raw, zstd and ELF core, plus the fixture itself."""
    d = tmp_path_factory.mktemp("formats")
    with open_dump(FIXTURE) as dump:
        memory = cut(dump.memory, referenced_pages(dump.handover(), dump.page_size))
    write_raw(memory, d / "mem.raw")
    write_zstd(memory, d / "mem.raw.zst", level=3)
    write_elf_core(memory, d / "mem.elf")
    return {"raw": d / "mem.raw", "zstd": d / "mem.raw.zst", "elf": d / "mem.elf", "fixture": FIXTURE}


#: Where /proc/kcore maps the kernel text on x86_64 (``__START_KERNEL_map`` + 16 MiB), and the
#: physical address and size of the text the kcore-like file maps there.
KERNEL_TEXT_VADDR, KERNEL_TEXT_PHYS, KERNEL_TEXT_SIZE = 0xFFFFFFFF81000000, 0x1000000, 2 << 20


def kcore_like(memory, path: Path) -> None:
    """An ELF core as /proc/kcore lays it out (fs/proc/kcore.c): a PT_NOTE (CORE prstatus,
    VMCOREINFO), then one PT_LOAD per RAM range at its linear-map address with its p_paddr,
    the kernel text at __START_KERNEL_map with p_paddr = its physical address (the same
    memory as RAM, mapped twice), and vmalloc and vmemmap segments whose p_paddr is -1."""
    ps = memory.page_size
    note = elf_note(b"CORE", 1, bytes(336)) + elf_note(b"VMCOREINFO", 0, b"OSRELEASE=7.3.0-rc7\nPAGESIZE=4096\n")
    ram = [(b.start, b.size) for b in memory.banks]
    write_elf_core(memory, path, segments=ram + [(KERNEL_TEXT_PHYS, KERNEL_TEXT_SIZE), (0, ps), (0, ps)], note=note)
    data = bytearray(path.read_bytes())
    unmapped = {len(ram) + 1: 0xFFFFC90000000000, len(ram) + 2: 0xFFFFEA0000000000}  # vmalloc, vmemmap
    for i in range(len(ram) + 3):
        at = ELF64_EHDR.size + (i + 1) * ELF64_PHDR.size  # header 0 is the PT_NOTE
        p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = ELF64_PHDR.unpack_from(data, at)
        if i in unmapped:
            p_vaddr, p_paddr = unmapped[i], (1 << 64) - 1
        elif i == len(ram):
            p_vaddr = KERNEL_TEXT_VADDR
        else:
            p_vaddr = PAGE_OFFSET + p_paddr
        ELF64_PHDR.pack_into(data, at, p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fmt", ["raw", "zstd", "elf"])
def test_units_and_subnodes_are_the_same_in_every_format(capsys, dumps, fmt):
    code, reference, _ = run(capsys, "units", dumps["fixture"])
    assert code == 0 and len(reference.splitlines()) == 141
    code, out, err = run(capsys, "units", dumps[fmt])
    assert code == 0 and not err and out == reference
    code, out, _ = run(capsys, "dump", dumps["fixture"], "--json")
    want = json.loads(out)
    code, out, _ = run(capsys, "dump", dumps[fmt], "--json")
    got = json.loads(out)
    assert code == 0 and got["source"]["format"] == fmt and want["source"]["format"] == "zstd"
    assert got["fdt_phys"] == 0x344000 and got["compatible"] == "kho-v4"
    assert got["units_by_order"] == want["units_by_order"] and sum(got["units_by_order"].values()) == 141
    assert [(s["name"], s["phys"], s["size"], s["format"], s["decoded"]) for s in got["subtrees"]] == \
        [(s["name"], s["phys"], s["size"], s["format"], s["decoded"]) for s in want["subtrees"]]


def test_dump_json_fields_of_a_real_dump(capsys, dumps):
    code, out, _ = run(capsys, "dump", dumps["raw"], "--json")
    report = json.loads(out)
    assert code == 0 and report["arch"] == "x86_64" and report["handoff"] is None
    subtrees = {s["name"]: s for s in report["subtrees"]}
    assert set(subtrees) == {"memblock", "LUO", "kho_test", "kexec-metadata"}
    assert subtrees["memblock"]["decoded"]["regions"] == [{"name": "realk_small", "start": 0x1D6F9000, "size": 0x107000}]
    assert subtrees["kexec-metadata"]["decoded"]["previous_release"] == "7.3.0-rc7"
    assert subtrees["LUO"]["decoded"]["sessions"] == []
    assert subtrees["kho_test"]["format"] == "fdt" and subtrees["kho_test"]["decoded"]["nr_folios"] == 60
    assert [c["kind"] for c in report["candidates"]].count("kho") == 1
    code, out, _ = run(capsys, "dump", dumps["raw"])
    assert code == 0 and "0x344000" in out and "realk_small" in out and "scratch areas unknown" in out
    code, out, _ = run(capsys, "dump", dumps["elf"], "--dts")
    assert code == 0 and 'compatible = "kho-v4";' in out and 'compatible = "memblock-v1";' in out


def test_dump_json_of_a_kho_image_has_the_same_fields(capsys, tmp_path):
    _, handover, reference = build()
    save_image(tmp_path / "h.kho", handover)
    code, out, _ = run(capsys, "dump", tmp_path / "h.kho", "--json")
    report = json.loads(out)
    assert code == 0 and report["source"]["format"] == "kho"
    assert report["fdt_phys"] == handover.fdt_phys and report["compatible"] == "kho-v2"
    assert sum(report["units_by_order"].values()) == len(reference)
    assert {s["name"] for s in report["subtrees"]} == {"workload", "memblock"}
    assert all({"name", "phys", "size", "format", "decoded"} <= set(s) for s in report["subtrees"])


@pytest.mark.parametrize("fmt", ["raw", "elf"])
def test_boot_on_a_dump(capsys, dumps, fmt):
    size = dumps[fmt].stat().st_size
    code, out, err = run(capsys, "boot", dumps[fmt], "--scratch", SCRATCH, "--json")
    report = json.loads(out)
    assert code == 0 and not err and report["revived"] and report["source"]["format"] == fmt
    assert report["preserved_units"] == 141 and report["scratch_source"] == "given (--scratch)"
    assert report["scratch"] == [{"addr": 0x10000000, "size": 128 << 20, "kind": "lowmem"}]
    restores = {s["name"]: s for s in report["subnodes"]}
    assert restores["memblock"]["restored"] and restores["memblock"]["regions"][0]["name"] == "realk_small"
    assert restores["kexec-metadata"]["restored"] and restores["LUO"]["restored"]
    # the reduced fixture left the self-test's folio contents out: the checksum cannot match
    assert not restores["kho_test"]["restored"] and "checksum" in restores["kho_test"]["error"]
    assert restores["kho_test"]["implementation"] == "x86_64" and restores["kho_test"]["computed"] == 0
    assert report["overlay_pages"] >= 1 and dumps[fmt].stat().st_size == size
    code, out, _ = run(capsys, "boot", dumps[fmt], "--scratch", SCRATCH)
    assert code == 0 and "realk_small" in out and "sub-nodes restored" in out


def test_boot_without_scratch_areas_says_what_is_missing(capsys, dumps):
    code, out, err = run(capsys, "boot", dumps["zstd"])
    assert code == 3 and not out and err.count("\n") == 1
    assert err.startswith("kho: ") and "no handoff" in err and "--scratch" in err


@pytest.mark.parametrize("scratch, message", [
    ("0x343000+64M", "overlaps preserved memory"),  # over the map: the scratch array would overwrite it
    ("0x10000000+4K", "ENOMEM"),  # no room for the next kernel's image
    ("0x1fffff000+8K", "outside RAM"),
    ("0x10000001+1M", "not page-aligned"),
    ("0x10000000+1M,0x10000000+1M", "overlap"),
])
def test_boot_refuses_bad_scratch_areas(capsys, dumps, scratch, message):
    code, out, err = run(capsys, "boot", dumps["raw"], "--scratch", scratch)
    assert code == 3 and not out and err.count("\n") == 1 and message in err and "Traceback" not in err


def test_live_reads_a_kcore_like_file(capsys, tmp_path, monkeypatch, dumps):
    with open_dump(dumps["raw"]) as dump:
        memory = cut(dump.memory, referenced_pages(dump.handover(), dump.page_size))
    kcore_like(memory, tmp_path / "kcore")
    monkeypatch.setenv("KHO_KCORE", str(tmp_path / "kcore"))
    code, out, err = run(capsys, "dump", "--live", "--json")
    report = json.loads(out)
    assert code == 0 and report["source"]["format"] == "elf" and report["fdt_phys"] == 0x344000
    assert "2 without a physical address skipped" in report["source"]["description"]
    assert sum(report["units_by_order"].values()) == 141
    # /proc/kcore cannot be mapped: the scan reads its windows instead, to the same result
    scans = []

    def refuse(*args, **kwargs):
        scans.append(args)
        raise OSError(19, "No such device")

    monkeypatch.setattr("kho.dumps.sources.mmap.mmap", refuse)
    code, out, _ = run(capsys, "dump", "--live", "--json")
    assert code == 0 and scans and json.loads(out)["units_by_order"] == report["units_by_order"]


def test_live_without_access(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KHO_KCORE", str(tmp_path / "no-kcore"))
    code, out, err = run(capsys, "dump", "--live")
    assert code == 3 and not out and err.startswith("kho: ENOENT") and err.count("\n") == 1 and "--live: cannot read" in err


@pytest.mark.parametrize("command", ["units", "dump", "boot", "check", "extract"])
@pytest.mark.parametrize("argv, message", [
    (["--live", FIXTURE], "not allowed with argument"),
    ([], "one of the arguments PATH --live is required"),
])
def test_path_or_live_is_a_usage_error(capsys, tmp_path, command, argv, message):
    extra = ["--out", str(tmp_path)] if command == "extract" else []
    with pytest.raises(SystemExit) as exc:
        main([command, *map(str, argv), *extra])
    _, err = capsys.readouterr()
    assert exc.value.code == 2 and message in err and "Traceback" not in err


def bad_inputs(tmp_path: Path) -> dict:
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "short").write_bytes(b"x" * 100)
    (tmp_path / "cut.zst").write_bytes(FIXTURE.read_bytes()[:5000])
    exe = bytearray(b"\x7fELF\x02\x01\x01" + bytes(9) + (2).to_bytes(2, "little") + bytes(ELF64_EHDR.size - 18))
    (tmp_path / "exe").write_bytes(bytes(exe))
    (tmp_path / "zeros").write_bytes(bytes(1 << 16))
    (tmp_path / "vmcore.kdump").write_bytes(b"KDUMP   " + bytes(1 << 13))
    (tmp_path / "vmcore.flat").write_bytes(b"makedumpfile\0\0\0\0" + bytes(1 << 13))
    (tmp_path / "debugfs").mkdir()
    (tmp_path / "debugfs" / "fdt").write_bytes((FIXTURES / "kho-fdt-0x344000.dtb").read_bytes())
    return {"empty": "empty file", "short": "less than one", "cut.zst": "zstd", "exe": "not a core dump",
            "zeros": "no KHO FDT", "debugfs": "debugfs directory", "missing": "no such file",
            "vmcore.kdump": "block_size", "vmcore.flat": "flattened makedumpfile vmcore"}


def test_dump_of_debugfs(capsys, tmp_path):
    code, _, _ = run(capsys, "extract", FIXTURE, "--out", tmp_path / "x")
    out_dir = tmp_path / "out"
    (out_dir / "sub_fdts").mkdir(parents=True)
    (out_dir / "fdt").write_bytes((tmp_path / "x" / "fdt.dtb").read_bytes())
    for blob in (tmp_path / "x" / "sub_fdts").iterdir():
        (out_dir / "sub_fdts" / blob.stem).write_bytes(blob.read_bytes())
    code, out, _ = run(capsys, "dump", out_dir, "--json")
    report = json.loads(out)
    assert code == 0 and report["source"]["format"] == "debugfs" and report["compatible"] == "kho-v4"
    assert report["fdt_phys"] is None and report["units_by_order"] is None and not report["truncated"]
    subtrees = {s["name"]: s for s in report["subtrees"]}
    assert subtrees["memblock"]["decoded"]["regions"][0]["name"] == "realk_small"
    assert subtrees["kho_test"]["decoded"] is None and "debugfs holds the blob only" in subtrees["kho_test"]["error"]
    code, out, _ = run(capsys, "dump", out_dir, "--dts")
    assert code == 0 and 'compatible = "memblock-v1";' in out
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "fdt").write_bytes((FIXTURES / "debugfs" / "out__fdt").read_bytes())
    code, out, _ = run(capsys, "dump", tmp_path / "in")
    assert code == 0 and "233 of 405 bytes (truncated)" in out
    code, out, err = run(capsys, "dump", tmp_path / "in", "--dts")
    assert code == 3 and not out and "truncated" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", [["units"], ["dump"], ["dump", "--json"], ["boot", "--scratch", SCRATCH]])
def test_bad_input_is_one_line_exit_3(capsys, tmp_path, command):
    for name, message in bad_inputs(tmp_path).items():
        if name == "debugfs" and command[0] == "dump":
            continue  # kho dump reads a debugfs directory: test_dump_of_debugfs
        code, out, err = run(capsys, command[0], tmp_path / name, *command[1:])
        assert code == 3 and not out, (name, err)
        assert err.startswith("kho: ") and err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert message in err, (name, err)


@pytest.mark.skipif(not (SHARED / "mem-stage1.raw.zst").is_file(), reason="needs ../shared/realkernel")
def test_the_full_shared_dump_through_dump_check_extract_and_boot(capsys, tmp_path):
    dump = SHARED / "mem-stage1.raw.zst"
    code, out, _ = run(capsys, "dump", dump, "--json")
    report = json.loads(out)
    assert code == 0 and report["source"]["format"] == "zstd" and report["fdt_phys"] == 0x344000
    assert sum(report["units_by_order"].values()) == 141
    test = next(s for s in report["subtrees"] if s["name"] == "kho_test")
    assert test["checksum"]["ok"] and test["checksum"]["computed"] == test["decoded"]["csum"]
    code, out, _ = run(capsys, "check", dump, "--scratch", REAL_SCRATCH, "--json")
    report = json.loads(out)  # the real scratch areas: no preserved unit in them
    assert code == 0 and report["ok"] and any("scratch areas as given: lowmem 0x1b400000" in n for n in report["notes"])
    code, out, _ = run(capsys, "extract", dump, "--out", tmp_path / "x")
    assert code == 0 and (tmp_path / "x" / "fdt.dtb").read_bytes() == (SHARED / "kho-fdt-0x344000.dtb").read_bytes()
    code, out, _ = run(capsys, "boot", dump, "--scratch", REAL_SCRATCH, "--json")
    restores = {s["name"]: s for s in json.loads(out)["subnodes"]}
    assert code == 0 and all(s["restored"] for s in restores.values()), restores
    assert restores["kho_test"]["computed"] == restores["kho_test"]["csum"]


def test_elf_page_size_comes_from_vmcoreinfo(capsys, tmp_path, dumps):
    """An ELF core with a VMCOREINFO note (a vmcore, /proc/kcore) says its page size: used when
    none is given, refused when another is."""
    with open_dump(dumps["raw"]) as dump:
        memory = cut(dump.memory, referenced_pages(dump.handover(), dump.page_size))
    kcore_like(memory, tmp_path / "kcore")
    with open_dump(tmp_path / "kcore") as core:
        assert core.page_size == 4096 and core.source.vmcoreinfo["OSRELEASE"] == "7.3.0-rc7"
    code, out, err = run(capsys, "units", tmp_path / "kcore", "--page-size", "16K")
    assert code == 3 and not out and "VMCOREINFO says PAGESIZE=4096, not 16384" in err and err.count("\n") == 1
    for said in (b"8192", b"9" * 5000):
        raw = (tmp_path / "kcore").read_bytes().replace(b"PAGESIZE=4096", b"PAGESIZE=" + said)
        (tmp_path / "odd").write_bytes(raw)
        code, out, err = run(capsys, "units", tmp_path / "odd")
        assert code == 3 and "kho reads 4K, 16K and 64K pages" in err and err.count("\n") == 1, err[-300:]
    # damaged notes (a note name without its NUL) keep nothing from being read: no page size said
    raw = (tmp_path / "kcore").read_bytes().replace(b"VMCOREINFO\0\0", b"VMCOREINFOXX", 1)
    (tmp_path / "damaged").write_bytes(raw)
    code, out, err = run(capsys, "units", tmp_path / "damaged")
    assert code == 0 and len(out.splitlines()) == 141, err


def test_check_against_given_scratch_areas(capsys, dumps):
    """A dump without a handoff: --scratch names the areas, and a unit inside one is a finding."""
    code, out, _ = run(capsys, "check", dumps["raw"], "--scratch", SCRATCH, "--json")
    assert code == 0 and json.loads(out)["ok"]
    code, out, _ = run(capsys, "check", dumps["raw"], "--scratch", "0x1d6f9000+4M,0x10000000+1M", "--json")
    report = json.loads(out)
    hits = [f for f in report["findings"] if f["kind"] == "in-scratch"]
    assert code == 1 and hits and all("lowmem scratch area 0x1d6f9000" in f["message"] for f in hits)
    assert not any("scratch areas unknown" in n for n in report["notes"])
