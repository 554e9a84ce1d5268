"""``kho bench``: JSON and markdown output, files written with --out, exit statuses."""

import json
import os
import subprocess
import sys

import pytest

from kho.cli.main import main


def run_json(capsys, *argv):
    assert main(["bench", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_encodings_json(capsys):
    doc = run_json(capsys, "encodings", "--ram", "512M", "--share", "2%", "--encoding", "kho-v2", "instructions",
                   "--runs", "1", "--pattern", "random", "mixed")
    assert doc["kind"] == "encodings" and doc["config"]["encodings"] == ["kho-v2", "instructions"]
    assert [p["pattern"] for p in doc["results"]] == ["random", "mixed"]
    for p in doc["results"]:
        assert p["share"] == 0.02 and [e["encoding"] for e in p["encodings"]] == ["kho-v2", "instructions"]


def test_encodings_markdown_and_out(capsys, tmp_path):
    out = tmp_path / "res"
    assert main(["bench", "encodings", "--ram", "512M", "1G", "--share", "1", "5", "--encoding", "kho-v1",
                 "--runs", "1", "--boot-runs", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# Encodings benchmark") and "| random | 512 MiB | 1% |" in text
    files = set(os.listdir(out))
    assert {"encodings.json", "encodings.md", "README.md", "encodings_bytes_vs_share.png",
            "encodings_time_vs_scale.png"} <= files
    doc = json.loads((out / "encodings.json").read_text())
    assert all(e["paths"] == {} for p in doc["results"] for e in p["encodings"])


def test_reboot_json_and_out(capsys, tmp_path):
    doc = run_json(capsys, "reboot", "--ram", "1G", "--image-size", "10M", "47M", "--out", str(tmp_path))
    assert doc["kind"] == "reboot" and len(doc["results"]["rows"]) == 10
    assert {"reboot.json", "reboot.md", "reboot_tradeoff.png", "README.md"} <= set(os.listdir(tmp_path))


def test_scale_json(capsys):
    doc = run_json(capsys, "scale", "--ram", "1G", "--preserve", "64M", "--encoding", "kho-v2")
    (r,) = doc["results"]["results"]
    assert r["units"] == 16384 and r["verdict"]["held"] and r["verdict"]["within_time"]


@pytest.mark.parametrize("argv", [
    ["encodings", "--share", "0"], ["encodings", "--share", "100"], ["encodings", "--share", "lots"],
    ["encodings", "--runs", "0"], ["encodings", "--boot-runs", "-1"], ["encodings", "--pattern", "bogus"],
    ["encodings", "--encoding", "bogus"], ["encodings", "--ram", "big"], ["reboot", "--image-size", "x"],
    ["scale", "--encoding", "bogus"], [],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", *argv])
    assert info.value.code == 2


@pytest.mark.parametrize("argv", [
    ["encodings", "--ram", "4097", "--runs", "1"],
    ["reboot", "--ram", "1G", "--image-size", "1G"],
    ["reboot", "--ram", "1G", "--profile", "no-such-profile"],
    ["scale", "--ram", "1G", "--preserve", "1G"],
])
def test_bad_input_exit_3(argv, capsys):
    assert main(["bench", *argv]) == 3
    err = capsys.readouterr().err
    assert err.startswith("kho: ") and err.count("\n") == 1


def test_no_traceback_on_usage_error():
    result = subprocess.run([sys.executable, "-m", "kho.cli.main", "bench", "encodings", "--share", "-5"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
