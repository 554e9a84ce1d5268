"""The next kernel's KHO stages in the profiles and the timeline: the qemu-tcg-x86 fit against
the real kernel's timing, fragmented against adjacent sets, the instruction path's linearity,
and the CLI's reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kho.benchmark import restore as R
from kho.benchmark.encodings import Point
from kho.cli.main import main
from kho.currentkernel.machine import Machine
from kho.errors import KHOError
from kho.handover.outgoing import KHO
from kho.kexec import timing as TM
from kho.kexec.profiles import fit_next_kernel, load_profile, qemu_tcg_timing, run_speed_note
from kho.nextkernel import memblock_cost as MC
from kho.nextkernel.boot import boot
from kho.nextkernel.memblock import REGION_DTYPE


@pytest.fixture(scope="module")
def qemu():
    return load_profile("qemu-tcg-x86")


def test_region_size_matches_the_memblock_layout():
    assert TM.MEMBLOCK_REGION_BYTES == REGION_DTYPE.itemsize


def test_packaged_model_counts_are_what_the_model_computes():
    for run in qemu_tcg_timing()["runs"]:
        counts = MC.timing_run_counts(run["kind"], run["memfd_pages"], run["units"], run["rsv_cnt"])
        assert counts == run["model"], run["run"]
        # the reconstruction ends as the kernel did: same region count, same array size
        assert counts["final_regions"] == run["rsv_cnt"] and counts["final_max"] == run["rsv_max"]


def test_fit_reproduces_the_real_kernel(qemu):
    rows = {(r.label, r.quantity): r for r in qemu.rows}
    for run in qemu_tcg_timing()["runs"]:
        total = rows[(run["run"], "KHO restore total")]
        if run["kind"] == "interleaved":  # the quadratic path: every stage within 10 %
            for quantity in ("memblock_reserve", "memblock_reserved_mark_noinit", "KHO restore total"):
                assert abs(rows[(run["run"], quantity)].error) < 0.10, (run["run"], quantity)
        else:  # each within 20 %, the pair's summed time within 10 % (see the next test)
            assert abs(total.error) < 0.20, run["run"]
    pair = [rows[(r["run"], "KHO restore total")] for r in qemu_tcg_timing()["runs"] if r["kind"] == "contiguous"]
    assert len(pair) == 2
    assert abs(sum(r.modelled for r in pair) / sum(r.measured for r in pair) - 1) < 0.10
    costs = qemu.profile.next_kernel
    assert 1e-9 < costs.region_visit_s < 1e-7 and costs.reserve_call_s > 0 and costs.noinit_call_s > 0


def test_contiguous_runs_differ_in_emulator_speed(qemu):
    """Why the contiguous runs are not held to 10 % each: getting the page is the same work per
    unit in both (the model's counts per unit are equal too), yet its measured time per unit
    differs by over 20 %, so no model of the kernel's work can be within 10 % of both."""
    runs = {r["run"]: r for r in qemu_tcg_timing()["runs"] if r["kind"] == "contiguous"}
    per_unit = sorted(r["getpg_s"] / r["units"] for r in runs.values())
    assert per_unit[1] / per_unit[0] > 1.2
    work = [(r["model"]["reserve_scan_visits"] + r["model"]["reserve_regions_moved"]) / r["units"] for r in runs.values()]
    assert max(work) / min(work) < 1.1  # the model's memblock work per unit: the same in both runs
    note = run_speed_note(qemu_tcg_timing())
    assert note and "contiguous_65536" in note and "contiguous_131072" in note
    assert note in qemu.profile.notes


def test_fit_is_least_squares_on_the_packaged_points(qemu):
    costs, how, _ = fit_next_kernel(qemu_tcg_timing())
    assert costs == qemu.profile.next_kernel
    assert "least squares" in how["region_visit_s"]
    assert "least squares" in qemu.derivation["unit_s"]


def test_hardware_profiles_state_their_derivation():
    report = load_profile("stingray")
    costs = report.profile.next_kernel
    assert costs.region_visit_s == pytest.approx(24 / report.profile.cached_copy_bps)
    for key in TM.NEXT_KERNEL_PARAMETERS:
        assert report.derivation[key], key


def test_profile_file_sets_next_kernel_costs(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text('name = "board"\ncached_copy = "1000M/s"\ncache_clean = "1000M/s"\nuncached_copy = "100M/s"\n'
                    'shutdown = 0.01\nstartup = 0.2\nregion_visit_s = "2ns"\n')
    report = load_profile(str(path))
    assert report.profile.next_kernel.region_visit_s == pytest.approx(2e-9)
    assert report.derivation["region_visit_s"] == "given"
    assert report.profile.next_kernel.free_page_s == pytest.approx(64 / (1000 << 20))
    with pytest.raises(KHOError):
        load_profile("stingray", {"region_visit_s": "-1"})


def test_fragmented_and_adjacent_differ_by_orders_of_magnitude(qemu):
    costs = qemu.profile.next_kernel
    n = 32768
    counted = R.curve_counts((n,))
    rows = {(r["kind"], r["path"]): r["kho_restore_s"] for r in R.restore_curve(costs, counted)}
    # measured: 32,919 interleaved units 12.0 s, 65,817 contiguous 0.165 s
    assert rows[("fragmented", "memblock")] / rows[("adjacent", "memblock")] > 100
    assert rows[("fragmented", "memblock")] == pytest.approx(12.0, rel=0.15)


def _instruction_restore(units: int, costs) -> MC.RestoreCost:
    machine = Machine.boot(1 << 30, seed=3)
    kho = KHO(machine.memory, machine.allocator, "instructions")
    kho.tracker.preserve_many(machine.allocator.alloc_many(units, 0), 0)
    handover = kho.finalize()
    nk = boot(machine.memory, handover.boot_dtb(), "instructions", encoding_options=handover.options)
    return MC.boot_restore_cost(nk, costs, int(handover.encoded.metadata_pages.size))


def test_instruction_path_is_linear_in_units(qemu):
    costs = qemu.profile.next_kernel
    small, large = _instruction_restore(4096, costs), _instruction_restore(16384, costs)
    assert small.counts is None and large.reserve_s == 0 == large.noinit_s
    assert large.kho_restore_s / small.kho_restore_s == pytest.approx(4, rel=0.05)


def test_held_out_predictions_grow_as_the_square(qemu):
    a, b = R.held_out(qemu.profile.next_kernel)
    assert b["kho_restore_s"] / a["kho_restore_s"] == pytest.approx(4, rel=0.05)


def test_crossings_are_where_the_time_is_reached(qemu):
    costs = qemu.profile.next_kernel
    n = R.crossing(costs, 1.0)
    assert R._fragmented_s(costs, n) >= 1.0 > R._fragmented_s(costs, n - 1)


def test_timeline_total_includes_the_kho_stages():
    p = load_profile("stingray").profile
    bare = TM.reboot_timeline(p, "mmu-on", 47 << 20)
    full = TM.reboot_timeline(p, "mmu-on", 47 << 20, kho_restore_s=2.0, free_list_s=0.5)
    assert bare.kho_restore_s == 0 == bare.free_list_s
    assert full.total_s == pytest.approx(bare.total_s + 2.5)
    assert full.to_dict()["kho_restore_s"] == 2.0


def test_compare_encodings_end_to_end():
    result = R.compare_encodings(Point("random", 1 << 30, 0.01), load_profile("stingray"))
    rows = {e["encoding"]: e for e in result["encodings"]}
    assert {"kho-v1", "kho-v2", "instructions"} <= set(rows)
    ins = rows["instructions"]["paths"]
    assert ins["instructions"]["kho_restore_s"] < ins["memblock"]["kho_restore_s"] / 10
    v2 = rows["kho-v2"]
    assert v2["keep_bytes"] == v2["handover_bytes"]  # the radix tree is the tracker
    assert rows["kho-v1"]["keep_bytes"] > rows["kho-v1"]["handover_bytes"]


def test_kho_boot_reports_the_restore(tmp_path, capsys):
    image = str(tmp_path / "x.kho")
    assert main(["serialize", "--ram", "1G", "--abi", "kho-v2", "--preserve-random", "32M", "--out", image]) == 0
    capsys.readouterr()
    assert main(["boot", image, "--json", "--profile", "qemu-tcg-x86"]) == 0
    qemu = json.loads(capsys.readouterr().out)
    assert main(["boot", image, "--json"]) == 0
    stingray = json.loads(capsys.readouterr().out)
    assert qemu["kho_restore"]["profile"] == "qemu-tcg-x86" and stingray["kho_restore"]["profile"] == "stingray"
    assert qemu["memblock_region_visits"] == stingray["memblock_region_visits"] > qemu["preserved_units"]
    assert qemu["kho_restore_s"] != stingray["kho_restore_s"] and qemu["free_list_s"] > 0
    assert main(["boot", image]) == 0
    out = capsys.readouterr().out
    assert "kho_restore_s" in out and "memblock_region_visits" in out


def test_unknown_profile_is_one_line(tmp_path, capsys):
    image = str(tmp_path / "x.kho")
    assert main(["serialize", "--ram", "256M", "--abi", "kho-v2", "--preserve-random", "1M", "--out", image]) == 0
    capsys.readouterr()
    assert main(["boot", image, "--profile", "nope"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("kho: ") and len(err.strip().splitlines()) == 1


def test_counts_refuse_units_inside_the_base_regions():
    phys, size = MC.fragmented_units(4)
    with pytest.raises(KHOError):
        MC.count_memblock(phys, size, (np.array([phys[0]]), np.array([4096]), np.array([0])))


def test_simulate_timelines_carry_the_kho_stages(capsys):
    assert main(["simulate", "--ram", "1G", "--preserve", "8M", "--abi", "kho-v2", "--pattern", "random", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    restore = data["generations"][0]["next_kernel"]["kho_restore"]
    assert restore["memblock_region_visits"] > 0 and restore["path"] == "memblock"
    for t in data["timelines"].values():
        assert t["kho_restore_s"] == pytest.approx(restore["kho_restore_s"])
        assert t["free_list_s"] == pytest.approx(restore["free_list_s"]) and t["free_list_s"] > 0
        assert t["total_s"] == pytest.approx(t["shutdown_s"] + t["relocation_s"] + t["purgatory_s"] + t["startup_s"]
                                             + t["kho_restore_s"] + t["free_list_s"])
    off, on = data["timelines"]["mmu-off"], data["timelines"]["mmu-on"]
    assert on["speedup_vs_mmu_off"] == pytest.approx(off["total_s"] / on["total_s"])
    assert main(["simulate", "--ram", "1G", "--preserve", "8M"]) == 0  # a Linux 7.3 system, its radix map
    out = capsys.readouterr().out
    assert "KHO restore" in out and "memblock region visits" in out


def test_cli_compare_encodings_and_the_qemu_fit(capsys):
    """``kho simulate --compare-encodings`` (item 4) and ``--show-profile`` of the fitted
    profile with its residuals and the note on the contiguous runs (item 2), through the CLI."""
    assert main(["simulate", "--compare-encodings", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {e["encoding"]: e for e in result["encodings"]}
    assert {"kho-v1", "kho-v2", "kho-v4", "instructions"} <= set(rows)
    for row in rows.values():
        assert row["handover_bytes"] > 0 and row["keep_bytes"] >= row["handover_bytes"]
        assert all(p["kho_restore_s"] > 0 for p in row["paths"].values())
    assert main(["simulate", "--profile", "qemu-tcg-x86", "--show-profile"]) == 0
    out = capsys.readouterr().out
    assert "contiguous_131072" in out and "interleaved_32768" in out and "least squares" in out
    assert "emulator ran 25% faster" in " ".join(out.split())
