"""JSON documents, markdown tables, the results index and the PNG plots."""

import json
import os

import pytest

from kho.benchmark import plots, report
from kho.benchmark.encodings import Point, run_points
from kho.benchmark.reboot import run_reboot
from kho.errors import KHOError
from kho.sizes import format_size

MIB, GIB = 1 << 20, 1 << 30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def points():
    pts = [Point(p, 512 * MIB, s) for p in ("random", "huge") for s in (0.01, 0.1)]
    pts += [Point("random", 1 * GIB, 0.1), Point("runs", 512 * MIB, 0.95)]
    return run_points(pts, ["kho-v2", "instructions", "ranges"], runs=1)


@pytest.fixture(scope="module")
def reboot():
    return run_reboot([1 * GIB, 8 * GIB], [10 * MIB, 47 * MIB], simulate_max_ram=1 * GIB)


def rows_of(md: str) -> list[list[str]]:
    """The cells of every markdown table row (separator rows excluded)."""
    out = []
    for line in md.splitlines():
        if line.startswith("|") and not line.startswith("|:") and not line.startswith("|-"):
            out.append([c.strip() for c in line.strip("|").split("|")])
    return out


def well_formed(md: str) -> bool:
    """Every table's rows have as many cells as its header."""
    width = None
    for line in md.splitlines():
        if not line.startswith("|"):
            width = None
            continue
        cells = line.strip().strip("|").split("|")
        width = width or len(cells)
        if len(cells) != width:
            return False
    return True


def test_document_round_trip(tmp_path, points):
    doc = report.document("encodings", {"runs": 1}, points)
    assert doc["schema"] == report.SCHEMA and doc["kind"] == "encodings" and doc["config"] == {"runs": 1}
    assert {"cpu", "cores", "python", "numpy", "kho", "date"} <= set(doc["machine"])
    path = str(tmp_path / "e.json")
    report.dump(doc, path)
    assert report.load(path, "encodings") == json.loads(json.dumps(doc))


def test_load_refuses(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "something-else"}))
    good = tmp_path / "good.json"
    report.dump(report.document("sizes", {}, {}), str(good))
    for path, kind in ((bad, None), (other, None), (good, "scale")):
        with pytest.raises(KHOError) as info:
            report.load(str(path), kind)
        assert info.value.errno_name == "EINVAL"
    with pytest.raises(KHOError):
        report.document("nonsense", {}, [])


def test_encodings_markdown(points):
    md = report.markdown(report.document("encodings", {}, points))
    assert md.startswith("# Encodings benchmark") and well_formed(md)
    rows = rows_of(md)
    every = [r for r in rows if len(r) == 14][1:]  # the per-encoding table, header dropped
    assert len(every) == 5 * 3
    assert {r[4] for r in every} == {"kho-v2", "instructions", "ranges"}
    assert all(r[12] in ("kept", "lost") for r in every)
    winners = [r for r in rows if len(r) == 8][1:]
    assert len(winners) == 5
    assert "## Points that could not run" in md and "runs, 95% of 512 MiB: ENOMEM" in md


def test_reboot_and_scale_markdown(reboot):
    md = report.markdown(report.document("reboot", {}, reboot))
    assert md.startswith("# Reboot benchmark") and well_formed(md)
    assert "Simulated reboots against the model" in md and "verified" in md
    rows = [r for r in rows_of(md) if len(r) == 9][1:]
    assert len(rows) == len(reboot["rows"])
    fake = {"ram_bytes": GIB, "preserved_bytes": 256 * MIB, "seed": 1, "boot": False, "results": [
        {"encoding": "maple", "error": "kho: ENOMEM: out", "returncode": 3}]}
    md = report.markdown(report.document("scale", {}, fake))
    assert "failed: kho: ENOMEM" in md and well_formed(md)


def test_formatting():
    assert format_size(48 << 20) == "48 MiB" and format_size(100) == "100 B" and format_size(None) == "-"
    assert format_size(1 << 40) == "1 TiB" and format_size(47 << 20) == "47 MiB" and format_size(1536) == "1.5 KiB"
    assert format_size(48.25 * (1 << 20)) == "48.2 MiB" and format_size(65536 << 20) == "64 GiB"
    assert report.fmt_s(0.0123456) == "0.0123" and report.fmt_s(None) == "-"
    assert report.table(["a", "b"], [[1, 2]]) == "| a | b |\n|:---|---:|\n| 1 | 2 |\n"


def test_plots_written(tmp_path, points, reboot):
    paths = [plots.bytes_vs_share(points, str(tmp_path / "encodings_bytes_vs_share.png")),
             plots.time_vs_scale(points, str(tmp_path / "encodings_time_vs_scale.png")),
             plots.reboot_tradeoff(reboot, str(tmp_path / "reboot_tradeoff.png"))]
    for path in paths:
        data = open(path, "rb").read()
        assert data.startswith(PNG_MAGIC) and 10_000 < len(data) < 200_000


def test_plots_need_results(tmp_path):
    with pytest.raises(KHOError):
        plots.bytes_vs_share([], str(tmp_path / "x.png"))
    with pytest.raises(KHOError):
        plots.time_vs_scale([{"pattern": "runs", "ram_bytes": GIB, "share": 0.5, "error": "ENOMEM"}], str(tmp_path / "x.png"))
    with pytest.raises(KHOError):
        plots.reboot_tradeoff({"rows": [], "profile": {"name": "x"}}, str(tmp_path / "x.png"))


def test_index(tmp_path, points, reboot):
    out = str(tmp_path)
    report.dump(report.document("encodings", {}, points), os.path.join(out, "encodings.json"))
    report.dump(report.document("reboot", {}, reboot), os.path.join(out, "reboot.json"))
    plots.reboot_tradeoff(reboot, os.path.join(out, "reboot_tradeoff.png"))
    text = open(report.write_index(out)).read()
    assert "## encodings" in text and "## reboot" in text and "## scale" not in text
    assert "[`reboot_tradeoff.png`](reboot_tradeoff.png)" in text


RESULTS = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "results")


@pytest.mark.parametrize("kind", sorted(report.FILES))
def test_committed_results_load_and_render(kind):
    path = os.path.join(RESULTS, report.FILES[kind])
    if not os.path.exists(path):
        pytest.skip(f"{path} not written yet (python bench/run_all.py)")
    doc = report.load(path, kind)
    assert well_formed(report.markdown(doc))
