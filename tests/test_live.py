"""kho's --live path (issue 13 item 7): memory through a kcore-like ELF file, the KHO FDT and
the scratch array from the kernel's variables through drgn.

No running kernel with KHO is at hand, so drgn gets a program of the same shape: the
kernel's types (``struct kho_out``, ``struct kho_in``, ``struct kho_scratch``) built with
drgn's type API and its variables answered by an object finder, as the debug info of a
6.16 or 7.x ``vmlinux`` would answer them.  Memory comes from the reduced real-kernel
fixture, written as /proc/kcore lays it out."""

import json

import numpy as np
import pytest
from test_cli_dump_formats import FIXTURE, PAGE_OFFSET, kcore_like, run

from kho.abi.kexec_handover import KHO_SCRATCH_DTYPE
from kho.dumps import open_dump
from kho.dumps.cut import cut, referenced_pages
from kho.dumps.live import KHO_VARIABLES, LiveDump, kernel_handover, kernel_program, open_live
from kho.errors import KHOError

drgn = pytest.importorskip("drgn")

#: Where the test puts the scratch array, and its areas (lowmem, global, node 0): clear of
#: the fixture's preserved units.
SCRATCH_ARRAY = 0x0F000000
SCRATCH_AREAS = [(0x10000000, 32 << 20), (0x12000000, 64 << 20), (0x16000000, 32 << 20)]
FDT = 0x344000


@pytest.fixture(scope="module")
def kcore(tmp_path_factory):
    """The fixture's handover pages plus a scratch array, as a kcore-like ELF file."""
    with open_dump(FIXTURE) as dump:
        memory = cut(dump.memory, referenced_pages(dump.handover(), dump.page_size))
    memory.write(SCRATCH_ARRAY, np.array(SCRATCH_AREAS, dtype=np.uint64).view(KHO_SCRATCH_DTYPE).tobytes())
    path = tmp_path_factory.mktemp("live") / "kcore"
    kcore_like(memory, path)
    return path


def program(*, kernel="7.3", outgoing=FDT, incoming=0, enabled=True, scratch=SCRATCH_ARRAY,
            scratch_count=len(SCRATCH_AREAS), finalized=False, omit=()):
    """A drgn program answering for the KHO variables of a ``kernel`` ("6.16" or "7.3"):
    value objects (no memory behind them), addresses in the x86_64 linear map."""
    platform = drgn.Platform(drgn.Architecture.X86_64, drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN)
    prog = drgn.Program(platform)
    u64 = prog.int_type("unsigned long long", 8, False)
    u32 = prog.int_type("unsigned int", 4, False)
    ulong = prog.int_type("unsigned long", 8, False)
    boolean = prog.bool_type("_Bool", 1)
    phys_addr_t = prog.typedef_type("phys_addr_t", u64)
    void_p = prog.pointer_type(prog.void_type())
    page = prog.struct_type("page", 64, [])
    scratch_t = prog.struct_type("kho_scratch", 16, [drgn.TypeMember(phys_addr_t, "addr", 0),
                                                    drgn.TypeMember(phys_addr_t, "size", 64)])
    if kernel == "6.16":  # kho_out.ser.fdt: the FDT's struct page
        ser = prog.struct_type("kho_serialization", 8, [drgn.TypeMember(prog.pointer_type(page), "fdt", 0)])
        out_t = prog.struct_type("kho_out", 16, [drgn.TypeMember(ser, "ser", 0), drgn.TypeMember(boolean, "finalized", 64)])
        out_value = {"ser": {"fdt": outgoing}, "finalized": finalized}
    else:  # kho_out.fdt: a pointer into the linear map
        out_t = prog.struct_type("kho_out", 16, [drgn.TypeMember(void_p, "fdt", 0), drgn.TypeMember(boolean, "finalized", 64)])
        out_value = {"fdt": PAGE_OFFSET + outgoing if outgoing else 0, "finalized": finalized}
    in_t = prog.struct_type("kho_in", 24, [drgn.TypeMember(phys_addr_t, "fdt_phys", 0),
                                          drgn.TypeMember(phys_addr_t, "scratch_phys", 64)])
    objects = {
        "kho_out": drgn.Object(prog, out_t, value=out_value),
        "kho_in": drgn.Object(prog, in_t, value={"fdt_phys": incoming, "scratch_phys": 0}),
        "kho_scratch": drgn.Object(prog, prog.pointer_type(scratch_t), value=PAGE_OFFSET + scratch if scratch else 0),
        "kho_scratch_cnt": drgn.Object(prog, u32, value=scratch_count),
        "kho_enable": drgn.Object(prog, boolean, value=enabled),
        "page_offset_base": drgn.Object(prog, ulong, value=PAGE_OFFSET),
        "PAGE_SIZE": drgn.Object(prog, ulong, value=4096),
    }

    def find(prog, name, flags, filename):
        return None if name in omit else objects.get(name)

    prog.register_object_finder("kho-test", find, enable_index=0)
    return prog


def test_variables_are_read_by_their_kernel_names():
    k = kernel_handover(program())
    assert (k.outgoing_fdt, k.incoming_fdt, k.scratch_phys, k.scratch_count) == (FDT, None, SCRATCH_ARRAY, 3)
    assert k.enabled is True and k.page_size == 4096 and not k.notes
    assert k.read_from == {"outgoing_fdt": "kho_out.fdt", "incoming_fdt": "kho_in.fdt_phys", "scratch": "kho_scratch",
                           "scratch_count": "kho_scratch_cnt", "enabled": "kho_enable",
                           "finalized": "kho_out.finalized"}
    h = k.handoff()
    assert (h.fdt_addr, h.scratch_addr, h.scratch_size) == (FDT, SCRATCH_ARRAY, 3 * KHO_SCRATCH_DTYPE.itemsize)
    assert set(k.read_from) == set(KHO_VARIABLES)


def test_a_variable_that_faults_is_a_note():
    prog = program(omit=("kho_scratch",))
    scratch_t = prog.struct_type("kho_scratch", 16, [])
    prog.register_object_finder("fault", lambda p, name, flags, filename: drgn.Object(
        p, p.pointer_type(scratch_t), address=0xDEAD0000) if name == "kho_scratch" else None, enable_index=-1)
    k = kernel_handover(prog)
    assert k.scratch_phys is None and k.handoff() is None and k.outgoing_fdt == FDT
    assert len(k.notes) == 1 and k.notes[0].startswith("kho_scratch: cannot be read through drgn (FaultError")


def test_a_kernel_without_debug_info_names_nothing():
    k = kernel_handover(program(omit=("kho_out", "kho_in", "kho_scratch", "kho_scratch_cnt", "kho_enable", "PAGE_SIZE")))
    assert not k.fdts() and k.handoff() is None and k.read_from == {}
    assert "RAM scanned instead" in k.notes[0]


def test_live_dump_uses_the_kernels_fdt_and_scratch(kcore, monkeypatch):
    monkeypatch.setenv("KHO_KCORE", str(kcore))
    with open_live(program=program()) as dump:
        assert isinstance(dump, LiveDump)
        # no scan: the FDT came from kho_out.fdt
        monkeypatch.setattr(type(dump.source), "scan", lambda self: pytest.fail("RAM scanned"))
        found = dump.handover()
        assert found.fdt_phys == FDT and found.compatible == "kho-v4" and len(found.decoded) == 141
        assert [(a.addr, a.size) for a in found.scratch] == SCRATCH_AREAS
        assert "drgn" in found.handoff.source and any("named by the handoff" in n or "only KHO FDT" in n
                                                      for n in found.notes)
        live = dump.source_json()["live"]
        assert live["kernel"]["outgoing_fdt"] == FDT and live["kernel"]["read_from"]["outgoing_fdt"] == "kho_out.fdt"


def test_without_drgn_the_ram_is_scanned_to_the_same_handover(kcore, monkeypatch):
    monkeypatch.setenv("KHO_KCORE", str(kcore))
    with open_live(use_drgn=False) as dump:
        found = dump.handover()
        assert found.fdt_phys == FDT and len(found.decoded) == 141 and found.scratch == []
        assert dump.source_json()["live"]["kernel"] is None


def test_stale_incoming_fdt_is_listed_and_the_outgoing_chosen(kcore, monkeypatch):
    """The second kernel: kho_in.fdt_phys names the FDT it was handed; here it is a page of no
    FDT at all (its memory reused), and the outgoing one is still chosen."""
    monkeypatch.setenv("KHO_KCORE", str(kcore))
    with open_live(program=program(incoming=SCRATCH_ARRAY)) as dump:
        found = dump.handover()
        assert found.fdt_phys == FDT
        assert {c.phys for c in found.candidates} == {FDT, SCRATCH_ARRAY}


def test_kho_disabled_is_one_line(kcore, monkeypatch):
    monkeypatch.setenv("KHO_KCORE", str(kcore))
    with pytest.raises(KHOError) as err:
        open_live(program=program(enabled=False, outgoing=0))
    assert err.value.errno_name == "EOPNOTSUPP" and "kho=on" in err.value.message


def test_6_16_names_the_fdt_by_its_struct_page(kcore, monkeypatch):
    """6.16 keeps ``struct page *fdt`` in ``kho_out.ser``: converted through the page's pfn."""
    monkeypatch.setattr("drgn.helpers.linux.mm.page_to_phys", lambda obj: (obj.value_() - 0xFFFFEA0000000000) // 64 * 4096)
    k = kernel_handover(program(kernel="6.16", outgoing=0xFFFFEA0000000000 + (FDT >> 12) * 64))
    assert k.outgoing_fdt == FDT and k.read_from["outgoing_fdt"] == "kho_out.ser.fdt"


@pytest.mark.parametrize("command", ["dump", "check", "units"])
def test_cli_live_through_drgn(capsys, kcore, monkeypatch, command):
    monkeypatch.setenv("KHO_KCORE", str(kcore))
    monkeypatch.setattr("kho.dumps.live.kernel_program", lambda kcore: (program(), None))
    code, out, err = run(capsys, command, "--live", *(["--json"] if command != "units" else []))
    assert code == 0 and not err
    if command == "dump":
        report = json.loads(out)
        assert report["fdt_phys"] == FDT and report["source"]["live"]["kernel"]["scratch_count"] == 3
        assert len(report["scratch"]) == 3
    elif command == "check":
        report = json.loads(out)
        assert report["ok"] is True
    else:
        assert len(out.splitlines()) == 141


def test_cli_boot_live_takes_the_scratch_areas_from_the_kernel(capsys, kcore, monkeypatch):
    monkeypatch.setenv("KHO_KCORE", str(kcore))
    monkeypatch.setattr("kho.dumps.live.kernel_program", lambda kcore: (program(), None))
    code, out, err = run(capsys, "boot", "--live", "--json")
    assert code == 0 and not err, err
    report = json.loads(out)
    assert report["fdt_phys"] == FDT
    # without drgn the scratch areas are unknown: one line asking for --scratch
    code, out, err = run(capsys, "boot", "--live", "--no-drgn")
    assert code == 3 and not out and err.startswith("kho: ") and err.count("\n") == 1 and "--scratch" in err


def test_cli_without_drgn_installed_scans_and_says_so(capsys, kcore, monkeypatch):
    monkeypatch.setenv("KHO_KCORE", str(kcore))
    monkeypatch.setattr("kho.dumps.live.kernel_program", lambda kcore: (None, "drgn is not installed (pip install kho[live]): "
                                                                         "RAM scanned for the KHO FDT"))
    code, out, err = run(capsys, "dump", "--live", "--json")
    report = json.loads(out)
    assert code == 0 and report["fdt_phys"] == FDT and "drgn is not installed" in report["source"]["live"]["notes"][0]


def test_a_copied_kcore_is_not_paired_with_the_running_kernel(kcore):
    """$KHO_KCORE names another file: the running kernel's variables would not describe it."""
    prog, reason = kernel_program(str(kcore))
    assert prog is None and "is not /proc/kcore" in reason


def test_a_fifo_for_kcore_is_one_line_not_a_hang(tmp_path, monkeypatch):
    import os
    os.mkfifo(tmp_path / "fifo")
    monkeypatch.setenv("KHO_KCORE", str(tmp_path / "fifo"))
    with pytest.raises(KHOError, match="not a regular file"):
        open_live(use_drgn=False)


def test_a_named_fdt_that_does_not_decode_says_why(kcore, monkeypatch):
    """6.16 .. 7.0 before finalize: kho_out names an FDT page the map is not serialized in yet."""
    monkeypatch.setenv("KHO_KCORE", str(kcore))
    with open_live(program=program(outgoing=SCRATCH_ARRAY, finalized=False)) as dump:
        with pytest.raises(KHOError) as err:
            dump.handover()
    assert "the FDT the running kernel's variables name (0xf000000, kho_out.fdt)" in err.value.message
    assert "KHO is not finalized" in err.value.message
