"""Shared by the tests of kho.subsystems: small machines and the real kernel's fixture memory."""

from __future__ import annotations

from pathlib import Path

from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.memory.physical import Bank, PhysicalMemory

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "linux-7.3-x86_64" / "subnodes"
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "realkernel" / "linux-7.3-x86_64"
#: System RAM of the real kernel's QEMU guest (page-aligned): 0x1000-0x9efff and 0x100000-0x1ffdffff.
REAL_BANKS = (Bank(0x1000, 0x9E000), Bank(0x100000, 0x1FEE0000))
#: Where the real kernel put each sub-node blob (the KHO FDT at 0x344000) and its blob-size.
REAL_SUBNODES = {"memblock": (0x2DE1000, 0xD6), "LUO": (0x3563000, 0x20), "kho_test": (0x2FC000, 0xF0),
                 "kexec-metadata": (0x34A000, 0x49)}
PAGE_SIZES = (4096, 16384, 65536)


def machine(page_size: int = 4096, ram: int = 64 << 20):
    """``(memory, allocator, tracker)`` of a one-bank machine; page 0 is never handed out."""
    memory = PhysicalMemory.single_bank(ram, page_size)
    return memory, PageAllocator(memory, reserved=[(0, page_size)]), Tracker(memory)


def fixture_blob(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_pages() -> dict[int, bytes]:
    """The committed real-kernel pages, by phys."""
    return {int(p.stem.split("-")[1], 16): p.read_bytes() for p in sorted(FIXTURES.glob("page-0x*.bin"))}


def real_memory() -> PhysicalMemory:
    """The real guest's RAM with the committed pages in place (everything else reads as zeros)."""
    memory = PhysicalMemory(REAL_BANKS, 4096)
    for phys, data in fixture_pages().items():
        memory.write(phys, data)
    return memory
