"""The examples in spec/ are produced by kho: regenerate them and compare, so they cannot drift.

spec/kho-abi.md marks each example with ``<!-- kho-example: NAME -->`` followed by a fenced
block; :data:`EXAMPLES` produces the block's text.  spec/image-format.md carries a reference
image reader that does not import kho: it is run here against an image and must rebuild the
same page contents as kho's loader.

To print the current examples (e.g. after changing one on purpose):
``python tests/test_spec_examples.py``.
"""

import re
import struct
import sys
from pathlib import Path

import pytest

from kho.abi.kexec_handover import RadixGeometry
from kho.currentkernel.machine import Machine
from kho.currentkernel.tracker import Tracker
from kho.devicetree import KHOFdt, build_boot_dtb
from kho.encodings.kho_v1 import KhoV1
from kho.encodings.kho_v2 import KhoV2
from kho.handover.imagefile import load_image, save_image
from kho.handover.outgoing import KHO
from kho.handover.scratch_array import write_scratch_array
from kho.memory.physical import PhysicalMemory, ScratchArea

SPEC = Path(__file__).resolve().parent.parent / "spec"
MiB = 1 << 20
PS = 4096
#: The example set: two order-0 pages (page 0 and page 5) and an order-2 folio at 1 MiB.
UNITS = [(0x0, 0), (0x5000, 0), (0x100000, 2)]


class Pages:
    """An allocator handing out consecutive pages from ``first`` (the examples' placement)."""

    def __init__(self, first):
        self.next = first

    def alloc_pages(self, order=0):
        phys, self.next = self.next, self.next + (PS << order)
        return phys

    def free_pages(self, phys, order=0):
        raise AssertionError("the examples never free")


def hexdump(data: bytes, base: int = 0, length: int | None = None) -> str:
    """16 bytes a line, ``ADDR  xx xx ...``; runs of all-zero lines shown once as ``*``; a last line with the end."""
    data = data if length is None else data[:length]
    lines, previous_zero = [], False
    for off in range(0, len(data), 16):
        row = data[off:off + 16]
        zero = not any(row)
        if zero and previous_zero:
            if lines[-1] != "*":
                lines.append("*")
            continue
        previous_zero = zero
        hexes = " ".join(f"{b:02x}" for b in row[:8]) + "  " + " ".join(f"{b:02x}" for b in row[8:])
        lines.append(f"{base + off:08x}  {hexes}".rstrip())
    lines.append(f"{base + len(data):08x}")
    return "\n".join(lines)


def tracker_for(memory, preserve_bits="page"):
    tracker = Tracker(memory, preserve_bits)
    for phys, order in UNITS:
        tracker.preserve_folio(phys, order)
    return tracker


def v1_example(bitmap_bytes):
    memory = PhysicalMemory.single_bank(16 * MiB)
    encoded = KhoV1(PS, bitmap_bytes=bitmap_bytes).encode(tracker_for(memory), Pages(0x200000))
    out = [f"preserved-memory-map = {struct.unpack('<Q', encoded.props['preserved-memory-map'])[0]:#x}"]
    for phys in encoded.metadata_pages.tolist():
        out.append(f"page {phys:#x}:")
        out.append(hexdump(memory.read(phys, PS), phys))
    return "\n".join(out)


def v2_example():
    memory = PhysicalMemory.single_bank(16 * MiB)
    encoded = KhoV2(PS).encode(tracker_for(memory), Pages(0x400000))
    g = RadixGeometry(12)
    out = [f"key({phys:#x}, order {order}) = {g.encode_key(phys, order):#x}" for phys, order in UNITS]
    out.append(f"preserved-memory-map = {struct.unpack('<Q', encoded.props['preserved-memory-map'])[0]:#x}")
    for phys in encoded.metadata_pages.tolist():
        out.append(f"page {phys:#x}:")
        out.append(hexdump(memory.read(phys, PS), phys))
    return "\n".join(out)


def fdt_example():
    fdt = KHOFdt("kho-v2", {"preserved-memory-map": struct.pack("<Q", 0x400000)})
    fdt.add_subtree("memblock", 0x7fe000)
    blob = fdt.to_dtb()
    return hexdump(blob) + "\n\n" + fdt.to_dts().rstrip()


def chosen_example():
    memory = PhysicalMemory.single_bank(1 << 30)
    areas = [ScratchArea(0x3c000000, 0x4000000, "lowmem"), ScratchArea(0x30000000, 0x8000000, "global"),
             ScratchArea(0x38000000, 0x4000000, "node0")]
    memory.set_scratch(areas)
    size = write_scratch_array(memory, 0x2001000, areas)
    dtb = build_boot_dtb(0x2000000, PS, 0x2001000, size)
    return ("scratch array at 0x2001000:\n" + hexdump(memory.read(0x2001000, size), 0x2001000)
            + "\n\nboot DTB:\n" + hexdump(dtb))


EXAMPLES = {
    "v1-page-bitmaps": lambda: v1_example("page"),
    "v1-512-byte-bitmaps": lambda: v1_example(512),
    "v2-radix-tree": v2_example,
    "kho-fdt": fdt_example,
    "chosen": chosen_example,
}

MARKER = re.compile(r"<!-- kho-example: ([\w-]+) -->\s*```[a-z]*\n(.*?)```", re.S)


def spec_examples(name="kho-abi.md"):
    return {m.group(1): m.group(2).rstrip("\n") for m in MARKER.finditer((SPEC / name).read_text())}


def test_every_example_is_in_the_spec():
    assert set(spec_examples()) == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_matches_kho(name):
    assert spec_examples()[name] == EXAMPLES[name](), f"spec/kho-abi.md example {name} drifted; regenerate it"


def test_reference_reader_in_image_format_spec(tmp_path):
    """The reader in spec/image-format.md, run without kho, rebuilds the pages kho's loader does."""
    text = (SPEC / "image-format.md").read_text()
    code = re.search(r"<!-- reference-reader -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert "import kho" not in code and "from kho" not in code
    machine = Machine.boot(256 * MiB, seed=2)
    kho = KHO(machine.memory, machine.allocator, "kho-v1")
    folios = machine.allocator.alloc_many(8, 3)
    kho.tracker.preserve_many(folios, 3)
    for i, phys in enumerate(folios.tolist()):
        if i % 2:
            machine.memory.fill_pattern(phys, PS << 3, 1000 + i)
        else:
            machine.memory.write(phys + 8, b"spec")
    kho.add_blob("example", b"reference reader")
    path = tmp_path / "x.kho"
    save_image(path, kho.finalize())
    namespace = {}
    exec(compile(code, "image-format.md", "exec"), namespace)
    view = namespace["read_image"](str(path))
    image = load_image(path)
    assert view["fdt"] == (image.fdt_phys, image.fdt_size)
    assert view["scratch_array"] == (image.scratch_phys, image.scratch_size)
    assert view["encoding"] == "kho-v1" and view["boot_dtb"] == image.boot_dtb
    assert view["banks"] == [(b.start, b.size, b.node) for b in image.memory.banks]
    for pfn, data in view["pages"].items():
        assert data == image.memory.read(pfn * PS, PS), hex(pfn)
    with_contents = {int(p) // PS for p in folios} | {int(p) // PS + i for p in folios[1::2] for i in range(8)}
    assert with_contents | {image.fdt_phys // PS, image.scratch_phys // PS} <= set(view["pages"])
    assert {pfn for pfn, _ in image.memory.stored_pages()} <= set(view["pages"])


if __name__ == "__main__":
    for name, make in EXAMPLES.items():
        sys.stdout.write(f"<!-- kho-example: {name} -->\n```text\n{make()}\n```\n\n")
