"""kho.dumps.check: a clean handover, and damaged ones each giving its kind of finding."""

from pathlib import Path

import numpy as np
import pytest
from test_dumps import write_boot_params

from kho.abi.kexec_handover import KHO_SCRATCH_DTYPE
from kho.currentkernel.machine import Machine
from kho.dumps import open_dump
from kho.dumps.check import check_dump
from kho.dumps.writers import write_raw
from kho.handover.outgoing import KHO

MiB = 1 << 20
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "linux-7.3-x86_64" / "mem-stage1-handover.raw.zst"


def check(m, tmp_path):
    write_raw(m.memory, tmp_path / "mem.raw")
    with open_dump(tmp_path / "mem.raw") as dump:
        return check_dump(dump)


def machine_and_kho(strict=True):
    m = Machine.boot(512 * MiB, seed=5)
    return m, KHO(m.memory, m.allocator, "kho-v2", strict=strict)


def test_a_subnode_that_does_not_decode_and_unreferenced_units(tmp_path):
    m, kho = machine_and_kho()
    folios = m.allocator.alloc_many(20, 2)
    kho.tracker.preserve_many(folios, 2)
    kho.add_blob("memblock", b"x" * 100)  # a blob no reader accepts: decoding fails
    kho.add_blob("workload", b"w" * 5000)  # unknown: its blob is checked, not decoded
    kho.finalize()
    report = check(m, tmp_path)
    assert [f.kind for f in report.findings] == ["subnode"] and "memblock" in report.findings[0].message
    assert sorted(report.unreferenced) == sorted((int(p), 2) for p in folios)  # nothing points at them
    assert any("sub-node workload" in n and "no reader" in n for n in report.notes)
    assert report.to_json()["ok"] is False and report.to_json()["units"] == 22


def test_referenced_but_not_preserved(tmp_path):
    m, kho = machine_and_kho()
    blob = m.allocator.alloc_pages(1)
    m.memory.write(blob, b"y" * 8192)
    kho.tracker.preserve_folio(blob, 0)  # only the first of its two pages
    kho.add_subtree("external", blob, 8192)
    kho.finalize()
    report = check(m, tmp_path)
    (finding,) = report.findings
    assert (finding.kind, finding.phys, finding.size) == ("not-preserved", blob, 8192)
    assert "external blob: 4096 of its 8192 bytes" in finding.message
    assert report.ok is False


def test_overlapping_units(tmp_path):
    m, kho = machine_and_kho(strict=False)
    folio = m.allocator.alloc_pages(3)
    kho.tracker.preserve_folio(folio, 3)
    kho.tracker.preserve_folio(folio + 4096, 0)  # the kernel accepts it silently
    kho.finalize()
    report = check(m, tmp_path)
    assert [(f.kind, f.phys) for f in report.findings if f.kind == "overlap"] == [("overlap", folio + 4096)]
    assert any(f.kind == "strict" for f in report.findings)  # kho's strict decoder refuses overlaps


def test_unit_in_scratch(tmp_path):
    m, kho = machine_and_kho()
    unit = m.allocator.alloc_pages(0)
    kho.tracker.preserve_folio(unit, 0)
    handover = kho.finalize()
    # the handoff names a scratch array whose first area covers the unit
    array, params, chain = (m.allocator.alloc_pages(0) for _ in range(3))
    areas = np.array([(unit, MiB)] + [(a.addr, a.size) for a in m.memory.scratch], KHO_SCRATCH_DTYPE)
    m.memory.write(array, areas.tobytes())
    write_boot_params(m.memory, params, chain, (handover.fdt_phys, 4096), (array, areas.nbytes))
    report = check(m, tmp_path)
    assert [(f.kind, f.phys) for f in report.findings if f.kind == "in-scratch"] == [("in-scratch", unit)]
    assert "scratch" in next(f.message for f in report.findings if f.kind == "strict")  # kho's strict decoder agrees


def test_the_real_kernels_handover_is_clean():
    with open_dump(FIXTURE) as dump:
        report = check_dump(dump)
    assert report.ok and report.units == 141
    # the 64-page memfd LUO preserved before the dump, whose record is written at reboot, and LUO's blocks
    assert len(report.unreferenced) == 69 and all(order == 0 for _, order in report.unreferenced)


@pytest.mark.parametrize("fdt", [None, 0x344000])
def test_choosing_the_fdt(fdt):
    with open_dump(FIXTURE) as dump:
        assert check_dump(dump, fdt=fdt).fdt_phys == 0x344000
