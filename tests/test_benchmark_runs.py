"""The design sizes, reboot and scale benchmarks (library), on small configurations."""

import pytest

from kho.benchmark import design, scale
from kho.benchmark.reboot import check_sizes, run_reboot, steps
from kho.errors import KHOError

MIB, GIB, KIB = 1 << 20, 1 << 30, 1 << 10


@pytest.fixture(scope="module")
def sizes():
    return design.design_sizes()


def test_design_sizes_exact(sizes):
    b = sizes["bitmaps_16g"]
    assert b["preserved_pages"] == 4_194_304
    assert b["page"]["bytes"] == b["linux_6_16"]["bytes"] == 512 * KIB
    assert (b["page"]["bitmaps"], b["linux_6_16"]["bitmaps"]) == (128, 1024)
    r = sizes["ranges_isolated"]
    assert r["ranges"] == 4_194_304 and r["bytes"] == 64 * MIB
    p = sizes["packed_512k"]
    assert p["full"]["bytes"] == 512 * KIB and p["one_more"]["bytes"] == 512 * KIB + 4096
    assert p["full"]["ranges"] == 65_280 and p["entries_without_headers"] == 65_536
    assert p["full"]["preserved_bytes"] == 65_280 * 4096  # ~256 MiB
    m = sizes["maple_node"]
    assert (m["node_bytes"], m["slots"], m["pivots"]) == (256, 16, 15)
    assert m["nodes"] * 256 <= m["bytes"] < m["nodes"] * 256 + 4096


def test_design_random_ranges_near_the_estimate(sizes):
    r = sizes["ranges_random"]
    assert r["preserved_pages"] == 4_194_304
    assert 2.9e6 < r["ranges"] < 3.2e6 and r["bytes"] == 16 * r["ranges"]


def test_reboot_rows():
    rams, images = [1 * GIB, 8 * GIB], [10 * MIB, 47 * MIB, 1 * GIB]
    out = run_reboot(rams, images)
    pairs = {(r["ram_bytes"], r["image_bytes"]) for r in out["rows"]}
    assert pairs == {(1 * GIB, 10 * MIB), (1 * GIB, 47 * MIB), (8 * GIB, 10 * MIB), (8 * GIB, 47 * MIB), (8 * GIB, 1 * GIB)}
    assert len(out["rows"]) == 5 * len(pairs)  # MMU off, MMU on x 3 linear maps, reserved
    assert out["profile"]["name"] == "stingray" and out["checks"] is False and out["simulated"] == []
    for r in out["rows"]:
        assert r["total_s"] > r["relocation_s"] >= 0
        if r["mode"] == "mmu-off":
            assert r["speedup_vs_mmu_off"] == 1.0 and r["lifetime"] == "until reboot"
        if r["mode"] == "reserved":
            assert r["relocation_s"] == 0 and r["lifetime"] == "forever" and r["memory_bytes"] >= r["image_bytes"]
    tables = {(r["ram_bytes"], r["linear_map"]): r["memory_bytes"] for r in out["rows"]
              if r["mode"] == "mmu-on" and r["image_bytes"] == 10 * MIB}
    assert tables[(8 * GIB, "page")] > tables[(1 * GIB, "page")] > tables[(1 * GIB, "block")]


def test_reboot_simulated_matches_the_model():
    out = run_reboot([1 * GIB], [10 * MIB], simulate_max_ram=1 * GIB)
    assert [s["mode"] for s in out["simulated"]] == ["mmu-off", "mmu-on", "reserved"]
    for s in out["simulated"]:
        assert s["ok"] and s["total_s"] == pytest.approx(s["model_total_s"], rel=1e-9)
    assert steps([1 * GIB], [10 * MIB], 1 * GIB) == 4 and steps([1 * GIB], [10 * MIB]) == 1


@pytest.mark.parametrize("rams, images", [([], [10 * MIB]), ([1 * GIB], []), ([1 * GIB + 1], [10 * MIB]),
                                          ([1 * GIB], [100]), ([1 * GIB], [1 * GIB])])
def test_reboot_bad_sizes(rams, images):
    with pytest.raises(KHOError) as info:
        check_sizes(rams, images)
    assert info.value.errno_name == "EINVAL"


def test_reboot_unknown_profile():
    with pytest.raises(KHOError):
        run_reboot([1 * GIB], [10 * MIB], "no-such-profile")


def test_scale_child_in_process():
    figures = scale.child("kho-v2", 1 * GIB, 64 * MIB, boot=True)
    assert figures["units"] == 16384 and figures["encoding"]["orders_survive"]
    stages = [s["stage"] for s in figures["stages"]]
    assert stages[0] == "prepare" and stages[-1] == "end" and "kho-v2: handover" in stages
    peaks = [s["peak_rss_bytes"] for s in figures["stages"]]
    assert peaks == sorted(peaks) and figures["peak_rss_bytes"] >= peaks[-1] > 0
    v = scale.verdict("kho-v2", figures)
    assert v["held"] and v["within_time"] and v["within_memory"]
    assert v["peak_rss_bytes"] == scale.peak_through_decode(figures) <= figures["peak_rss_bytes"]
    assert not scale.verdict("maple", figures)["held"]


def test_run_scale_children():
    out = scale.run_scale(["kho-v1", "instructions"], 1 * GIB, 128 * MIB)
    assert [r["encoding"]["encoding"] for r in out["results"]] == ["kho-v1", "instructions"]
    assert out["targets"]["encode_decode_s"] == 60 and out["targets"]["peak_rss_bytes"] == 8 * GIB
    assert all(r["verdict"]["held"] and r["encoding"]["paths"] == {} for r in out["results"])
    point = scale.as_point(out)
    assert point["ram_bytes"] == 1 * GIB and point["runs"] == 1 and len(point["encodings"]) == 2


def test_run_scale_records_a_failing_child():
    out = scale.run_scale(["kho-v2"], 512 * MIB, 500 * MIB)  # more than the free pages: ENOMEM in the child
    (r,) = out["results"]
    assert r["encoding"] == "kho-v2" and r["returncode"] == 3 and r["error"].startswith("kho: ENOMEM")
    assert scale.as_point(out) is None
