import json
import subprocess
import sys

import pytest

from kho import __version__
from kho.cli.main import main


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and __version__ in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_track_json(capsys):
    assert main(["track", "--ram", "1G", "--preserve-random", "64M", "--json", "--seed", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["units"] == 16384 and report["preserved_pages"] == 16384
    assert report["bitmap_bytes"] == report["bitmaps"] * 4096


def test_bad_input_is_one_line_exit_3(capsys):
    assert main(["track", "--ram", "1G", "--kho-scratch", "nonsense"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("kho: ") and err.count("\n") == 1


def test_usage_error_exit_2():
    result = subprocess.run([sys.executable, "-m", "kho.cli.main", "track", "--ram", "lots"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_track_refuses_an_order_above_max_page_order(capsys):
    assert main(["track", "--ram", "1G", "--order", "11"]) == 3
    assert "MAX_PAGE_ORDER" in capsys.readouterr().err
