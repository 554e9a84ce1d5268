"""OverlayMemory: the next kernel's writes over a read-only dump stay in the overlay."""

import pytest

from kho.dumps import open_dump
from kho.dumps.overlay import OverlayMemory
from kho.dumps.writers import write_raw
from kho.errors import KHOError
from kho.memory.contents import pattern_bytes
from kho.memory.physical import PhysicalMemory

PS = 4096


@pytest.fixture
def dump(tmp_path):
    memory = PhysicalMemory([(0, 64 * PS)], PS)
    memory.write(0, bytes(range(256)) * (4 * PS // 256))
    write_raw(memory, tmp_path / "mem.raw")
    with open_dump(tmp_path / "mem.raw") as opened:
        yield opened, (tmp_path / "mem.raw").read_bytes()


def test_writes_stay_in_the_overlay(dump, tmp_path):
    opened, before = dump
    overlay = OverlayMemory(opened.memory)
    overlay.write(PS + 10, b"next kernel")
    assert overlay.read(PS + 8, 15) == bytes([8, 9]) + b"next kernel" + bytes([21, 22])
    assert overlay.read(0, 3 * PS)[PS + 10:PS + 21] == b"next kernel"  # a read across overlay and dump pages
    assert opened.memory.read(PS + 10, 11) == bytes(range(10, 21))
    assert overlay.nr_stored_pages == 1 and (tmp_path / "mem.raw").read_bytes() == before
    with pytest.raises(KHOError, match="read-only"):
        opened.memory.write(0, b"x")


def test_discard_and_fill_pattern(dump):
    opened, _ = dump
    overlay = OverlayMemory(opened.memory)
    overlay.discard(0, 2 * PS)
    assert overlay.read(0, 2 * PS) == bytes(2 * PS) and overlay.read(2 * PS, 4) == bytes(range(4))
    overlay.fill_pattern(PS, 2 * PS, seed=7)
    assert overlay.read(PS, 2 * PS) == pattern_bytes(7, 1, 2, PS) and overlay.read(0, PS) == bytes(PS)
    overlay.write(2 * PS, b"\1")
    assert overlay.read(2 * PS, 2) == b"\1" + pattern_bytes(7, 2, 1, PS)[1:2]
    with pytest.raises(KHOError):
        overlay.read(64 * PS - 1, 2)
