"""``kho serialize``, ``kho units`` and ``kho dump``: output, every registered ABI, bad input."""

import json
import struct

import msgpack
import pytest

from kho.cli.main import main
from kho.encodings import ENCODINGS, load_all

PS = 4096


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kho: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def units_file(tmp_path):
    path = tmp_path / "units.txt"
    path.write_text("# preserved folios\n0x3000000 0\n\n0x3005000   0   # page 5 of the block\n"
                    "53477376 2\n0x3400000 10\n")
    return path


def serialize(capsys, tmp_path, *extra, name="x.kho"):
    out_path = tmp_path / name
    code, out, err = run(capsys, "serialize", "--ram", "1G", *extra, "--out", out_path)
    return code, out, err, out_path


@pytest.mark.parametrize("abi, extra", [("kho-v1", []), ("kho-v1", ["--bitmap-bytes", "512"]), ("kho-v2", [])])
def test_units_file_round_trip(capsys, tmp_path, units_file, abi, extra):
    code, out, err, image = serialize(capsys, tmp_path, "--abi", abi, *extra, "--units", units_file)
    assert code == 0 and err == "" and abi in out
    code, out, err = run(capsys, "units", image)
    assert code == 0 and out == "0x3000000 0\n0x3005000 0\n0x3300000 2\n0x3400000 10\n"
    code, out, _ = run(capsys, "dump", image, "--json")
    report = json.loads(out)
    assert report["abi"] == abi and report["units"] == 4 and report["exact_orders"]
    assert report["per_order"] == [{"order": 0, "units": 2, "pages": 2}, {"order": 2, "units": 1, "pages": 4},
                                   {"order": 10, "units": 1, "pages": 1024}]
    assert report["options"] == ({"bitmap_bytes": 512 if extra else "page"} if abi == "kho-v1" else {})
    assert report["fdt_size"] == PS and 0 < report["fdt_bytes"] <= PS and report["metadata_pages"] > 0
    code, out, _ = run(capsys, "dump", image)
    assert code == 0 and abi in out and "order 10" in out and "metadata" in out
    code, out, _ = run(capsys, "dump", image, "--dts")
    assert code == 0 and out.startswith("/dts-v1/;") and f'compatible = "{abi}";' in out


def test_random_units(capsys, tmp_path):
    code, out, err, image = serialize(capsys, tmp_path, "--abi", "kho-v2", "--preserve-random", "8M", "--order", "2",
                                      "--seed", "4", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["units"] == 512 and summary["preserved_pages"] == 2048
    code, out, _ = run(capsys, "units", image)
    lines = out.splitlines()
    assert len(lines) == 512 and all(line.endswith(" 2") for line in lines)
    addresses = [int(line.split()[0], 16) for line in lines]
    assert addresses == sorted(addresses) and all(a % (PS << 2) == 0 for a in addresses)


def test_mixed_orders(capsys, tmp_path):
    code, _, _, image = serialize(capsys, tmp_path, "--abi", "kho-v1", "--preserve-random", "64M", "--order", "mixed")
    assert code == 0
    report = json.loads(run(capsys, "dump", image, "--json")[1])
    assert len(report["per_order"]) > 3 and report["preserved_pages"] == (64 << 20) // PS


@pytest.mark.parametrize("abi", sorted(load_all()))
def test_every_registered_abi(capsys, tmp_path, abi):
    code, _, err, image = serialize(capsys, tmp_path, "--abi", abi, "--preserve-random", "16M", "--order", "mixed", "--seed", "2")
    assert code == 0, err
    code, out, _ = run(capsys, "units", image)
    fdt_page = 1 if abi == "kho-v4" else 0  # the default kernel (7.3) writes kho-v4 and preserves its FDT page
    assert code == 0 and sum(1 << int(line.split()[1]) for line in out.splitlines()) == (16 << 20) // PS + fdt_page
    code, out, _ = run(capsys, "dump", image, "--json")
    report = json.loads(out)
    assert code == 0 and report["abi"] == abi and report["exact_orders"] == ENCODINGS[abi].keeps_orders
    if not ENCODINGS[abi].keeps_orders:
        assert "LOST" in run(capsys, "dump", image)[1]


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("content, needle", [
    ("0x3000000 0\nbogus line\n", "line 2"),
    ("0x3000000\n", "line 1"),
    ("0x3001000 1\n", "line 1"),  # misaligned for order 1
    ("0x3000000 0\n0x3000000 1\n", "line 2"),  # overlaps line 1
    ("0x3000000 11\n", "line 1"),  # above MAX_PAGE_ORDER
    ("0x100000000 0\n", "line 1"),  # outside 1 GiB of RAM
    ("0x0 0\n", "line 1"),  # the running kernel's image
    ("0x39000000 0\n", "line 1"),  # a scratch area
    ("010 0\n", "line 1"),
    ("# nothing\n", "no units"),
])
def test_bad_units_files(capsys, tmp_path, content, needle):
    path = tmp_path / "u.txt"
    path.write_text(content)
    code, out, err, image = serialize(capsys, tmp_path, "--abi", "kho-v2", "--units", path)
    assert code == 3 and needle in one_error_line(err) and not image.exists()


@pytest.mark.parametrize("argv", [
    ["--abi", "kho-v2", "--preserve-random", "1M", "--order", "11"],
    ["--abi", "kho-v2", "--preserve-random", "6K"],
    ["--abi", "kho-v2", "--preserve-random", "1M", "--order", "big"],
    ["--abi", "kho-v2", "--preserve-random", "2G"],
    ["--abi", "kho-v2", "--units", "/nonexistent/units.txt"],
])
def test_bad_options_exit_3(capsys, tmp_path, argv):
    code, _, err, _ = serialize(capsys, tmp_path, *argv)
    assert code == 3
    one_error_line(err)


@pytest.mark.parametrize("argv", [
    ["--abi", "kho-v9", "--preserve-random", "1M"],
    ["--abi", "kho-v2"],
    ["--abi", "kho-v2", "--preserve-random", "1M", "--units", "u.txt"],
    ["--abi", "kho-v2", "--preserve-random", "lots"],
    ["--abi", "kho-v1", "--bitmap-bytes", "1024", "--preserve-random", "1M"],
])
def test_usage_errors_exit_2(capsys, tmp_path, argv):
    with pytest.raises(SystemExit) as exit_:
        serialize(capsys, tmp_path, *argv)
    assert exit_.value.code == 2


def rewrite_page(image, phys, edit):
    """Rewrite the stored page at ``phys`` of an image file with ``edit(bytes) -> bytes``."""
    top = msgpack.unpackb(image.read_bytes(), raw=False)
    pfn = phys // PS
    for run_ in top["pages"]:
        first, data = run_
        if first <= pfn < first + len(data) // PS:
            offset = (pfn - first) * PS
            run_[1] = data[:offset] + edit(data[offset:offset + PS]) + data[offset + PS:]
            image.write_bytes(msgpack.packb(top, use_bin_type=True))
            return top
    raise AssertionError(f"page {phys:#x} not in the image")


@pytest.fixture
def good_image(capsys, tmp_path, units_file):
    code, _, _, image = serialize(capsys, tmp_path, "--abi", "kho-v1", "--units", units_file, name="good.kho")
    assert code == 0
    report = json.loads(run(capsys, "dump", image, "--json")[1])
    return image, report


def map_pointer(report):
    return struct.unpack("<Q", bytes.fromhex(report["fdt_props"]["preserved-memory-map"]))[0]


@pytest.mark.parametrize("corrupt, needle", [
    (lambda img, rep: rewrite_page(img, rep["fdt_phys"], lambda p: p.replace(b"kho-v1", b"kho-v7")), "fdt.compatible"),
    (lambda img, rep: rewrite_page(img, rep["fdt_phys"], lambda p: bytes(4) + p[4:]), "fdt.header.magic"),
    (lambda img, rep: rewrite_page(img, map_pointer(rep), lambda p: struct.pack("<Q", map_pointer(rep)) + p[8:]), "chunk.next"),
    (lambda img, rep: rewrite_page(img, map_pointer(rep), lambda p: struct.pack("<Q", 1 << 50) + p[8:]), "chunk.next"),
    (lambda img, rep: rewrite_page(img, map_pointer(rep), lambda p: p[:12] + struct.pack("<I", 300) + p[16:]), "chunk.num_elms"),
    (lambda img, rep: img.write_bytes(img.read_bytes()[:1000]), "image"),
    (lambda img, rep: img.write_bytes(b"not an image"), "image"),
])
@pytest.mark.parametrize("command", ["units", "dump"])
def test_bad_images_exit_3_with_one_line(capsys, good_image, corrupt, needle, command):
    image, report = good_image
    corrupt(image, report)
    code, out, err = run(capsys, command, image)
    assert code == 3 and out == "" and needle in one_error_line(err)


def test_missing_image(capsys, tmp_path):
    code, _, err = run(capsys, "units", tmp_path / "none.kho")
    assert code == 3 and "none.kho" in one_error_line(err)


@pytest.mark.parametrize("kernel, abi, bitmap", [("6.16", "kho-v1", 512), ("7.0", "kho-v1", "page"), ("7.1", "kho-v2", None),
                                                 ("7.2", "kho-v3", None), ("7.3", "kho-v4", None)])
def test_kernel_versions(capsys, tmp_path, kernel, abi, bitmap):
    code, out, err, image = serialize(capsys, tmp_path, "--kernel", kernel, "--preserve-random", "4M", "--order", "1", "--json")
    summary = json.loads(out)
    assert code == 0, err
    assert summary["kernel"] == kernel and summary["abi"] == abi
    assert summary["options"].get("bitmap_bytes") == bitmap
    live = kernel >= "7.1"
    assert summary["units"] == 512 + (1 if live else 0)  # 7.1+ preserve the FDT page itself
    code, out, _ = run(capsys, "units", image)
    assert code == 0 and len(out.splitlines()) == summary["units"]


def test_unknown_kernel_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["serialize", "--ram", "1G", "--kernel", "5.4", "--preserve-random", "4M", "--out", str(tmp_path / "x.kho")])
    assert exit_.value.code == 2


def test_x86_image_boots_from_boot_params(capsys, tmp_path):
    code, out, err, image = serialize(capsys, tmp_path, "--arch", "x86_64", "--preserve-random", "4M", "--json")
    assert code == 0, err
    assert json.loads(out)["arch"] == "x86_64"
    code, out, err = run(capsys, "boot", image, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["arch"] == "x86_64" and report["revived"] is True
