"""The examples in spec/subnodes.md are produced by kho.subsystems: regenerate them and compare.

Each example is marked ``<!-- kho-example: NAME -->`` followed by a fenced block; :data:`EXAMPLES`
produces the block's text.  To print them (e.g. after changing one on purpose):
``python tests/test_subsystems_spec.py``.
"""

import sys
from pathlib import Path

import pytest

from kho.currentkernel.tracker import Tracker
from kho.memory.physical import PhysicalMemory
from kho.subsystems.blocks import OutgoingBlockSet
from kho.subsystems.kexec_metadata import write_kexec_metadata
from kho.subsystems.kho_test import write_kho_test
from kho.subsystems.luo import OutgoingLuo
from kho.subsystems.memblock import ReservedRegion, write_memblock
from kho.subsystems.memfd import preserve_memfd
from kho.subsystems.vmalloc import vmalloc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_spec_examples import MARKER, SPEC, hexdump

PS = 4096


class Bump:
    """Naturally aligned blocks from ``first`` upwards, in call order (the examples' placement)."""

    def __init__(self, first: int):
        self.next = first

    def alloc_pages(self, order: int = 0) -> int:
        size = PS << order
        phys = -(-self.next // size) * size
        self.next = phys + size
        return phys

    def free_pages(self, phys: int, order: int = 0) -> None:
        raise AssertionError("the examples never free")


def setup(first=0x100000):
    memory = PhysicalMemory.single_bank(512 << 20)
    return memory, Bump(first), Tracker(memory)


def pages(memory, *addresses, length=None):
    return "\n".join(f"page {a:#x}:\n" + hexdump(memory.read(a, PS), a, length) for a in addresses)


def kexec_metadata_example():
    memory, allocator, tracker = setup()
    blob = write_kexec_metadata(memory, allocator, tracker, "7.3.0-rc7", 0)
    return f"blob {blob.phys:#x}, blob-size {blob.size}:\n" + hexdump(memory.read(blob.phys, blob.size), blob.phys)


def memblock_example():
    memory, allocator, tracker = setup()
    blob = write_memblock(memory, allocator, tracker, [ReservedRegion("realk_small", 0x1D6F9000, 1052 << 10)])
    units = ", ".join(f"{p:#x}/{o}" for p, o in tracker.units())
    return (f"blob {blob.phys:#x}, blob-size {blob.size}; preserved units (phys/order): {units}\n"
            + hexdump(memory.read(blob.phys, PS), blob.phys))


def vmalloc_example():
    memory, allocator, tracker = setup()
    area = vmalloc(memory, allocator, tracker, b"A" * PS + b"B" * PS + b"C")
    return (f"struct kho_vmalloc:\n{hexdump(area.descriptor())}\n"
            f"blocks {', '.join(hex(b) for b in area.blocks)}\n" + pages(memory, *area.chunks))


def blocks_example():
    memory, allocator, tracker = setup()
    out = OutgoingBlockSet(memory, allocator, tracker, 2040)  # two entries a block
    out.grow(3)
    head = out.serialize([b"\x11" * 2040, b"\x22" * 2040, b"\x33" * 2040])
    return f"head {head:#x}\n" + pages(memory, *out.blocks, length=48)


def kho_test_example():
    memory, allocator, tracker = setup()
    written = write_kho_test(memory, allocator, tracker, 6 * PS, seed=2)
    folios = ", ".join(f"{p:#x}/{o}" for p, o in written.folios)
    return (f"folios (phys/order): {folios}; csum {written.csum:#010x}\n"
            f"FDT at {written.phys:#x}, blob-size {written.size}:\n" + hexdump(memory.read(written.phys, written.size), written.phys)
            + "\n" + pages(memory, *written.folios_info.chunks, *written.folios_info.blocks, length=48))


def memfd_example():
    memory, allocator, tracker = setup()
    phys = preserve_memfd(memory, allocator, tracker, b"hello, kexec\n", size=2 * PS, pos=13, seals=0x1 | 0x4)
    chunk = memory.read_u64(phys + 32)
    array = memory.read_u64(chunk + 8)
    return (f"struct memfd_luo_ser at {phys:#x}:\n{hexdump(memory.read(phys, 48), phys)}\n"
            + pages(memory, chunk, length=32) + "\n" + pages(memory, array, length=48))


def luo_example():
    memory, allocator, tracker = setup()
    luo = OutgoingLuo(memory, allocator, tracker, received_num=1)
    luo.create_session("vm1")
    luo.preserve_file("vm1", 0x10, "memfd-v2", 0x7F000)
    luo.preserve_file("vm1", 0x11, "memfd-v2", 0x80000)
    luo.set_flb("iommu-core-v1", 0xABC000, 2)
    luo.serialize()
    session_block = luo.sessions_pa
    file_block = memory.read_u64(session_block + 16 + 64)
    return (f"LUO blob {luo.phys:#x}, blob-size {luo.blob.size}:\n{hexdump(memory.read(luo.phys, 32), luo.phys)}\n"
            + pages(memory, session_block, length=112) + "\n" + pages(memory, file_block, length=160) + "\n"
            + pages(memory, luo.flbs_pa, length=96))


EXAMPLES = {
    "kexec-metadata": kexec_metadata_example,
    "memblock": memblock_example,
    "kho-vmalloc": vmalloc_example,
    "kho-blocks": blocks_example,
    "kho-test": kho_test_example,
    "memfd": memfd_example,
    "luo": luo_example,
}


def spec_examples():
    return {m.group(1): m.group(2).rstrip("\n") for m in MARKER.finditer((SPEC / "subnodes.md").read_text())}


def test_every_example_is_in_the_spec():
    assert set(spec_examples()) == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_matches_kho(name):
    assert spec_examples()[name] == EXAMPLES[name](), f"spec/subnodes.md example {name} drifted; regenerate it"


if __name__ == "__main__":
    for name, make in EXAMPLES.items():
        sys.stdout.write(f"<!-- kho-example: {name} -->\n```text\n{make()}\n```\n\n")
