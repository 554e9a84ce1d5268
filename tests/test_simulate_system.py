"""kho simulate as a Linux 7.x system: self-test folios, reserve_mem, kexec-metadata, LUO memfds,
chained kexecs, both architectures, 4 and 16 KiB pages; failures detected; the CLI."""

import json

import pytest

from kho.abi.luo import LUO_KHO_ENTRY_NAME
from kho.abi.memblock import MEMBLOCK_KHO_FDT
from kho.cli.main import main
from kho.currentkernel.machine import Machine
from kho.errors import KHOError
from kho.handover.outgoing import KHO
from kho.nextkernel.boot import boot
from kho.simulation import simulate as S
from kho.simulation import system as SY
from kho.subsystems.kho_test import read_kho_test
from kho.subsystems.luo import read_luo

MIB, GIB = 1 << 20, 1 << 30


def small(**kw):
    base = {"ram": 1 * GIB, "preserve": 8 * MIB, "image_size": 8 * MIB}
    base.update(kw)
    return S.Config(**base)


@pytest.mark.parametrize("arch, page_size, generations",
                         [("arm64", 4096, 3), ("arm64", 16384, 2), ("x86_64", 4096, 2), ("arm64", 4096, 1)])
def test_chained_7x_generations(arch, page_size, generations):
    result = S.run(small(arch=arch, page_size=page_size, generations=generations))
    assert result.ok
    starts = set()
    for g in result.generations:
        v = g.verify
        assert v.failures == [] and g.lost_units == 0 and g.leaked_units == 0
        assert v.kexec_count == g.index and v.liveupdate_num == g.index  # 0 on the cold boot, +1 per kexec
        assert v.previous_release == "7.3.0-kho-sim"
        assert v.folios > 0 and v.folio_bytes == 8 * MIB and v.csum is not None
        assert v.sessions == 2 and v.memfds == len(SY.MEMFDS)
        assert v.memfd_bytes == sum(size for _, _, size, _ in SY.MEMFDS)
        assert [r["name"] for r in v.regions] == ["kho_sim_big"] and all(r["contents_ok"] for r in v.regions)
        starts |= {r["start"] for r in v.regions}
        names = [s["name"] for s in g.segments]
        assert ("params" in names) == (arch == "x86_64") and ("dtb" in names) == (arch == "arm64")
    assert len(starts) == 1  # revived at the same address every time
    data = result.to_dict()
    assert data["config"]["kernel"] == "7.3" and data["config"]["abi"] == "kho-v4" and data["config"]["arch"] == arch


def _live(kernel="7.3", arch="arm64"):
    m = Machine.boot(1 * GIB, seed=3)
    kho = KHO(m.memory, m.allocator, kernel=kernel, arch=arch)
    return m, kho, SY.create(kho, m.allocator, 4 * MIB, seed=5)


def test_reserve_mem_region_is_one_order_11_unit_and_luo_serializes_at_reboot():
    m, kho, work = _live()
    (region,) = work.regions
    assert region.start % (8 * MIB) == 0 and (region.start, 11) in kho.tracker.units()
    assert not m.memory.overlaps_scratch(region.start, region.size)
    fdt = kho.finalize().kho_fdt()
    assert list(fdt.subtrees()) == [MEMBLOCK_KHO_FDT, LUO_KHO_ENTRY_NAME, "kho_test", "kexec-metadata"]
    phys, size = fdt.retrieve_subtree(LUO_KHO_ENTRY_NAME), fdt.subtree_size(LUO_KHO_ENTRY_NAME)
    before = read_luo(m.memory, phys, size)
    assert before.sessions_pa == 0 and before.sessions == () and before.liveupdate_num == 1
    units = kho.tracker.units()
    SY.reboot(work)
    after = read_luo(m.memory, phys, size)
    assert after.sessions_pa and [s.name for s in after.sessions] == ["kho-sim-db", "kho-sim-vm"]
    assert kho.tracker.units() == units  # serializing writes into blocks preserved beforehand


def _booted(damage):
    m, kho, work = _live()
    handover = kho.finalize()
    SY.reboot(work)
    damage(m.memory, work)
    nk = boot(m.memory, handover.boot_dtb())
    return SY.verify(nk, m.memory, handover.fdt_phys, work)


def _memfd_folio(memory, work):
    """The first page of the first memfd, found through the serialized LUO."""
    luo = read_luo(memory, work.luo.phys, 32)
    return luo.sessions[0].files[0].memfd.folios[0].phys


@pytest.mark.parametrize("damage, message", [
    (lambda memory, work: None, None),
    (lambda memory, work: memory.write(work.regions[0].start + 4096, b"\xff" * 8), "reserve_mem kho_sim_big"),
    (lambda memory, work: memory.write(_memfd_folio(memory, work), b"\x00\x01changed"), "memfd kho-sim-db/0x1"),
    (lambda memory, work: memory.write(work.luo.phys, b"luo-v9\0\0"), "LUO: EINVAL: luo.compatible"),
    (lambda memory, work: setattr(work, "kexec_count", 7), "kexec-metadata: count 1"),
])
def test_next_kernel_detects_damage(damage, message):
    report = _booted(damage)
    if message is None:
        assert report.ok and report.memfds == 3 and report.regions[0]["contents_ok"]
    else:
        assert not report.ok and any(f.startswith(message) for f in report.failures), report.failures


def test_self_test_checksum_is_verified():
    m, kho, work = _live()
    handover = kho.finalize()
    SY.reboot(work)
    fdt = handover.kho_fdt()
    test = read_kho_test(m.memory, fdt.retrieve_subtree("kho_test"), fdt.subtree_size("kho_test"))
    m.memory.write(test.folios[0][0], b"\x12\x34\x56\x78")
    report = SY.verify(boot(m.memory, handover.boot_dtb()), m.memory, handover.fdt_phys, work)
    assert any(f.startswith("kho_test:") and "checksum" in f for f in report.failures), report.failures


@pytest.mark.parametrize("abi, path", [("kho-v1", "memblock"), ("maple", "memblock"), ("instructions", "instructions")])
def test_7x_system_through_kho_encode_at_finalize_model(abi, path):
    """A 7.3 system with another encoding: a 6.16-style tracker caps the region's split (two
    order-10 units), and the kernel keeps both halves of the revived region."""
    result = S.run(small(kernel="7.3", abi=abi, boot_path=path, generations=2))
    assert result.ok, [g.verify.failures for g in result.generations]
    assert all(r["contents_ok"] for g in result.generations for r in g.verify.regions)


def test_7_1_writes_no_kexec_metadata_and_6_16_runs_the_old_workload():
    v71 = S.run(small(kernel="7.1")).generations[0].verify
    assert v71.ok and v71.kexec_count is None and v71.liveupdate_num == 1
    old = S.run(small(kernel="6.16"))
    assert old.ok and old.config.encoding == "kho-v1" and old.generations[0].verify.vmalloc_pages > 0
    assert not isinstance(old.generations[0].verify, SY.SystemReport)
    finalize_model = S.run(small(abi="kho-v2"))
    assert finalize_model.ok and finalize_model.config.kernel_entry is None


@pytest.mark.parametrize("kw, errno", [({"pattern": "random"}, "EINVAL"), ({"arch": "x86_64", "page_size": 16384}, "EINVAL"),
                                       ({"kernel": "9.9"}, "EINVAL"), ({"arch": "riscv"}, "EINVAL"),
                                       ({"preserve": 990 * MIB}, "ENOMEM")])
def test_impossible_7x_configurations(kw, errno):
    with pytest.raises(KHOError) as info:
        S.run(small(**kw))
    assert info.value.errno_name == errno


def test_cli_7x_json_and_text(capsys, tmp_path):
    image = tmp_path / "sim.kho"
    code = main(["simulate", "--ram", "1G", "--preserve", "8M", "--image-size", "8M", "--generations", "2",
                 "--arch", "x86_64", "--json", "--save-image", str(image)])
    out, _ = capsys.readouterr()
    data = json.loads(out)
    assert code == 0 and data["ok"] and data["config"]["arch"] == "x86_64"
    assert [g["verify"]["kexec_count"] for g in data["generations"]] == [1, 2]
    assert [g["verify"]["liveupdate_num"] for g in data["generations"]] == [1, 2]
    assert image.stat().st_size > 0
    code = main(["simulate", "--ram", "1G", "--preserve", "8M", "--image-size", "8M", "--no-checks"])
    out, _ = capsys.readouterr()
    assert code == 0 and "Linux 7.3 arm64" in out and "kho-v4" in out and "reserve_mem" in out
    assert "1 generation verified" in out
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--kernel", "5.10"])
    assert info.value.code == 2
