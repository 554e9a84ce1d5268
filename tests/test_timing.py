"""Timing model: the stingray calibration against the published figures, user profiles."""

import json

import pytest

from kho.errors import KHOError
from kho.kexec import profiles as PR
from kho.kexec import timing as TM

MIB = 1 << 20


@pytest.fixture(scope="module")
def stingray():
    return PR.load_profile("stingray").profile


def test_stingray_47mb_calibration(stingray):
    off = TM.reboot_timeline(stingray, "mmu-off", 47 * MIB)
    on = TM.reboot_timeline(stingray, "mmu-on", 47 * MIB)
    assert off.relocation_s == pytest.approx(0.4405, rel=0.05)
    assert on.relocation_s == pytest.approx(0.02216, rel=0.10)
    assert off.total_s / on.total_s == pytest.approx(2.16, rel=0.05)
    assert off.relocation_share == pytest.approx(0.582, rel=0.05)
    assert on.relocation_share == pytest.approx(0.063, rel=0.10)


def test_stingray_37mb_calibration(stingray):
    assert TM.reboot_timeline(stingray, "mmu-off", 37 * MIB).relocation_s == pytest.approx(0.35, rel=0.05)


def test_stingray_parameters_are_derived_not_given():
    report = PR.load_profile("stingray")
    assert "least squares" in report.derivation["uncached_copy"]
    assert "least squares" in report.derivation["cache_clean"]
    assert report.profile.cached_copy_bps == 2857 * MIB
    quantities = {(r.label, r.quantity) for r in report.rows}
    assert ("47 MB, MMU off / 47 MB, MMU on", "whole-reboot speedup") in quantities
    assert all(abs(r.error) < 0.05 for r in report.rows)


def test_reserved_has_no_relocation_and_purgatory_adds_hashing(stingray):
    t = TM.reboot_timeline(stingray, "reserved", 47 * MIB, hashed_bytes=47 * MIB)
    assert t.relocation_s == 0
    assert t.purgatory_s == pytest.approx(47 * MIB / stingray.sha256_bps)
    assert t.total_s == pytest.approx(stingray.shutdown_s + stingray.startup_s + t.purgatory_s)


def test_relocation_is_linear_in_bytes(stingray):
    for mode in ("mmu-off", "mmu-on"):
        a = stingray.relocation_s(mode, 10 * MIB)
        assert stingray.relocation_s(mode, 30 * MIB) == pytest.approx(3 * a)


def test_user_profile_from_toml(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text('''
name = "board"
cached_copy = "4G/s"
sha256 = "500M/s"
[[measurement]]
mode = "mmu-off"
image = "20M"
relocation = 0.2
shutdown = "10ms"
startup = 0.5
[[measurement]]
mode = "mmu-on"
image = "20M"
relocation = 0.01
''')
    report = PR.load_profile(str(path))
    p = report.profile
    assert p.name == "board"
    assert p.uncached_copy_bps == pytest.approx(20 * MIB / 0.2)
    assert p.relocation_s("mmu-on", 20 * MIB) == pytest.approx(0.01)
    assert p.shutdown_s == pytest.approx(0.01) and p.startup_s == 0.5
    assert p.sha256_bps == 500 * MIB
    assert report.derivation["sha256"] == "given"


def test_user_profile_from_json_parameters_and_overrides(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"uncached_copy": 1e8, "cached_copy": "3G/s", "cache_clean": "10G/s",
                                "shutdown": 0.02, "startup": "300ms"}))
    report = PR.load_profile(str(path), {"startup": "0.1"})
    assert report.profile.startup_s == pytest.approx(0.1)
    assert report.profile.sha256_bps == 1e8
    assert "assumed" in report.derivation["sha256"]
    assert report.rows == []


def test_overrides_on_builtin():
    assert PR.load_profile("stingray", {"shutdown": "1s"}).profile.shutdown_s == 1.0


@pytest.mark.parametrize("text, match", [
    ('name = "x"\nshutdown = 0.1\nstartup = 0.1\ncached_copy = "1G/s"', "uncached_copy"),
    ('uncached_copy = "1M/s"\nshutdown = 0.1\nstartup = 0.1', "cached_copy"),
    ('uncached_copy = "1M/s"\ncached_copy = "1G/s"\nstartup = 0.1\ncache_clean = "1G/s"', "shutdown"),
    ('uncached_copy = "fast"', "invalid rate"),
    ('bandwidth = "1G/s"', "unknown profile keys"),
    ('[[measurement]]\nmode = "mmu-up"\nimage = "1M"\nrelocation = 1', "mode"),
    ('[[measurement]]\nmode = "mmu-off"\nrelocation = 1', "image is required"),
    ('uncached_copy = "-1M/s"', "invalid rate"),
    ('shutdown = "soon"', "invalid time"),
    ('this is not toml', "not a valid"),
])
def test_bad_profiles(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(KHOError, match=match):
        PR.load_profile(str(path))


def test_mmu_on_faster_than_bandwidth_is_inconsistent():
    with pytest.raises(KHOError, match="faster"):
        TM.fit_profile("x", [TM.Measurement("a", "mmu-on", MIB, 1e-6, 0.1, 0.1),
                             TM.Measurement("b", "mmu-off", MIB, 0.1)], {"cached_copy": float(MIB)})


def test_unknown_profile_name():
    with pytest.raises(KHOError, match="built-in"):
        PR.load_profile("no-such-board")


@pytest.mark.parametrize("text, value", [("2857M/s", 2857 * MIB), ("1.5GiB/s", 1.5 * (1 << 30)), ("100", 100.0),
                                         (" 4 K / s", 4096.0)])
def test_parse_rate(text, value):
    assert PR.parse_rate(text) == value


@pytest.mark.parametrize("text, value", [("0.29", 0.29), ("290ms", 0.29), ("22us", 22e-6), (1, 1.0)])
def test_parse_time(text, value):
    assert PR.parse_time(text) == pytest.approx(value)
