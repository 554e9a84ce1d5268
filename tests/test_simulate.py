"""kho simulate end to end: generations, modes, calibration, impossible configurations, CLI."""

import json

import pytest

from kho.cli.main import main
from kho.errors import KHOError
from kho.simulation import simulate as S

MIB, GIB = 1 << 20, 1 << 30


def small(**kw):
    base = dict(ram=2 * GIB, preserve=32 * MIB, image_size=8 * MIB)
    base.update(kw)
    return S.Config(**base)


@pytest.fixture(scope="module")
def default_run():
    """The default simulation (8 GiB, 47 MB image, kho-v2, mmu-on, stingray)."""
    return S.run(S.Config())


def test_default_run_verifies_everything(default_run):
    g = default_run.generations[0]
    assert default_run.ok
    assert g.verify.folios > 10 and g.verify.folio_bytes > 100 * MIB
    assert g.lost_units == 0 and g.leaked_units == 0
    assert g.purgatory["ok"] and g.purgatory["bytes_hashed"] >= 47 * MIB
    assert g.relocation["pages_copied"] == g.kexec_pages["source"] >= 47 * MIB // 4096
    assert g.boot["revived"]


def test_default_run_tables_are_about_16mib(default_run):
    tables = default_run.generations[0].tables
    assert tables["by_level"] == {0: 1, 1: 1, 2: 8, 3: 4096}
    assert abs(tables["bytes"] / MIB - 16) < 0.1


@pytest.mark.parametrize("mode, generations", [("mmu-on", 3), ("mmu-off", 2), ("reserved", 3)])
def test_chained_generations(mode, generations):
    result = S.run(small(relocation=mode, generations=generations))
    assert result.ok
    assert len(result.generations) == generations
    for g in result.generations:
        assert g.verify.ok and g.verify.folios > 0
        assert g.lost_units == 0 and g.leaked_units == 0
        assert (g.tables is not None) == (mode == "mmu-on")
        assert (g.region is not None) == (mode == "reserved")
        assert g.relocation["pages_copied"] == (0 if mode == "reserved" else g.kexec_pages["source"])


def test_reserved_regions_avoid_the_running_kernel():
    result = S.run(small(relocation="reserved", generations=3))
    for prev, cur in zip(result.generations, result.generations[1:]):
        kernel = prev.segments[0]  # the kernel the next generation runs, loaded in the previous region
        region = cur.region
        assert region["phys"] >= kernel["mem"] + kernel["memsz"] or region["phys"] + region["size"] <= kernel["mem"]


@pytest.mark.parametrize("abi, path", [("kho-v1", "memblock"), ("instructions", "instructions"), ("maple", "memblock")])
def test_other_encodings(abi, path):
    assert S.run(small(abi=abi, boot_path=path, generations=2, pattern="random", preserve=8 * MIB)).ok


def test_block_linear_map_needs_a_few_pages():
    result = S.run(small(linear_map="block"))
    assert result.ok and result.generations[0].tables["pages"] <= 8


def test_calibration_through_the_simulation():
    for size, published in ((47 * MIB, 0.440510736), (37 * MIB, 0.35)):
        result = S.run(small(ram=GIB, image_size=size, relocation="mmu-off", checks=False, preserve=8 * MIB))
        assert result.generations[0].timeline.relocation_s == pytest.approx(published, rel=0.05)
        if size == 47 * MIB:
            assert result.timelines["mmu-on"].relocation_s == pytest.approx(0.022158152, rel=0.10)
            assert result.speedup("mmu-on") == pytest.approx(2.16, rel=0.05)


@pytest.mark.parametrize("kw, errno", [
    (dict(image_size=1 * GIB, ram=4 * GIB), "EADDRNOTAVAIL"),  # larger than any scratch area
    (dict(preserve=3 * GIB), "EINVAL"),  # larger than RAM
    (dict(preserve=1900 * MIB), "ENOMEM"),  # more than is free
    (dict(generations=0), "EINVAL"),
    (dict(abi="ranges"), "EINVAL"),
    (dict(boot_path="instructions"), "EINVAL"),
    (dict(relocation="mmu-sideways"), "EINVAL"),
    (dict(linear_map="huge"), "EINVAL"),
    (dict(image_size=4096), "EINVAL"),
])
def test_impossible_configurations(kw, errno):
    with pytest.raises(KHOError) as info:
        S.run(small(**kw))
    assert info.value.errno_name == errno


def test_save_image(tmp_path):
    from kho.handover.imagefile import load_image

    path = tmp_path / "h.kho"
    assert S.run(small(save_image=str(path))).ok
    loaded = load_image(str(path))
    assert loaded.encoding == "kho-v4"  # the default: a Linux 7.3 system
    path = tmp_path / "v2.kho"
    assert S.run(small(abi="kho-v2", save_image=str(path))).ok
    assert load_image(str(path)).encoding == "kho-v2"


def test_compare_orders_time_against_memory():
    from kho.kexec.profiles import load_profile

    rows = S.compare(8 * GIB, 47 * MIB, load_profile("stingray"))
    by = {(r.mode, r.linear_map): r for r in rows}
    off, page, block, reserved = by[("mmu-off", None)], by[("mmu-on", "page")], by[("mmu-on", "block")], by[("reserved", None)]
    assert off.relocation_s > page.relocation_s > reserved.relocation_s == 0
    assert page.memory_bytes - off.memory_bytes == (4106 + 4) * 4096
    assert block.memory_bytes - off.memory_bytes == (2 + 4) * 4096
    assert reserved.lifetime == "forever" and reserved.memory_bytes >= 47 * MIB
    assert reserved.transient_bytes == 0 and off.transient_bytes >= 47 * MIB


# -- CLI ---------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    code = main(["simulate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json(capsys):
    code, out, err = run_cli(capsys, "--ram", "2G", "--preserve", "16M", "--image-size", "8M", "--json", "--generations", "2")
    assert code == 0
    data = json.loads(out)
    assert data["ok"] and len(data["generations"]) == 2
    assert set(data["timelines"]) == {"mmu-off", "mmu-on", "reserved"}
    assert data["generations"][0]["verify"]["failures"] == []


def test_cli_human_output(capsys):
    code, out, err = run_cli(capsys, "--ram", "2G", "--preserve", "16M", "--image-size", "8M", "--no-checks")
    assert code == 0
    assert "Reboot timeline" in out and "MMU on *" in out and "verified" in out
    assert err == ""  # no progress display when stderr is not a terminal


@pytest.mark.parametrize("argv", [
    ["--ram", "2G", "--image-size", "1G"],
    ["--ram", "2G", "--preserve", "4G"],
    ["--profile", "nonesuch"],
    ["--profile-set", "warp=9"],
    ["--plot", "x.png"],
])
def test_cli_bad_configuration_exits_3(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 3
    assert err.startswith("kho: ") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["--relocation", "sideways"], ["--ram", "lots"], ["--generations", "x"]])
def test_cli_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(["simulate", *argv])
    assert info.value.code == 2


def test_cli_show_profile(capsys):
    code, out, err = run_cli(capsys, "--show-profile")
    assert code == 0 and "least squares" in out and "whole-reboot speedup" in out
    code, out, err = run_cli(capsys, "--show-profile", "--json")
    assert json.loads(out)["profile"]["name"] == "stingray"


def test_cli_compare_and_plot(capsys, tmp_path):
    png = tmp_path / "tradeoff.png"
    code, out, err = run_cli(capsys, "--compare", "--plot", str(png))
    assert code == 0 and "trade-off" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = run_cli(capsys, "--compare", "--json", "--ram", "1T")
    modes = json.loads(out)["modes"]
    page = next(m for m in modes if m["linear_map"] == "page")
    assert page["memory_bytes"] > 2 * GIB  # about 2 MiB of tables per GiB


def test_cli_user_profile_file(capsys, tmp_path):
    path = tmp_path / "board.json"
    path.write_text(json.dumps({"name": "board", "uncached_copy": "50M/s", "cached_copy": "1G/s", "cache_clean": "4G/s",
                                "shutdown": 0.1, "startup": 1}))
    code, out, err = run_cli(capsys, "--profile", str(path), "--ram", "2G", "--preserve", "16M", "--json",
                             "--no-checks", "--relocation", "mmu-off")
    data = json.loads(out)
    assert data["profile"]["profile"]["name"] == "board"
    moved = sum(s["memsz"] for s in data["generations"][0]["segments"])
    assert data["timelines"]["mmu-off"]["relocation_s"] == pytest.approx(moved / (50 * MIB))


@pytest.mark.parametrize("page_size", [16384, 65536])
def test_other_page_sizes(page_size):
    result = S.run(small(page_size=page_size, abi="kho-v1", preserve=16 * MIB))
    assert result.ok
    levels = result.generations[0].tables["by_level"]
    assert len(levels) == (4 if page_size == 16384 else 3)
