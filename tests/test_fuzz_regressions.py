"""Every input a fuzzer or an audit found to crash a decoder, replayed through its target.

Files under ``tests/fuzz/crashes/<target>/`` are the fuzzer's artifacts (``crash-*``,
``timeout-*``, ``oom-*``), kept as found; the inline cases below are inputs found while
auditing the decoders, each with the bug it caught.  A target fails on anything but a
checked decode or a KHOFormatError; each run is time-limited.
"""

import io
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest
from fuzz.corpus import seeds
from fuzz.samples import PS
from fuzz.targets import TARGETS, time_limit

from kho.abi.kho_v1 import KHOSER_MEM_BITMAP_PTR_DTYPE as CHUNK_ENTRY_DTYPE
from kho.abi.kho_v1 import khoser_bitmap_size as chunk_capacity
from kho.encodings import get_encoding
from kho.errors import KHOFormatError
from kho.handover.imagefile import load_image
from kho.handover.scratch_array import read_scratch_array
from kho.memory.physical import PhysicalMemory

CRASHES = Path(__file__).resolve().parent / "fuzz" / "crashes"
FOUND = sorted(p for p in CRASHES.glob("*/*") if p.is_file())


@pytest.mark.parametrize("path", FOUND, ids=[f"{p.parent.name}/{p.name[:16]}" for p in FOUND])
def test_fuzzer_finding_is_handled(path):
    with time_limit(60):
        TARGETS[path.parent.name].run(path.read_bytes())


def test_every_target_has_a_crash_folder_name():
    assert {p.parent.name for p in FOUND} <= set(TARGETS)


def test_scratch_array_of_empty_areas():
    """Lenient reading once returned an empty area list (all entries of size 0): a next
    kernel with no scratch at all.  Found by the scratch-array fuzzer."""
    data = (1 << 56).to_bytes(8, "little") + bytes(8) + (16).to_bytes(8, "little")[:6]
    TARGETS["scratch-array"].run(data)


def test_image_with_a_non_string_option_name():
    """A bytes option name reached ``get_encoding(**options)`` and raised TypeError."""
    top = msgpack.unpackb(seeds("image")[0], raw=False)
    top["options"] = {b"bitmap_bytes": 512}
    with pytest.raises(KHOFormatError) as err:
        load_image(io.BytesIO(msgpack.packb(top, use_bin_type=True)))
    assert err.value.field == "image.options"


def test_image_claiming_a_huge_fdt():
    """The FDT size in an image was only checked against RAM: a 1 GiB claim meant a 1 GiB read."""
    top = msgpack.unpackb(seeds("image")[0], raw=False)
    top["fdt"][1] = 1 << 30
    top["banks"] = [[0, 2 << 30, 0]]
    with pytest.raises(KHOFormatError) as err:
        load_image(io.BytesIO(msgpack.packb(top, use_bin_type=True)))
    assert err.value.field == "image.fdt"


def test_scratch_array_claiming_a_gigabyte():
    """The scratch array's claimed size was only checked against RAM: reading a 1 GiB claim
    allocated 1 GiB.  Now at most MAX_SCRATCH_AREAS entries are read."""
    memory = PhysicalMemory.single_bank(2 << 30)
    with time_limit(10), pytest.raises(KHOFormatError) as err:
        read_scratch_array(memory, 0x1000, 1 << 30)
    assert err.value.field == "scratch.size"


def test_kho_v1_bitmaps_are_expanded_in_bounded_memory():
    """A kho-v1 map of 40 full chunks (10,200 bitmap pointers to pages never written) was read
    and unpacked at once: ~40 MiB of pages and 320 MiB of bits for 160 KiB of input.  Bitmaps
    are now expanded in batches, only their non-zero bytes."""
    memory = PhysicalMemory.single_bank(128 << 20)
    cap, chunks = chunk_capacity(PS), 40
    first_chunk, first_bitmap = 64 << 20, 16 << 20
    span = (PS * 8) << 12  # bytes one page bitmap of order 0 covers
    for c in range(chunks):
        entries = np.zeros(cap, dtype=CHUNK_ENTRY_DTYPE)
        entries["phys_start"] = (np.arange(cap, dtype=np.uint64) + np.uint64(c * cap)) * np.uint64(span)
        entries["bitmap"] = np.uint64(first_bitmap) + (np.arange(cap, dtype=np.uint64) + np.uint64(c * cap)) * np.uint64(PS)
        nxt = first_chunk + (c + 1) * PS if c + 1 < chunks else 0
        memory.write(first_chunk + c * PS, nxt.to_bytes(8, "little") + bytes(4) + cap.to_bytes(4, "little") + entries.tobytes())
    tracemalloc.start()
    try:
        decoded = get_encoding("kho-v1", PS).decode(memory, {"preserved-memory-map": first_chunk.to_bytes(8, "little")})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(decoded) == 0 and peak < 64 << 20, peak


def test_one_range_over_all_of_ram_splits_in_bounded_rounds():
    """A 16-byte ``ranges`` entry spanning 16 TiB took one numpy round per unit of the
    greedy split (4 million rounds, minutes); whole MAX_PAGE_ORDER blocks are now laid out
    at once."""
    memory = PhysicalMemory.single_bank(16 << 40)
    props = {"mem": (PS).to_bytes(8, "little") + ((16 << 40) - 2 * PS).to_bytes(8, "little")}
    with time_limit(30):
        decoded = get_encoding("ranges", PS).decode(memory, props)
    assert len(decoded) == (16 << 40) // (4 << 20) + 18 and decoded.order.max() == 10


def test_many_sibling_nodes_parse_in_linear_time():
    """The FDT reader looked up duplicate names with the fdt package's linear scans:
    quadratic in the number of siblings.  20,000 siblings now parse well within the limit."""
    import fdt as fdt_package

    from kho.devicetree.flat import new_tree, parse_fdt, to_dtb

    tree = new_tree()
    for i in range(20000):
        tree.root.nodes.append(fdt_package.Node(f"n{i}"))
    blob = to_dtb(tree)
    with time_limit(30):
        assert len(parse_fdt(blob).root.nodes) == 20000
