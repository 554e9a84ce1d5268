"""The benchmark library on tiny machines: the figures it reports, not how fast anything is."""

import numpy as np
import pytest

from kho.benchmark import encodings as benc
from kho.benchmark.encodings import BenchmarkError, Point, boot_paths, measure_encoding, prepare, run_point, run_points
from kho.benchmark.environment import machine_info
from kho.benchmark.progress import no_progress, progress
from kho.encodings import DecodedMap
from kho.errors import KHOError

MIB, GIB = 1 << 20, 1 << 30
RAM = 512 * MIB


@pytest.fixture(scope="module")
def random_point():
    return run_point(Point("random", RAM, 0.05), ["kho-v2", "instructions", "ranges", "ranges-packed"], runs=2)


def by_name(point):
    return {e["encoding"]: e for e in point["encodings"]}


def test_point_figures(random_point):
    p = random_point
    assert p["pattern"] == "random" and p["ram_bytes"] == RAM and p["share"] == 0.05
    assert p["preserved_pages"] == p["units"] == int(RAM * 0.05) // 4096
    assert p["units_by_order"] == {"0": p["units"]}
    assert p["runs"] == p["boot_runs"] == 2 and p["tracker_bytes"] > 0
    assert [e["encoding"] for e in p["encodings"]] == ["kho-v2", "instructions", "ranges", "ranges-packed"]


def test_encoding_figures(random_point):
    encs = by_name(random_point)
    pages = random_point["preserved_pages"]
    for e in encs.values():
        assert e["total_bytes"] == e["metadata_bytes"] + e["fdt_bytes"]
        assert e["metadata_bytes"] == e["metadata_pages"] * 4096
        assert e["bytes_per_page"] == pytest.approx(e["total_bytes"] / pages)
        assert e["encode_s"] > 0 and e["decode_s"] > 0
        assert e["fdt_fits_page"] == (e["fdt_min_bytes"] <= 4096)
    assert encs["kho-v2"]["orders_survive"] and encs["instructions"]["orders_survive"]
    assert encs["kho-v2"]["keeps_orders"] and not encs["ranges"]["keeps_orders"]
    assert encs["ranges"]["metadata_pages"] == 0 and encs["ranges"]["details"]["nr_ranges"] > 0
    assert encs["ranges"]["fdt_bytes"] == 16 * encs["ranges"]["details"]["nr_ranges"]


def test_boot_paths(random_point):
    encs = by_name(random_point)
    units = random_point["units"]
    assert set(encs["kho-v2"]["paths"]) == {"memblock"}
    assert set(encs["instructions"]["paths"]) == {"memblock", "instructions"}
    for e in (encs["kho-v2"], encs["instructions"]):
        mb = e["paths"]["memblock"]
        assert e["handover"] == "ok" and mb["preserved_units"] == units
        assert mb["memblock_reserve_calls"] > units  # one per unit plus the kernel's own
        assert mb["rebuild_s"] > 0 and mb["free_pages"] > 0
    walk = encs["instructions"]["paths"]["instructions"]
    assert walk["memblock_reserve_calls"] < 10 and walk["free_pages"] == encs["instructions"]["paths"]["memblock"]["free_pages"]
    assert boot_paths("kho-v1") == ("memblock",) and boot_paths("instructions") == ("memblock", "instructions")


def test_ranges_handover_recorded(random_point):
    """Either the next kernel booted it, or the reason the handover failed is kept."""
    e = by_name(random_point)["ranges"]
    assert e["handover"] == "ok" and "memblock" in e["paths"] or e["handover"].split(":")[0] in ("E2BIG", "ENOMEM")


def test_measure_leaves_the_machine_as_it_was():
    machine, tracker, phys, order, _ = prepare(Point("mixed", RAM, 0.1))
    free, stored = machine.allocator.nr_free_pages, machine.memory.nr_stored_pages
    for name in ("kho-v1", "maple", "instructions"):
        measure_encoding(name, machine, tracker, phys, order, runs=2, boot_runs=1)
        assert machine.allocator.nr_free_pages == free and machine.memory.nr_stored_pages == stored


def test_orders_lost_but_pages_kept():
    machine, tracker, phys, order, _ = prepare(Point("random", RAM, 0.3))  # neighbours merge into longer units
    e = measure_encoding("ranges-packed", machine, tracker, phys, order, runs=1, boot_runs=0)
    assert not e["orders_survive"] and e["paths"] == {} and e["handover"] is None


def test_a_wrong_decode_is_an_error():
    machine, tracker, phys, order, _ = prepare(Point("random", RAM, 0.01))
    missing = DecodedMap(phys[1:], order[1:], exact_orders=False, metadata_pages=np.empty(0, np.uint64))
    with pytest.raises(BenchmarkError):
        benc._check_decoded("x", machine.memory, missing, phys, order)
    reordered = DecodedMap(phys, order + np.uint8(1), exact_orders=True, metadata_pages=np.empty(0, np.uint64))
    with pytest.raises(BenchmarkError):
        benc._check_decoded("x", machine.memory, reordered, phys, order)


@pytest.mark.parametrize("point, what", [
    (Point("nonsense", RAM, 0.1), "pattern"),
    (Point("random", RAM + 1, 0.1), "multiple"),
    (Point("random", RAM, 0.0), "between"),
    (Point("random", RAM, 1.0), "between"),
    (Point("random", RAM, 1e-9), "less than a page"),
])
def test_bad_points(point, what):
    with pytest.raises(KHOError) as info:
        run_point(point, ["kho-v2"], runs=1)
    assert info.value.errno_name == "EINVAL" and what in info.value.message


def test_bad_settings():
    for kwargs in ({"runs": 0}, {"runs": 1, "boot_runs": -1}):
        with pytest.raises(KHOError):
            run_point(Point("random", RAM, 0.01), ["kho-v2"], **kwargs)
    with pytest.raises(KHOError) as info:
        run_point(Point("random", RAM, 0.01), ["no-such-encoding"], runs=1)
    assert info.value.errno_name == "EINVAL"


def test_points_that_do_not_fit_are_recorded():
    out = run_points([Point("runs", RAM, 0.9), Point("random", RAM, 0.01)], ["kho-v2"], runs=1, boot_runs=0)
    assert out[0]["error"].startswith("ENOMEM") and out[0]["pattern"] == "runs"
    assert "error" not in out[1] and len(out[1]["encodings"]) == 1


def test_step_count_matches_the_calls():
    calls = []
    names = ["kho-v2", "instructions"]
    run_point(Point("random", RAM, 0.01), names, runs=2, boot_runs=1, step=calls.append)
    assert len(calls) == benc.steps_per_point(names, 2, 1)
    calls.clear()
    run_point(Point("random", RAM, 0.01), names, runs=1, boot_runs=0, step=calls.append)
    assert len(calls) == benc.steps_per_point(names, 1, 0)


def test_progress_bar_runs_and_can_be_off():
    with progress(2, enabled=False) as step:
        assert step is no_progress
    with progress(2, enabled=True) as step:
        step("one")
        step("two")


def test_machine_info():
    info = machine_info()
    assert set(info) == {"cpu", "cores", "ram_bytes", "os", "python", "numpy", "kho", "date"}
    assert info["cores"] >= 1 and info["numpy"] == np.__version__ and "T" in info["date"]
