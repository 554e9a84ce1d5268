"""One fuzz target per decoder: ``run(data)`` feeds the bytes to the decoder in strict and
in kernel-compatible mode and checks every successful result.

A target returns normally when the decoder either succeeds with a result that passes the
checks below or refuses the input with :class:`~kho.errors.KHOFormatError` (a sub-tree
lookup may also answer ENOENT/EINVAL, as the kernel's does).  Anything else — another
exception, a failed check — is a crash.  Checks on a decoded map (:func:`check_units`):
units sorted by address, naturally aligned, inside RAM; strict decodes also disjoint,
outside scratch and at most MAX_PAGE_ORDER.  Input meanings: :mod:`tests.fuzz.samples`.
"""

from __future__ import annotations

import io
import os
import signal
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator

import numpy as np

from kho.devicetree import KHOFdt, parse_chosen
from kho.dumps import open_dump
from kho.dumps.debugfs import read_debugfs
from kho.encodings import DecodedMap, get_encoding
from kho.encodings.common import PHYS_ADDR_BITS
from kho.errors import KHOError, KHOFormatError
from kho.handover.imagefile import load_image
from kho.handover.scratch_array import read_scratch_array
from kho.memory.physical import PhysicalMemory

from .samples import ARENA, ARENA_PAGES, MAX_MAP_INPUT, PS, load_map, machine
from .subnodes import (MAX_SUBNODE_INPUT, kexec_metadata_target, kho_test_target, luo_target, memblock_target,
                       memfd_target)

#: Both decoding modes, strict first.
MODES = (True, False)
#: Largest scratch array, boot DTB, KHO FDT and image inputs the runner asks for (bytes).
MAX_BLOB_INPUT = 64 << 10
MAX_IMAGE_INPUT = 256 << 10


class Hang(Exception):
    """A decode ran past its time limit: a loop bounded by a claimed count, not the input."""


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise :class:`Hang` if the block runs longer than ``seconds`` (SIGALRM; no limit
    where the platform has no SIGALRM).  Generous limits only: this catches runaway work,
    it does not measure speed."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_units(memory: PhysicalMemory, decoded: DecodedMap, strict: bool) -> None:
    """Assert the invariants every decoded map keeps (see the module docstring)."""
    phys, order = decoded.phys, decoded.order
    assert phys.dtype == np.uint64 and order.dtype == np.uint8 and phys.shape == order.shape
    assert bool(np.all(phys[1:] >= phys[:-1])), "units are not sorted by address"
    if not phys.size:
        return
    limit = memory.geometry.max_order if strict else PHYS_ADDR_BITS - memory.page_shift
    assert int(order.max()) <= limit, f"order {int(order.max())} above {limit}"
    size = np.left_shift(np.uint64(memory.page_size), order.astype(np.uint64))
    assert not bool(np.any(phys & (size - np.uint64(1)))), "a unit is not naturally aligned"
    assert bool(memory.in_ram_array(phys, size).all()), "a unit is outside RAM"
    if strict:
        assert bool(np.all(phys[1:] >= phys[:-1] + size[:-1])), "strict units overlap"
        assert not bool(memory.overlaps_scratch_array(phys, size).any()), "a strict unit meets scratch"


def decode_map(name: str, memory: PhysicalMemory, props: dict, options: dict | None = None) -> None:
    """Decode with encoding ``name`` in both modes, checking what comes back."""
    enc = get_encoding(name, PS, **(options or {}))
    for strict in MODES:
        try:
            decoded = enc.decode(memory, props, strict=strict)
        except KHOFormatError:
            continue
        check_units(memory, decoded, strict)
        assert decoded.exact_orders == enc.keeps_orders


def map_target(name: str, *option_sets: dict) -> Callable[[bytes], None]:
    """A target for a memory-based map: the input is a map input (root pointer || pages)."""
    def run(data: bytes) -> None:
        for options in option_sets or ({},):
            memory, props = load_map(data)
            decode_map(name, memory, props, options)
            if name == "maple":
                enc = get_encoding(name, PS)
                for phys in (0, 12 << 20, 36 << 20, (40 << 20) + 5 * PS, 1 << 63):
                    try:
                        found = enc.lookup(memory, props, phys)
                    except KHOFormatError:
                        break
                    assert found is None or found[0] <= phys < found[0] + (PS << found[1])
    return run


def ranges_target(data: bytes) -> None:
    """The ``mem`` property of the ranges encoding, raw."""
    decode_map("ranges", machine(), {"mem": data})


def fdt_target(data: bytes) -> None:
    """A KHO root FDT: parse, look up every sub-tree, dump, re-serialize, check against a machine."""
    for strict in MODES:
        try:
            fdt = KHOFdt.from_dtb(data, page_size=PS, strict=strict)
        except KHOFormatError:
            continue
        for name, phys in fdt.subtrees().items():
            assert fdt.retrieve_subtree(name) == phys
            try:
                fdt.subtree_size(name)
            except KHOError as err:
                assert err.errno_name == "EINVAL"
        for name in fdt.subnode_props():
            try:
                fdt.retrieve_subtree(name)
            except KHOError as err:
                assert err.errno_name in ("EINVAL", "ENOENT")
        fdt.to_dts()
        try:
            fdt.check_subtrees(machine())
        except KHOFormatError:
            pass
        try:
            fdt.memory_map()
        except KHOFormatError:
            pass
        if strict:  # what kho reads strictly, it writes back readable, with the same content
            again = KHOFdt.from_dtb(fdt.to_dtb(), page_size=PS, strict=True)
            assert again.compatible == fdt.compatible and again.props == fdt.props
            assert again.subnode_props() == fdt.subnode_props()


def chosen_target(data: bytes) -> None:
    """A boot DTB's ``/chosen``."""
    for strict in MODES:
        try:
            chosen = parse_chosen(data, strict=strict)
        except KHOFormatError:
            continue
        for value in (chosen.fdt_phys, chosen.fdt_size, chosen.scratch_phys, chosen.scratch_size):
            assert 0 <= value < 1 << 64


def scratch_array_target(data: bytes) -> None:
    """A scratch-area array, written at the arena and read back with its length."""
    memory = machine()
    data = data[:ARENA_PAGES * PS]
    if data:
        memory.write(ARENA, data)
    for strict in MODES:
        try:
            areas = read_scratch_array(memory, ARENA, len(data), strict=strict)
        except KHOFormatError:
            continue
        assert areas and all(a.size > 0 and memory.in_ram(a.addr, a.size) for a in areas)
        if strict:
            ordered = sorted(areas, key=lambda a: a.addr)
            assert all(a.addr % PS == 0 and a.size % PS == 0 for a in areas)
            assert all(left.end <= right.addr for left, right in zip(ordered, ordered[1:]))


def image_target(data: bytes) -> None:
    """A handover image file: load, then everything a reader of it does, in both modes."""
    try:
        image = load_image(io.BytesIO(data))
    except KHOFormatError:
        return
    for strict in MODES:
        for step in (lambda: image.chosen(strict=strict), lambda: image.kho_fdt(strict=strict)):
            try:
                step()
            except KHOFormatError:
                pass
        try:
            decoded = image.decode(strict=strict)
        except KHOFormatError:
            continue
        check_units(image.memory, decoded, strict)


@lru_cache(maxsize=None)
def _work_dir() -> str:
    """A private directory for the files the dump targets hand to kho (one per process)."""
    return tempfile.mkdtemp(prefix="kho-fuzz-dump-")


def dump_target(data: bytes) -> None:
    """A memory dump file (raw, zstd or ELF core, told apart by its first bytes): open it, find
    the handover, decode it, in both modes.  Besides KHOFormatError, "no handover" (ENOENT)
    and "not one handover / not a machine" (EINVAL) are refusals."""
    path = os.path.join(_work_dir(), "dump")
    with open(path, "wb") as f:
        f.write(data)
    for strict in MODES:
        try:
            with open_dump(path) as dump:
                found = dump.handover(strict=strict)
        except KHOError as err:
            assert err.errno_name in ("EINVAL", "ENOENT"), err
            continue
        check_units(dump.memory, found.decoded, strict)
        for node in found.subnodes:
            assert node.data is None or node.size is None or len(node.data) == node.size


def debugfs_target(data: bytes) -> None:
    """A debugfs ``kho/out`` directory whose ``fdt`` file holds the input (whole or cut short)."""
    folder = os.path.join(_work_dir(), "out")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "fdt"), "wb") as f:
        f.write(data)
    try:
        found = read_debugfs(folder)
    except KHOFormatError:
        return
    assert found.truncated == (found.totalsize > len(data))
    assert found.truncated or found.compatible is not None


@dataclass(frozen=True)
class Target:
    """A fuzz target: its name, the function under test and the longest input it needs."""

    name: str
    run: Callable[[bytes], None]
    max_len: int


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("kho-v1", map_target("kho-v1", {"bitmap_bytes": "page"}, {"bitmap_bytes": 512}), MAX_MAP_INPUT),
    Target("kho-v2", map_target("kho-v2"), MAX_MAP_INPUT),
    Target("kho-v3", map_target("kho-v3"), MAX_MAP_INPUT),  # the radix tree with the depth fix (kho-v4 too)
    Target("ranges", ranges_target, MAX_BLOB_INPUT),
    Target("ranges-packed", map_target("ranges-packed"), MAX_MAP_INPUT),
    Target("maple", map_target("maple"), MAX_MAP_INPUT),
    Target("instructions", map_target("instructions"), MAX_MAP_INPUT),
    Target("fdt", fdt_target, MAX_BLOB_INPUT),
    Target("chosen", chosen_target, MAX_BLOB_INPUT),
    Target("scratch-array", scratch_array_target, MAX_BLOB_INPUT),
    Target("image", image_target, MAX_IMAGE_INPUT),
    Target("dump", dump_target, MAX_IMAGE_INPUT),
    Target("debugfs", debugfs_target, MAX_BLOB_INPUT),
    Target("kexec-metadata", kexec_metadata_target, MAX_SUBNODE_INPUT),
    Target("memblock", memblock_target, MAX_SUBNODE_INPUT),
    Target("kho-test", kho_test_target, MAX_SUBNODE_INPUT),
    Target("luo", luo_target, MAX_SUBNODE_INPUT),
    Target("memfd", memfd_target, MAX_SUBNODE_INPUT),
)}
