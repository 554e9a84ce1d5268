"""``kho boot IMAGE``: both paths on real handover images, human and JSON output, bad input."""

import json

import pytest

from kho.cli.main import main


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = {}
    for abi, order in (("instructions", "1"), ("kho-v1", "0")):
        path = tmp_path_factory.mktemp("img") / f"{abi}.kho"
        assert main(["serialize", "--ram", "256M", "--abi", abi, "--preserve-random", "24M", "--order", order,
                     "--seed", "3", "--out", str(path)]) == 0
        out[abi] = str(path)
    return out


def run_json(capsys, *argv):
    capsys.readouterr()
    assert main(["boot", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_both_paths_report_the_same_free_lists(images, capsys):
    mb = run_json(capsys, images["instructions"], "--path", "memblock")
    ins = run_json(capsys, images["instructions"], "--path", "instructions")
    assert mb["revived"] and ins["revived"] and mb["messages"] == []
    assert mb["free_blocks"] == ins["free_blocks"]
    for key in ("free_pages", "free_scratch_pages", "reserved_pages", "preserved_units", "preserved_pages"):
        assert mb[key] == ins[key]
    assert mb["memblock_reserve_calls"] == ins["memblock_reserve_calls"] + mb["preserved_units"]
    assert mb["preserved_pages"] == 24 << 8
    assert mb["free_pages"] + mb["free_scratch_pages"] + mb["reserved_pages"] + mb["preserved_pages"] == mb["ram_pages"]
    assert set(mb["timings_s"]) == set(mb["cpu_s"]) == {"handover", "memblock", "deserialize", "free_lists"}


def test_kernel_abi_image_boots_on_the_memblock_path(images, capsys):
    report = run_json(capsys, images["kho-v1"])
    assert report["abi"] == "kho-v1" and report["path"] == "memblock" and report["revived"]
    assert report["leaked_pages"] == report["preserved_pages"] == 24 << 8


def test_human_output_has_the_tables(images, capsys):
    capsys.readouterr()
    assert main(["boot", images["instructions"], "--path", "instructions"]) == 0
    out = capsys.readouterr().out
    for text in ("KHO revival", "free_area[order]", "memblock_reserve calls", "free_lists", "4 MiB"):
        assert text in out


def test_bad_input_exits_3_with_one_line(images, tmp_path, capsys):
    truncated = tmp_path / "truncated.kho"
    truncated.write_bytes(open(images["instructions"], "rb").read()[:200])
    cases = [[str(tmp_path / "missing.kho")], [str(truncated)], [images["kho-v1"], "--path", "instructions"],
             [images["instructions"], "--kernel-image", "1G"]]
    for argv in cases:
        capsys.readouterr()
        assert main(["boot", *argv]) == 3
        err = capsys.readouterr().err
        assert err.startswith("kho: ") and err.count("\n") == 1, err


def test_usage_errors_exit_2(images):
    for argv in (["boot"], ["boot", images["instructions"], "--path", "fast"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2


def test_lenient_flag_boots_what_only_a_kernel_would_accept(tmp_path, capsys):
    from kho.currentkernel.machine import Machine
    from kho.handover.imagefile import save_image
    from kho.handover.outgoing import KHO

    machine = Machine.boot(64 << 20, kho_scratch="4M,4M,4M", kernel_image=1 << 20, seed=1)
    kho = KHO(machine.memory, machine.allocator, "kho-v1", strict=False)
    folio = machine.allocator.alloc_pages(3)
    kho.tracker.preserve_folio(folio, 3)
    kho.tracker.preserve_folio(folio, 0)  # double preservation, as the kernel allows
    path = tmp_path / "double.kho"
    save_image(path, kho.finalize())
    strict = run_json(capsys, str(path), "--kernel-image", "1M")
    lenient = run_json(capsys, str(path), "--kernel-image", "1M", "--lenient")
    assert not strict["revived"] and lenient["revived"]
