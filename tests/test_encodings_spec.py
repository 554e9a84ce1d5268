"""The hex examples in spec/encodings.md are what kho writes today.

Each example in the spec is a fenced block right after a ``<!-- example: NAME -->``
marker; :func:`examples` rebuilds them all from one small machine.  After a deliberate
layout change, print the new blocks with ``python tests/test_encodings_spec.py``.
"""

import re
from pathlib import Path

import numpy as np

from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.encodings import get_encoding
from kho.encodings.chunklist import CHUNK_HEADER, read_chunk_list
from kho.encodings.instructions import CHUNK_MAGIC as STREAM_MAGIC
from kho.encodings.maple import MAPLE_NODE_BYTES
from kho.encodings.ranges_packed import CHUNK_MAGIC as PACKED_MAGIC
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea

SPEC = Path(__file__).resolve().parent.parent / "spec" / "encodings.md"
MARKER = re.compile(r"<!-- example: ([a-z0-9-]+) -->\n```text\n(.*?)```", re.S)


def hexdump(data: bytes, base: int) -> list[str]:
    """16 bytes a line: the address, then the bytes in two groups of eight."""
    lines = []
    for off in range(0, len(data), 16):
        row = data[off:off + 16]
        left = " ".join(f"{b:02x}" for b in row[:8])
        right = " ".join(f"{b:02x}" for b in row[8:])
        lines.append(f"{base + off:#012x}: {left}  {right}".rstrip())
    return lines


def machine():
    """16 MiB at 0, a 1 MiB scratch area at 8 MiB; two touching order-0 pages, an order-3
    folio, every other page of 0x100000..0x140000 (32 pages), one page high up."""
    memory = PhysicalMemory([Bank(0, 16 << 20)])
    memory.set_scratch([ScratchArea(8 << 20, 1 << 20, "lowmem")])
    alloc = PageAllocator(memory, seed=0)
    tracker = Tracker(memory)
    tracker.preserve_folio(0x10000, 0)
    tracker.preserve_folio(0x11000, 0)
    tracker.preserve_folio(0x20000, 3)
    tracker.preserve_many(np.arange(0x100000, 0x140000, 0x2000, dtype=np.uint64), 0)
    tracker.preserve_folio(0xC00000, 0)
    for phys, order in tracker.units():
        alloc.reserve(phys, 4096 << order)
    tracker.finalize()
    return memory, alloc, tracker


def prop_line(props, name):
    return f"{name}: " + " ".join(f"{b:02x}" for b in props[name])


def first_chunk_example(name, magic):
    """The root property and the used part of the first chunk of a chunk-list encoding."""
    memory, alloc, tracker = machine()
    encoded = get_encoding(name).encode(tracker, alloc)
    head = int.from_bytes(encoded.props["preserved-memory-map"], "little")
    chunk = read_chunk_list(memory, head, 8, magic, "spec")
    used = CHUNK_HEADER.itemsize + int(chunk.counts[0]) * 8
    return "\n".join([prop_line(encoded.props, "preserved-memory-map"), *hexdump(memory.read(head, used), head)])


def examples() -> dict[str, str]:
    out = {}
    memory, alloc, tracker = machine()
    encoded = get_encoding("ranges").encode(tracker, alloc)
    out["ranges"] = "\n".join(["mem (offsets in the property):", *hexdump(encoded.props["mem"], 0)])

    out["ranges-packed"] = first_chunk_example("ranges-packed", PACKED_MAGIC)

    memory, alloc, tracker = machine()
    encoded = get_encoding("maple").encode(tracker, alloc)
    root = int.from_bytes(encoded.props["preserved-memory-map"], "little")
    lines = [prop_line(encoded.props, "preserved-memory-map"), f"height {encoded.height}, {encoded.nr_nodes} nodes; the root:"]
    lines += hexdump(memory.read(root, MAPLE_NODE_BYTES), root)
    first_leaf = int.from_bytes(memory.read(root + 15 * 8, 8), "little")
    lines += ["its first leaf:", *hexdump(memory.read(first_leaf, MAPLE_NODE_BYTES), first_leaf)]
    out["maple"] = "\n".join(lines)

    out["instructions"] = first_chunk_example("instructions", STREAM_MAGIC)
    return out


def test_spec_examples_are_current():
    text = SPEC.read_text()
    found = {name: body.rstrip("\n") for name, body in MARKER.findall(text)}
    expected = examples()
    assert sorted(found) == sorted(expected)
    for name, body in expected.items():
        assert found[name] == body, f"spec/encodings.md example {name!r} is out of date; run python {__file__}"


if __name__ == "__main__":
    for name, body in examples().items():
        print(f"<!-- example: {name} -->\n```text\n{body}\n```\n")
