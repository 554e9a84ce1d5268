"""kho.dumps on bad input: every case a KHOError or KHOFormatError naming what was recognised."""

import os
import struct
from functools import lru_cache

import numpy as np
import pytest
import zstandard
from fuzz.corpus import seeds
from fuzz.targets import TARGETS, time_limit
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dumps import build, write_boot_params

from kho.abi.elf import ELFCLASS64, ELFDATA2MSB, ELFMAG, ET_CORE, ET_EXEC, EV_CURRENT
from kho.abi.setup_data import SETUP_DATA_DTYPE, SETUP_KEXEC_KHO
from kho.dumps import open_dump
from kho.dumps.find import read_boot_params
from kho.dumps.open import parse_ranges
from kho.dumps.writers import write_elf_core, write_raw, write_zstd
from kho.errors import KHOError, KHOFormatError

MiB = 1 << 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    m, handover, _ = build()
    d = tmp_path_factory.mktemp("bad")
    write_raw(m.memory, d / "mem.raw")
    write_zstd(m.memory, d / "mem.zst", level=3)
    write_elf_core(m.memory, d / "mem.elf")
    return m, handover, d


def errno_of(path, **kwargs):
    with pytest.raises(KHOError) as err:
        with open_dump(path, **kwargs) as dump:
            dump.handover()
    return err.value


def test_missing_empty_and_tiny_files(tmp_path):
    assert errno_of(tmp_path / "nothing").errno_name == "ENOENT"
    (tmp_path / "empty").write_bytes(b"")
    assert "empty file" in str(errno_of(tmp_path / "empty"))
    (tmp_path / "tiny").write_bytes(b"x" * 100)
    err = errno_of(tmp_path / "tiny")
    assert isinstance(err, KHOFormatError) and "raw dump of 100 bytes" in str(err)


def test_raw_file_without_a_handover(tmp_path):
    path = tmp_path / "zeros.raw"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    err = errno_of(path)
    assert err.errno_name == "ENOENT" and "raw dump, 67108864 bytes" in str(err) and "no KHO FDT" in str(err)


def test_bad_base_and_page_size(files):
    _, _, d = files
    assert "not a page-aligned" in str(errno_of(d / "mem.raw", base=0x123))
    assert "page size 1000" in str(errno_of(d / "mem.raw", page_size=1000))
    assert "no base" in str(errno_of(d / "mem.elf", base=0))


def test_raw_dump_cut_before_the_map(files, tmp_path):
    m, handover, d = files
    data = (d / "mem.raw").read_bytes()
    (tmp_path / "cut.raw").write_bytes(data[:handover.fdt_phys + 4096])  # the FDT is there, most of RAM is not
    err = errno_of(tmp_path / "cut.raw")
    assert isinstance(err, KHOFormatError) and "no KHO FDT's map decodes" in str(err)


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_damaged_zstd(files, tmp_path, damage):
    _, _, d = files
    data = bytearray((d / "mem.zst").read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    else:
        data[4:8] = b"\xff\xff\xff\xff"
    (tmp_path / "bad.zst").write_bytes(bytes(data))
    err = errno_of(tmp_path / "bad.zst")
    assert isinstance(err, KHOFormatError) and "zstd" in str(err)


def test_zstd_of_nothing(tmp_path):
    (tmp_path / "nothing.zst").write_bytes(zstandard.ZstdCompressor().compress(b""))
    assert "decompresses to" in str(errno_of(tmp_path / "nothing.zst"))


@pytest.mark.parametrize("damage, match", [
    ("type", "type ET_EXEC, not a core dump"),
    ("past-eof", "run past"),
    ("no-load", "without PT_LOAD"),
    ("garbage", "unreadable"),
    ("tiny-segment", "holds a whole page"),
])
def test_damaged_elf(files, tmp_path, damage, match):
    m, _, d = files
    path = tmp_path / "bad.elf"
    if damage == "type":
        write_elf_core(m.memory, path, e_type=ET_EXEC)
    elif damage == "no-load":
        write_elf_core(m.memory, path, segments=[], note=b"CORE" * 4)
    elif damage == "tiny-segment":
        write_elf_core(m.memory, path, segments=[(0x1000, 0x800)])
    elif damage == "garbage":
        path.write_bytes(b"\x7fELF" + b"\xff" * 60)
    else:
        data = bytearray((d / "mem.elf").read_bytes()[:1 << 20])
        path.write_bytes(bytes(data))  # the PT_LOAD claims 512 MiB, the file holds 1 MiB
    err = errno_of(path)
    assert isinstance(err, KHOFormatError) and match in str(err)


def test_requested_fdt_that_is_not_one(files):
    _, handover, d = files
    with open_dump(d / "mem.raw") as dump:
        with pytest.raises(KHOFormatError, match="no KHO FDT at the requested address"):
            dump.handover(fdt=handover.fdt_phys + 4096 * 1000)
        with pytest.raises(KHOFormatError, match="no KHO FDT at the requested address"):
            dump.handover(fdt=(512 * MiB) - 8)


def test_setup_data_loops_and_bad_nodes_are_reported(files):
    m, handover, _ = files
    params, chain = 0x10000, 0x11000
    write_boot_params(m.memory, params, chain, (handover.fdt_phys, 4096), (handover.scratch_phys, handover.scratch_size))
    assert read_boot_params(m.memory, params).handoff.fdt_addr == handover.fdt_phys
    m.memory.write_u64(chain, chain)  # the first node points at itself: a loop
    assert "loops" in read_boot_params(m.memory, params).error
    m.memory.write_u64(chain, 1 << 40)  # a node outside RAM
    assert "outside RAM" in read_boot_params(m.memory, params).error
    m.memory.write_u64(chain, chain + 48)
    node = np.zeros(1, SETUP_DATA_DTYPE)
    node[0] = (0, SETUP_KEXEC_KHO, 8)  # a kho_data of 8 bytes
    m.memory.write(chain + 48, node.tobytes())
    bp = read_boot_params(m.memory, params)
    assert bp.handoff is None and "8-byte SETUP_KEXEC_KHO payload" in bp.error


@lru_cache(maxsize=None)
def dump_seeds() -> tuple[bytes, ...]:
    return tuple(seeds("dump"))


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_mutated_dumps_decode_or_are_refused(data):
    """Bit flips, overwritten words and truncation of the fuzz seeds (zstd, ELF core, raw):
    the dump target's checks hold or the input is refused."""
    buf = bytearray(data.draw(st.sampled_from(dump_seeds())))
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(buf) - 8))
        if data.draw(st.booleans()):
            buf[at] ^= 1 << data.draw(st.integers(0, 7))
        else:
            buf[at:at + 8] = data.draw(st.integers(0, (1 << 64) - 1)).to_bytes(8, "little")
    if data.draw(st.booleans()):
        del buf[data.draw(st.integers(1, len(buf))):]
    with time_limit(60):
        TARGETS["dump"].run(bytes(buf))


@pytest.mark.parametrize("text", ["abc", "0x10-", "5+0", "1-0", "0x1000+12Q"])
def test_bad_ram_ranges(text):
    with pytest.raises(KHOError, match="RAM range") as err:
        parse_ranges(text)
    assert err.value.errno_name == "EINVAL"


def test_ram_range_without_a_whole_page(files):
    _, _, d = files
    assert "no whole 4096-byte page" in str(errno_of(d / "mem.raw", ram=[(0x1800, 0x1000)]))


def test_big_endian_core(tmp_path):
    header = struct.Struct(">16sHHIQQQIHHHHHH")  # Elf64_Ehdr, big-endian
    ident = ELFMAG + bytes([ELFCLASS64, ELFDATA2MSB, EV_CURRENT]) + bytes(9)
    (tmp_path / "be.core").write_bytes(header.pack(ident, ET_CORE, 22, EV_CURRENT, 0, 64, 0, 0, 64, 56, 0, 0, 0, 0))
    err = errno_of(tmp_path / "be.core")
    assert isinstance(err, KHOFormatError) and "big-endian core" in str(err)


def test_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # opening it would block until a writer came
    assert "not a regular file" in str(errno_of(tmp_path / "fifo"))
    assert "not a regular file" in str(errno_of("/dev/zero"))
