"""The handover image file (``.kho``): a finalized handover, as the next kernel would find it.

A msgpack map (spec/image-format.md documents it for other programs) holding the machine
(page size, RAM banks, scratch areas), the encoding and its options, where the KHO FDT and
the scratch-area array are, the boot DTB, and the contents of every page the next kernel
must read: the FDT, the scratch array, the map's metadata pages, and the preserved data
that has contents.  Contents are stored as runs: explicit pages as ``[start pfn, bytes]``
(consecutive pages in one byte string) and generated pages (:mod:`kho.memory.contents`) as
``[start pfn, pages, seed]``.  A generated run is kept from its first to its last preserved
page (one entry per run, however sparse the preserved pages inside it).

:func:`load_image` checks everything (types, sizes, ranges, overlaps, the boot DTB against
the recorded addresses, the encoding and its options) and raises
:class:`~kho.errors.KHOFormatError` for any malformed, truncated or hostile file; what it
allocates is bounded by the file's size (generated runs cost no memory): the file is read
only when regular and at most :data:`MAX_IMAGE_BYTES` (:func:`kho.files.read_bounded`),
msgpack's limits are set before anything is unpacked (:func:`_unpack_top`), with at most
:data:`MAX_BANKS` banks, ``MAX_SCRATCH_AREAS`` scratch areas, a KHO FDT of at most a
MAX_PAGE_ORDER block and a scratch array of at most ``MAX_SCRATCH_AREAS`` entries.  It does
not judge the KHO FDT or the map themselves: a damaged handover loads, and
:meth:`LoadedImage.decode` (strict or kernel-compatible) decides.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO

import msgpack
import numpy as np

from kho.abi.kexec_handover import KHO_SCRATCH_DTYPE
from kho.devicetree import ChosenKHO, KHOFdt, parse_chosen
from kho.encodings import DecodedMap, Encoding, get_encoding
from kho.errors import KHOError, KHOFormatError
from kho.files import read_bounded, write_atomic
from kho.handover.outgoing import ARCH_ARM64, ARCH_X86_64, ARCHES, Handover
from kho.handover.scratch_array import MAX_SCRATCH_AREAS
from kho.handover.x86_boot_params import params_segment_size, read_handoff
from kho.memory import intervals
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea

#: First key of every image and the format version this module writes and reads.
IMAGE_MAGIC = "kho-image"
IMAGE_VERSION = 1
#: The keys of an image map, all required.
IMAGE_KEYS = ("magic", "version", "page_size", "banks", "scratch", "encoding", "options", "fdt",
              "scratch_array", "boot_dtb", "pages", "generated")
#: Keys an image may have: ``arch`` (default arm64) and, for x86_64, ``boot_params`` =
#: ``[phys, params segment]`` (the zero page and its setup_data chain, at that phys).
IMAGE_OPTIONAL_KEYS = ("arch", "boot_params")
U64_MAX = (1 << 64) - 1
#: Most RAM banks an image may describe (a bound on the work any reader does per bank).
MAX_BANKS = 4096
#: Largest image file read (msgpack's 32-bit lengths; the file is also checked against the
#: host's available memory before it is read).
MAX_IMAGE_BYTES = (1 << 32) - 1
#: Longest string (magic, encoding name, scratch kind, option value) an image may hold.
MAX_STR_BYTES = 4096
#: Most items of an array inside the top-level arrays or values (a bank, a run: 2-3 items).
MAX_NESTED_ITEMS = 16
#: Most entries of a map (the top-level map, the encoding's options).
MAX_MAP_ITEMS = 64

PathOrFile = str | os.PathLike | BinaryIO


@dataclass(frozen=True)
class LoadedImage(ChosenKHO):
    """An image read back: the machine's memory (scratch areas set, contents restored) and
    where the handover is (the :class:`~kho.devicetree.chosen.ChosenKHO` fields, which its
    ``boot_dtb`` says too).  Addresses and sizes in bytes."""

    memory: PhysicalMemory
    boot_dtb: bytes
    encoding: str
    options: dict
    version: int = IMAGE_VERSION
    arch: str = ARCH_ARM64
    #: x86_64: phys of the zero page (its params segment is in ``memory``); None on arm64.
    boot_params: int | None = None

    def boot_args(self) -> dict:
        """How the next kernel receives this handover: ``boot(memory, **image.boot_args())``."""
        if self.arch == ARCH_X86_64:
            return {"boot_dtb": None, "boot_params": self.boot_params}
        return {"boot_dtb": self.boot_dtb}

    @property
    def page_size(self) -> int:
        return self.memory.page_size

    def chosen(self, *, strict: bool = True) -> ChosenKHO:
        """The boot DTB's ``/chosen`` (``strict=False``: read as the kernel reads it)."""
        return parse_chosen(self.boot_dtb, strict=strict)

    def get_encoding(self) -> Encoding:
        return get_encoding(self.encoding, self.memory.page_size, **self.options)

    def kho_fdt(self, *, strict: bool = True) -> KHOFdt:
        """The KHO FDT, checked as the next kernel checks it (KHOFormatError otherwise);
        ``strict=False`` reads it as leniently as the kernel (see :meth:`KHOFdt.from_dtb`)."""
        return KHOFdt.from_dtb(self.memory.read(self.fdt_phys, self.fdt_size), self.get_encoding().compatible,
                               page_size=self.memory.page_size, strict=strict)

    def decode(self, *, strict: bool = True) -> DecodedMap:
        """The preserved units, decoded from the map the FDT points at.  ``strict`` (default)
        validates the map and the FDT's sub-nodes (each pointing into a preserved unit);
        ``strict=False`` decodes as leniently as the kernel (spec/hardening.md)."""
        fdt = self.kho_fdt(strict=strict)
        decoded = self.get_encoding().decode(self.memory, fdt.props, strict=strict)
        if strict:
            fdt.check_subtrees(self.memory, decoded)
        return decoded


# -- saving ----------------------------------------------------------------------------------


def _explicit_runs(memory: PhysicalMemory, pfns: np.ndarray) -> list[list]:
    """``[start pfn, bytes]`` runs of consecutive pages for sorted, distinct ``pfns``."""
    runs = []
    if not pfns.size:
        return runs
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    for chunk in np.split(pfns, breaks):
        first, count = int(chunk[0]), int(chunk.size)
        runs.append([first, memory.read(first << memory.page_shift, count << memory.page_shift)])
    return runs


def image_map(handover: Handover) -> dict:
    """The msgpack map for ``handover`` (see the module docstring).  O(stored pages + generated runs + units)."""
    memory = handover.memory
    shift = memory.page_shift
    encoding = get_encoding(handover.encoding, memory.page_size, **handover.options)
    decoded = encoding.decode(memory, handover.encoded.props, strict=False)  # everything the next kernel keeps
    starts, ends = intervals.normalize(*intervals.of_units((decoded.phys >> np.uint64(shift)).astype(np.int64), decoded.order))
    params_phys = handover.params_spot() if handover.arch == ARCH_X86_64 else None
    keep = (handover.pages_to_keep() >> np.uint64(shift)).astype(np.int64)
    stored = np.fromiter((pfn for pfn, _ in memory.stored_pages()), dtype=np.int64)
    stored = stored[intervals.contains(starts, ends, stored)]
    explicit = np.union1d(keep, stored)
    generated = []
    for first, end, seed in memory.generated_runs():
        lo = int(np.searchsorted(ends, first, side="right"))
        hi = int(np.searchsorted(starts, end, side="left"))
        if lo < hi:
            a, b = max(first, int(starts[lo])), min(end, int(ends[hi - 1]))
            generated.append([a, b - a, seed])
    return {
        "magic": IMAGE_MAGIC,
        "version": IMAGE_VERSION,
        "page_size": memory.page_size,
        "banks": [[b.start, b.size, b.node] for b in memory.banks],
        "scratch": [[a.addr, a.size, a.kind] for a in memory.scratch],
        "encoding": handover.encoding,
        "options": dict(handover.options),
        "fdt": [handover.fdt_phys, handover.fdt_size],
        "scratch_array": [handover.scratch_phys, handover.scratch_size],
        "boot_dtb": handover.boot_dtb(),
        "pages": _explicit_runs(memory, explicit),
        "generated": generated,
        "arch": handover.arch,
        **({"boot_params": [params_phys, handover.params_segment(params_phys)]} if handover.arch == ARCH_X86_64 else {}),
    }


def save_image(path_or_file: PathOrFile, handover: Handover) -> int:
    """Write the image of ``handover`` (to a path: atomically, :func:`kho.files.write_atomic`;
    a failed write leaves the old file whole); returns its size in bytes."""
    return write_atomic(path_or_file, msgpack.packb(image_map(handover), use_bin_type=True))


# -- loading ---------------------------------------------------------------------------------


def _int(value, field: str, low: int = 0, high: int = U64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KHOFormatError(f"image.{field}", f"expected an integer, found {type(value).__name__}")
    if not low <= value <= high:
        raise KHOFormatError(f"image.{field}", f"{value} is outside {low}..{high}")
    return value


def _list(value, field: str, length: int | None = None) -> list:
    if not isinstance(value, list):
        raise KHOFormatError(f"image.{field}", f"expected an array, found {type(value).__name__}")
    if length is not None and len(value) != length:
        raise KHOFormatError(f"image.{field}", f"expected {length} items, found {len(value)}")
    return value


def _typed(value, kind: type, field: str):
    if not isinstance(value, kind):
        raise KHOFormatError(f"image.{field}", f"expected {kind.__name__}, found {type(value).__name__}")
    return value


def _array_limits(size: int) -> dict[str, int]:
    """Most items each top-level array of a ``size``-byte image may hold, checked from its
    header before any item is unpacked: the format's limits for banks and scratch areas;
    a run (explicit or generated) takes at least 4 bytes of the file."""
    return {"banks": MAX_BANKS, "scratch": MAX_SCRATCH_AREAS, "pages": size // 4, "generated": size // 4}


def _unpack_top(data: bytes) -> dict:
    """The image's top-level map, read key by key with the unpacker's limits set before
    anything is unpacked: every bin or str at most the file's size (a str at most
    MAX_STR_BYTES), every nested array at most MAX_NESTED_ITEMS items, every map at most
    MAX_MAP_ITEMS; each top-level array's length is checked against :func:`_array_limits`
    from its header, a key outside the format is refused before its value is read.
    Work and memory O(file size)."""
    size = len(data)
    unpacker = msgpack.Unpacker(io.BytesIO(data), raw=False, strict_map_key=True, use_list=True,
                                max_buffer_size=max(size, 1), max_bin_len=size, max_str_len=min(size, MAX_STR_BYTES),
                                max_array_len=MAX_NESTED_ITEMS, max_map_len=MAX_MAP_ITEMS, max_ext_len=0)
    limits = _array_limits(size)
    top: dict = {}
    for _ in range(unpacker.read_map_header()):
        key = unpacker.unpack()
        if key not in IMAGE_KEYS + IMAGE_OPTIONAL_KEYS:
            raise KHOFormatError("image.map", f"unknown key {key!r}")
        if key in top:
            raise KHOFormatError("image.map", f"key {key!r} appears twice")
        if key in limits:
            try:
                count = unpacker.read_array_header()
            except ValueError:  # the unpacker's "unexpected type" for anything but an array header
                raise KHOFormatError(f"image.{key}", "expected an array") from None
            if count > limits[key]:
                raise KHOFormatError(f"image.{key}", f"{count:,} items, more than the {limits[key]:,} "
                                                     f"a {size:,}-byte image may hold")
            top[key] = [unpacker.unpack() for _ in range(count)]
        else:
            top[key] = unpacker.unpack()
    if unpacker.tell() != size:
        raise KHOFormatError("image", f"{size - unpacker.tell()} bytes after the image's map", unpacker.tell(), where="offset")
    return top


def _unpack(data: bytes) -> dict:
    try:
        top = _unpack_top(data)
    except KHOError:
        raise
    except Exception as err:  # msgpack signals malformed input with several exception types
        raise KHOFormatError("image", f"not a msgpack image map: {type(err).__name__} {err}", 0, where="offset") from None
    if top.get("magic") != IMAGE_MAGIC:
        raise KHOFormatError("image.magic", f"not a kho image (magic {top.get('magic')!r})")
    version = _int(top.get("version"), "version")
    if version != IMAGE_VERSION:
        raise KHOFormatError("image.version", f"version {version} (this kho reads {IMAGE_VERSION})")
    missing = [k for k in IMAGE_KEYS if k not in top]
    extra = [k for k in top if k not in IMAGE_KEYS + IMAGE_OPTIONAL_KEYS]
    if missing or extra:
        raise KHOFormatError("image.map", f"missing keys {missing}, unknown keys {extra}")
    return top


def _memory(top: dict) -> PhysicalMemory:
    page_size = _int(top["page_size"], "page_size")
    banks = []
    if len(_list(top["banks"], "banks")) > MAX_BANKS:
        raise KHOFormatError("image.banks", f"{len(top['banks'])} banks, more than {MAX_BANKS}")
    if len(_list(top["scratch"], "scratch")) > MAX_SCRATCH_AREAS:
        raise KHOFormatError("image.scratch", f"{len(top['scratch'])} scratch areas, more than {MAX_SCRATCH_AREAS}")
    for i, bank in enumerate(_list(top["banks"], "banks")):
        start, size, node = _list(bank, f"banks[{i}]", 3)
        banks.append(Bank(_int(start, f"banks[{i}].start"), _int(size, f"banks[{i}].size"), _int(node, f"banks[{i}].node", 0, 1 << 16)))
    areas = []
    for i, area in enumerate(_list(top["scratch"], "scratch")):
        addr, size, kind = _list(area, f"scratch[{i}]", 3)
        areas.append(ScratchArea(_int(addr, f"scratch[{i}].addr"), _int(size, f"scratch[{i}].size"), _typed(kind, str, f"scratch[{i}].kind")))
    try:
        memory = PhysicalMemory(banks, page_size)
    except KHOError as err:
        raise KHOFormatError("image.banks", err.message) from None
    try:
        memory.set_scratch(areas)
    except KHOError as err:
        raise KHOFormatError("image.scratch", err.message) from None
    return memory


def _contents(top: dict, memory: PhysicalMemory) -> None:
    """Check the runs (inside RAM, no overlap) and restore them into ``memory``."""
    ps, shift = memory.page_size, memory.page_shift
    spans = []  # (first pfn, end pfn, field)
    explicit = []
    for i, run in enumerate(_list(top["pages"], "pages")):
        first, data = _list(run, f"pages[{i}]", 2)
        first = _int(first, f"pages[{i}].pfn", 0, U64_MAX >> shift)
        data = _typed(data, bytes, f"pages[{i}].data")
        if not data or len(data) % ps:
            raise KHOFormatError(f"image.pages[{i}].data", f"{len(data)} bytes is not a whole, non-zero number of {ps}-byte pages")
        spans.append((first, first + len(data) // ps, f"pages[{i}]"))
        explicit.append((first, data))
    generated = []
    for i, run in enumerate(_list(top["generated"], "generated")):
        first, count, seed = _list(run, f"generated[{i}]", 3)
        first = _int(first, f"generated[{i}].pfn", 0, U64_MAX >> shift)
        count = _int(count, f"generated[{i}].pages", 1, U64_MAX >> shift)
        generated.append((first, count, _int(seed, f"generated[{i}].seed")))
        spans.append((first, first + count, f"generated[{i}]"))
    for first, end, field in spans:
        if not memory.in_ram(first << shift, (end - first) << shift):
            raise KHOFormatError(f"image.{field}", f"pages {first:#x}..{end - 1:#x} are not inside one RAM bank")
    spans.sort()
    for (_, end, left), (first, _, right) in zip(spans, spans[1:]):
        if first < end:
            raise KHOFormatError(f"image.{right}", f"overlaps image.{left}")
    for first, data in explicit:
        memory.write(first << shift, data)
    for first, count, seed in generated:
        memory.fill_pattern(first << shift, count << shift, seed)


def load_image(path_or_file: PathOrFile) -> LoadedImage:
    """Read and check an image (KHOFormatError for anything malformed); see the module docstring."""
    top = _unpack(read_bounded(path_or_file, MAX_IMAGE_BYTES, "image"))
    memory = _memory(top)
    name = _typed(top["encoding"], str, "encoding")
    options = _typed(top["options"], dict, "options")
    for key, value in options.items():
        if not isinstance(key, str):
            raise KHOFormatError("image.options", f"option name {key!r} is not a string")
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            raise KHOFormatError("image.options", f"option {key!r} has a {type(value).__name__} value")
    try:
        get_encoding(name, memory.page_size, **options)
    except KHOError as err:
        raise KHOFormatError("image.encoding", err.message) from None
    fdt_phys, fdt_size = (_int(v, f"fdt[{i}]") for i, v in enumerate(_list(top["fdt"], "fdt", 2)))
    scratch_phys, scratch_size = (_int(v, f"scratch_array[{i}]") for i, v in enumerate(_list(top["scratch_array"], "scratch_array", 2)))
    limits = {"fdt": memory.page_size << memory.geometry.max_order, "scratch_array": MAX_SCRATCH_AREAS * KHO_SCRATCH_DTYPE.itemsize}
    for phys, size, field in ((fdt_phys, fdt_size, "fdt"), (scratch_phys, scratch_size, "scratch_array")):
        if size == 0 or not memory.in_ram(phys, size):
            raise KHOFormatError(f"image.{field}", f"{phys:#x}+{size:#x} is empty or not inside one RAM bank")
        if size > limits[field]:
            raise KHOFormatError(f"image.{field}", f"{size} bytes, more than the {limits[field]} any handover uses")
    boot_dtb = _typed(top["boot_dtb"], bytes, "boot_dtb")
    chosen = parse_chosen(boot_dtb)
    if chosen != ChosenKHO(fdt_phys, fdt_size, scratch_phys, scratch_size):
        raise KHOFormatError("image.boot_dtb", f"/chosen says {chosen}, the image says fdt {fdt_phys:#x}+{fdt_size:#x}, "
                                               f"scratch {scratch_phys:#x}+{scratch_size:#x}")
    arch = _typed(top.get("arch", ARCH_ARM64), str, "arch")
    if arch not in ARCHES:
        raise KHOFormatError("image.arch", f"{arch!r} is not one of {', '.join(ARCHES)}")
    _contents(top, memory)
    params_phys = None
    if arch == ARCH_X86_64:
        params_phys, params = (_list(top.get("boot_params"), "boot_params", 2))
        params_phys, params = _int(params_phys, "boot_params[0]"), _typed(params, bytes, "boot_params[1]")
        if len(params) != params_segment_size() or not memory.in_ram(params_phys, len(params)):
            raise KHOFormatError("image.boot_params", f"{len(params)} bytes at {params_phys:#x}: not a params segment in RAM")
        memory.write(params_phys, params)
        if read_handoff(memory, params_phys) != chosen:
            raise KHOFormatError("image.boot_params", "its setup_data does not point at the image's fdt and scratch array")
    elif "boot_params" in top:
        raise KHOFormatError("image.boot_params", "only an x86_64 image has boot_params")
    return LoadedImage(fdt_phys, fdt_size, scratch_phys, scratch_size, memory=memory, boot_dtb=boot_dtb, encoding=name,
                       options=options, arch=arch, boot_params=params_phys)
