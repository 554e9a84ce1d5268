"""Untrusted input, round two (issue 15): one regression test per row of the issue's table,
plus the atomic writes, the size formatter and the option checks it asked for.

Every row: the CLI exits 3 (or 2 for a usage error) with one ``kho`` line on stderr and no
traceback, or the library raises KHOError, before doing work or allocating memory beyond
what the input holds."""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys

import fdt
import msgpack
import numpy as np
import pytest

from kho.abi.kexec_handover import KHO_SUB_TREE_SIZE_PROP_NAME
from kho.cli import cmd_track
from kho.cli.main import main
from kho.cli.options import show_progress
from kho.currentkernel.machine import Machine
from kho.currentkernel.tracker import Tracker
from kho.devicetree import KHOFdt
from kho.encodings import get_encoding
from kho.encodings.common import read_map_pointer
from kho.encodings.ranges import RANGE
from kho.errors import KHOError, KHOFormatError
from kho.files import atomic_write, read_bounded, write_atomic
from kho.handover.imagefile import MAX_BANKS, image_map, load_image
from kho.handover.outgoing import KHO
from kho.memory.geometry import greedy_split_array, greedy_split_bound
from kho.memory.physical import Bank, PhysicalMemory
from kho.sizes import format_size

MiB, GiB = 1 << 20, 1 << 30


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``kho ARGV`` run in this process (SystemExit caught)."""
    try:
        code = main(list(argv))
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The single stderr line of a refused command (no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("kho"), err
    return lines[0]


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("img") / "small.kho")
    assert main(["serialize", "--ram", "1G", "--abi", "kho-v2", "--preserve-random", "4M", "--out", path]) == 0
    return path


# -- files: size-checked reads, atomic writes ------------------------------------------------
def test_sparse_8gib_image_is_refused_before_reading(tmp_path, capsys):
    sparse = tmp_path / "sparse.kho"
    with open(sparse, "wb") as f:
        f.truncate(8 * GiB)
    with pytest.raises(KHOError) as info:
        load_image(str(sparse))
    assert info.value.errno_name == "E2BIG"
    code, _, err = cli(capsys, "units", str(sparse))  # read as a raw dump: no KHO FDT in it
    assert code == 3 and one_line_error(err)


def test_dev_zero_image_is_refused_before_reading(capsys):
    code, _, err = cli(capsys, "dump", "/dev/zero")
    assert code == 3 and "not a regular file" in one_line_error(err)
    with pytest.raises(KHOError) as info:
        read_bounded("/dev/zero", 1 << 20)
    assert info.value.errno_name == "EINVAL"


def test_read_bounded_file_object_reads_at_most_limit_plus_one():
    assert read_bounded(io.BytesIO(b"x" * 10), 10) == b"x" * 10
    with pytest.raises(KHOError) as info:
        read_bounded(io.BytesIO(b"x" * 11), 10)
    assert info.value.errno_name == "E2BIG"


def test_atomic_write_failure_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old contents")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as out:
            out.write(b"new, half written")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old contents" and os.listdir(tmp_path) == ["out.bin"]
    assert write_atomic(path, "new") == 3 and path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_serialize_out_efbig_leaves_the_old_image_whole(tmp_path):
    path = tmp_path / "image.kho"
    base = [sys.executable, "-m", "kho.cli.main", "serialize", "--ram", "1G", "--abi", "kho-v1", "--out", str(path)]
    subprocess.run(base + ["--preserve-random", "1M"], check=True, capture_output=True)
    old = path.read_bytes()
    big = subprocess.run(base + ["--preserve-random", "64M", "--seed", "2"], capture_output=True, text=True,
                         preexec_fn=_limit_file_size(4096))
    assert big.returncode == 3 and one_line_error(big.stderr) == f"kho: {path}: File too large"
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["image.kho"]
    load_image(str(path))


def test_units_file_is_size_checked_and_a_missing_directory_named(capsys, tmp_path):
    code, _, err = cli(capsys, "serialize", "--ram", "1G", "--units", "/dev/zero", "--out", str(tmp_path / "a.kho"))
    assert code == 3 and "not a regular file" in one_line_error(err)
    target = tmp_path / "missing" / "a.kho"
    code, _, err = cli(capsys, "serialize", "--ram", "1G", "--preserve-random", "1M", "--out", str(target))
    assert code == 3 and one_line_error(err) == f"kho: {target}: No such file or directory"


# -- msgpack limits ------------------------------------------------------------------------------
def test_ten_million_banks_refused_from_the_array_header():
    """The banks array's header claims 10**7 banks: refused before any bank is unpacked (the
    data holding them is not even there: unpacking would have failed on truncation instead)."""
    head = b"\x84" + b"".join(msgpack.packb(v) for v in ("magic", "kho-image", "version", 1, "page_size", 4096, "banks"))
    data = head + b"\xdd" + struct.pack(">I", 10 ** 7) + msgpack.packb([0, 4096, 0]) * 3
    with pytest.raises(KHOFormatError) as info:
        load_image(io.BytesIO(data))
    assert info.value.field == "image.banks" and "10,000,000" in info.value.message
    assert MAX_BANKS < 10 ** 7


def test_nested_arrays_and_strings_bounded_before_unpacking():
    for hostile in ({"magic": "kho-image", "options": {"x": [0] * 100}},
                    {"magic": "x" * 10000},
                    {"magic": "kho-image", "extra": b"\0" * 1000}):
        with pytest.raises(KHOFormatError) as info:
            load_image(io.BytesIO(msgpack.packb(hostile, use_bin_type=True)))
        assert info.value.field.startswith("image")


# -- finalize: all or nothing --------------------------------------------------------------------
class ArmedAllocator:
    """Forwards to a page allocator, records what it hands out, and fails with ENOMEM once armed."""

    def __init__(self, inner):
        self.inner, self.armed, self.taken = inner, False, []

    def alloc_pages(self, order=0):
        if self.armed:
            raise KHOError("ENOMEM", "injected after the encode")
        phys = self.inner.alloc_pages(order)
        self.taken.append(phys)
        return phys

    def free_pages(self, phys, order=0):
        self.inner.free_pages(phys, order)


def test_enomem_after_encode_restores_the_metadata_pages_contents(monkeypatch):
    m = Machine.boot(512 * MiB, seed=3)
    alloc = ArmedAllocator(m.allocator)
    out = KHO(m.memory, alloc, "kho-v2")
    out.tracker.preserve_many(m.allocator.alloc_many(2000, 0), 0)
    # The pages the map will take (first fit) hold old data: pages freed with their contents.
    probe = [m.allocator.alloc_pages(0) for _ in range(64)]
    for i, phys in enumerate(probe):
        m.memory.write(phys, bytes([i + 1]) * m.memory.page_size)
    for phys in reversed(probe):
        m.allocator.free_pages(phys, 0)
    before = {phys: m.memory.read(phys, m.memory.page_size) for phys in probe}
    encode = out.encoding.encode

    def encode_then_arm(tracker, allocator):
        encoded = encode(tracker, allocator)
        alloc.armed = True  # the FDT's page fails: after the map's pages were written
        return encoded
    monkeypatch.setattr(out.encoding, "encode", encode_then_arm)
    with pytest.raises(KHOError) as info:
        out.finalize()
    assert info.value.errno_name == "ENOMEM" and not out.tracker.finalized
    assert set(alloc.taken) & set(probe), "the encoding took none of the pages with old contents"
    assert {phys: m.memory.read(phys, m.memory.page_size) for phys in probe} == before


# -- decoders bounded by their input -------------------------------------------------------------
def test_ranges_entry_over_a_2_52_byte_bank_is_refused_before_splitting():
    memory = PhysicalMemory([Bank(0, (1 << 52) - GiB)])
    entry = np.array([(GiB, (1 << 52) - 2 * GiB)], dtype=RANGE).tobytes()
    for strict in (True, False):
        with pytest.raises(KHOFormatError) as info:
            get_encoding("ranges").decode(memory, {"mem": entry}, strict=strict)
        assert info.value.field == "fdt.mem" and "units" in info.value.message
    tib = np.array([(0, 1 << 40)], dtype=RANGE).tobytes()  # 1 TiB in one entry: 2**18 order-10 units, fine
    assert len(get_encoding("ranges").decode(PhysicalMemory([Bank(0, 1 << 40)]), {"mem": tib}, strict=False)) == 1 << 18


def test_greedy_split_bound_bounds_the_split():
    rng = np.random.default_rng(5)
    start = np.sort(rng.integers(0, 1 << 30, 200)) * 3
    end = start + rng.integers(1, 1 << 14, 200)
    pfn, _ = greedy_split_array(start, end, 10)
    assert pfn.size <= greedy_split_bound(start, end, 10)


# -- options and the host's limits ----------------------------------------------------------------
@pytest.mark.parametrize("command", [["simulate"], ["track", "--ram", "1G"],
                                     ["serialize", "--ram", "1G", "--preserve-random", "1M", "--out", "x.kho"],
                                     ["bench", "encodings"], ["bench", "scale"]])
def test_negative_seed_is_a_one_line_usage_error(capsys, command):
    code, _, err = cli(capsys, *command, "--seed", "-1")
    assert code == 2 and "--seed" in one_line_error(err)


@pytest.mark.parametrize("ram", ["1P", "4096T"])
def test_ram_the_host_cannot_model_is_refused_before_allocating(capsys, ram):
    code, _, err = cli(capsys, "simulate", "--ram", ram)
    assert code == 3 and "ENOMEM" in one_line_error(err)


def test_bench_exits_non_zero_when_a_point_failed(capsys):
    code, out, err = cli(capsys, "bench", "encodings", "--ram", "1P", "--runs", "1", "--no-progress")
    assert code == 1 and "ENOMEM" in out and "1 point(s) failed" in one_line_error(err)


def test_memory_error_becomes_enomem(capsys, monkeypatch):
    def exhausted(args):
        raise MemoryError("Unable to allocate 8 GiB")
    monkeypatch.setattr(cmd_track, "run", exhausted)
    code, _, err = cli(capsys, "track", "--ram", "1G")
    assert code == 3 and one_line_error(err).startswith("kho: ENOMEM:")


# -- the size formatter -----------------------------------------------------------------------------
def test_one_size_formatter():
    assert [format_size(n) for n in (64 * GiB, 65536 * MiB, 512 << 10, 47 * MiB, 1536, 100, None)] == [
        "64 GiB", "64 GiB", "512 KiB", "47 MiB", "1.5 KiB", "100 B", "-"]
    assert format_size(1 << 50) == "1 PiB" and format_size((1 << 40) + (1 << 39)) == "1.5 TiB"


# -- the terminal ----------------------------------------------------------------------------------
def test_progress_silent_unless_a_terminal_and_never_with_json(capsys, tmp_path, monkeypatch):
    code, out, err = cli(capsys, "serialize", "--ram", "1G", "--preserve-random", "1M", "--out", str(tmp_path / "a.kho"))
    assert code == 0 and err == "" and out.count("\n") == 1  # stderr is not a terminal here
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert show_progress(argparse.Namespace(quiet=False, json=False))
    assert not show_progress(argparse.Namespace(quiet=True, json=False))
    assert not show_progress(argparse.Namespace(quiet=False, json=True))


# -- decoders bounded by what the input holds; the next kernel; lenient readers; markup --------------
def hostile_image(encoding: str, **options) -> bytes:
    """A real handover's image whose map points one metadata pointer (the last radix-tree
    pointer to a leaf; kho-v1: a bitmap pointer) at a 4 MiB generated page run."""
    m = Machine.boot(1 * GiB, seed=7)
    out = KHO(m.memory, m.allocator, encoding, **options)
    generated = m.allocator.alloc_pages(10) // m.memory.page_size  # 4 MiB of RAM, to be a generated run
    out.tracker.preserve_many(m.allocator.alloc_many(3000, 0), 0)
    handover = out.finalize()
    top = image_map(handover)
    ps = m.memory.page_size
    metadata = set(handover.encoded.metadata_pages.tolist())
    top["generated"].append([generated, 1 << 10, 99])
    # The first stored pointer to a metadata page holding no pointer itself (a leaf or bitmap).
    runs = {pfn: bytearray(data) for pfn, data in top["pages"]}
    def words(pfn):
        for first, data in runs.items():
            if first <= pfn < first + len(data) // ps:
                off = (pfn - first) * ps
                return data, off
        raise KeyError(pfn)
    for page in sorted(metadata):
        data, off = words(page // ps)
        table = np.frombuffer(bytes(data[off:off + ps]), "<u8")
        for slot, value in enumerate(table.tolist()):
            if value in metadata and value != page:
                leaf, leaf_off = words(value // ps)
                inner = np.frombuffer(bytes(leaf[leaf_off:leaf_off + ps]), "<u8")
                if not any(v in metadata for v in inner.tolist()):
                    data[off + 8 * slot:off + 8 * slot + 8] = (generated * ps).to_bytes(8, "little")
                    top["pages"] = [[pfn, bytes(d)] for pfn, d in runs.items()]
                    return msgpack.packb(top, use_bin_type=True)
    raise AssertionError("no leaf pointer found")


@pytest.mark.parametrize("encoding, field", [("kho-v2", "radix.leaf"), ("kho-v1", "chunk.bitmap")])
def test_map_metadata_in_a_generated_run_is_refused(encoding, field):
    image = load_image(io.BytesIO(hostile_image(encoding)))
    for strict in (True, False):
        with pytest.raises(KHOFormatError) as info:
            image.decode(strict=strict)
        assert info.value.field == field and "generated" in info.value.message


def test_preserve_pages_checks_the_range_against_ram_before_splitting():
    memory = PhysicalMemory([Bank(0, 1 * GiB)])
    for nr_pages in (2 ** 36, 2 ** 40):
        with pytest.raises(KHOError) as info:
            Tracker(memory).preserve_pages(0, nr_pages)
        assert info.value.errno_name == "EINVAL" and "inside RAM" in info.value.message
    Tracker(memory).preserve_pages(0, 1 << 18)  # all of RAM: fine


def small_handover(encoding="kho-v2"):
    m = Machine.boot(1 * GiB, seed=1)
    out = KHO(m.memory, m.allocator, encoding)
    out.tracker.preserve_many(m.allocator.alloc_many(100, 0), 0)
    return m, out.finalize()


def test_boot_on_ram_the_host_cannot_hold_is_refused_before_allocating(tmp_path, capsys):
    top = image_map(small_handover()[1])
    top["banks"] = [[0, 1 << 44, 0]]  # 2**32 pages: about 40 GiB of per-page state
    path = tmp_path / "big.kho"
    path.write_bytes(msgpack.packb(top, use_bin_type=True))
    assert main(["boot", str(path)]) == 3
    assert "ENOMEM" in one_line_error(capsys.readouterr().err)


def test_lenient_boot_logs_and_ignores_a_misaligned_scratch_area(tmp_path, capsys):
    m, handover = small_handover()
    raw = bytearray(m.memory.read(handover.scratch_phys, handover.scratch_size))
    addr, size = int.from_bytes(raw[0:8], "little"), int.from_bytes(raw[8:16], "little")
    raw[8:16] = (size - 0x800).to_bytes(8, "little")  # the first area ends mid-page
    m.memory.write(handover.scratch_phys, bytes(raw))
    path = tmp_path / "misaligned.kho"
    path.write_bytes(msgpack.packb(image_map(handover), use_bin_type=True))
    assert main(["boot", "--json", str(path)]) == 0
    strict = json.loads(capsys.readouterr().out)
    assert not strict["revived"] and "not page-aligned" in strict["messages"][0]
    assert main(["boot", "--lenient", "--json", str(path)]) == 0
    lenient = json.loads(capsys.readouterr().out)
    assert lenient["revived"] and lenient["messages"] == [
        f"scratch area {addr:#x}+{size - 0x800:#x} (lowmem) used as {addr:#x}+{size - 0x1000:#x}: "
        "whole pages, none shared with another area"]


def test_dump_and_units_lenient_agree_on_a_4_byte_blob_size(tmp_path, capsys):
    m = Machine.boot(1 * GiB, seed=1)
    out = KHO(m.memory, m.allocator)  # Linux 7.3: the live FDT, blob-size required
    out.tracker.preserve_many(m.allocator.alloc_many(10, 0), 0)
    out.add_blob("demo", b"x" * 100)
    handover = out.finalize()
    kho_fdt = KHOFdt.from_dtb(m.memory.read(handover.fdt_phys, handover.fdt_size), handover.encoded.compatible)
    node = kho_fdt.tree.root.get_subnode("demo")
    node.remove_property(KHO_SUB_TREE_SIZE_PROP_NAME)
    node.append(fdt.PropBytes(KHO_SUB_TREE_SIZE_PROP_NAME, data=(100).to_bytes(4, "little")))
    blob = kho_fdt.tree.to_dtb(version=17)
    m.memory.write(handover.fdt_phys, blob + bytes(handover.fdt_size - len(blob)))
    path = tmp_path / "blobsize.kho"
    path.write_bytes(msgpack.packb(image_map(handover), use_bin_type=True))
    assert main(["units", "--lenient", str(path)]) == 0
    assert main(["dump", "--lenient", str(path)]) == 0
    text = capsys.readouterr().out
    assert "4-byte blob-size" in text


@pytest.mark.parametrize("where", ["scratch kind", "path"])
def test_markup_in_input_strings_is_printed_as_text(tmp_path, capsys, where):
    top = image_map(small_handover()[1])
    path = tmp_path / "plain.kho"
    if where == "scratch kind":
        top["scratch"][0][2] = "node[/x]"
    else:
        (tmp_path / "a[").mkdir()
        path = tmp_path / "a[" / "x].kho"
    path.write_bytes(msgpack.packb(top, use_bin_type=True))
    for command in ("dump", "boot", "units"):
        assert main([command, str(path)]) == 0
        out = capsys.readouterr().out
        assert command != "dump" or "[/x]" in out


@pytest.mark.parametrize("encoding", ["kho-v1", "kho-v2", "kho-v3", "maple"])
def test_every_metadata_reader_refuses_generated_pages(encoding):
    """The map's pages turned into a generated run (contents that cost no storage): the
    decoders that read metadata pages refuse them, in both modes."""
    m = Machine.boot(1 * GiB, seed=2)
    tracker = Tracker(m.memory)
    tracker.preserve_many(m.allocator.alloc_many(2000, 0), 0)
    encoded = get_encoding(encoding).encode(tracker, m.allocator)
    pages = np.sort(encoded.metadata_pages)
    if encoding == "kho-v1":  # the bitmap pages (the chunk pages hold the pointers)
        chunks, _ = get_encoding(encoding).walk_chunks(m.memory, read_map_pointer(encoded.props))
        pages = np.setdiff1d(pages, chunks)
    for phys in pages.tolist():
        m.memory.fill_pattern(phys, m.memory.page_size, seed=phys)
    for strict in (True, False):
        with pytest.raises(KHOFormatError) as info:
            get_encoding(encoding).decode(m.memory, encoded.props, strict=strict)
        assert "generated page run" in info.value.message


PROFILE = """name = "board[/x] [bold]"
notes = ["a note [/y]"]
cached_copy = "2857M/s"
[[measurement]]
mode = "mmu-off"
image = "47M"
relocation = 0.44
shutdown = 0.022
startup = 0.29
[[measurement]]
mode = "mmu-on"
image = "47M"
relocation = 0.022
shutdown = 0.032
startup = 0.296
"""


def test_markup_in_a_profile_file_is_printed_as_text(tmp_path, capsys):
    profile = tmp_path / "board.toml"
    profile.write_text(PROFILE)
    image = tmp_path / "a.kho"
    image.write_bytes(msgpack.packb(image_map(small_handover()[1]), use_bin_type=True))
    for argv in (["boot", str(image)], ["simulate", "--ram", "1G", "--preserve", "8M", "--image-size", "8M"],
                 ["simulate", "--ram", "1G", "--compare"], ["simulate", "--show-profile"]):
        assert main([*argv, "--profile", str(profile)]) == 0
        assert "board[/x] [bold]" in capsys.readouterr().out
