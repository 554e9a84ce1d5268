"""``open_dump``: a memory dump or a debugfs directory, recognised by content.

* a directory: debugfs's ``kho/out`` or ``kho/in`` (:mod:`kho.dumps.debugfs`);
* a kho handover image (``.kho``, a msgpack map starting with its magic): its memory and
  recorded addresses (:class:`ImageDump`);
* a file starting with the zstd frame magic: a zstd-compressed raw dump;
* a file starting with ``\\x7fELF``: an ELF core (``PT_LOAD`` by physical address);
* any other non-empty file: a raw physical-memory dump (offset = ``phys - base``).

RAM is what the dump covers (the raw file's extent, the ELF core's segments) or the
``ram`` ranges given, which must lie inside it.  Nothing is read beyond the header here
(a zstd dump is decompressed once, see :class:`~kho.dumps.sources.ZstdSource`); the scan for
the handover runs on the first :meth:`Dump.handover` or :meth:`Dump.candidates`.
"""

from __future__ import annotations

import os
import stat
from typing import Sequence

import msgpack
import numpy as np

from kho.devicetree.khofdt import DEFAULT_PAGE_SIZE
from kho.dumps.debugfs import DebugfsHandover, read_debugfs
from kho.dumps.find import DumpHandover, FdtCandidate, Handoff, classify, find_handover
from kho.dumps.kdump import KDUMP_SIGNATURE, KdumpSource
from kho.dumps.memory import DumpMemory
from kho.dumps.sources import ELF_MAGIC, KDUMP_SIGNATURES, ZSTD_MAGIC, ElfSource, PageScan, RawSource, Source, ZstdSource
from kho.encodings import known_compatibles
from kho.errors import KHOError, KHOFormatError
from kho.handover.imagefile import IMAGE_MAGIC, LoadedImage, load_image
from kho.memory.geometry import PageGeometry
from kho.memory.physical import Bank, PhysicalMemory
from kho.sizes import parse_size

#: A kho image starts with a msgpack map (fixmap, map 16, map 32) whose first value is the magic.
IMAGE_MAP_MARKERS = tuple(bytes([0x80 | n]) for n in range(16)) + (b"\xde", b"\xdf")
IMAGE_MAGIC_BYTES = msgpack.packb(IMAGE_MAGIC)


class Dump:
    """An opened memory dump: ``memory`` (a read-only :class:`~kho.dumps.memory.DumpMemory`),
    ``format`` (raw, zstd, elf) and ``description`` (what was recognised).  Close it (or use
    it as a context manager) to release the file."""

    def __init__(self, path: str, source: Source | None, memory: PhysicalMemory):
        self.path = path
        self.source = source
        self.memory = memory
        self.format = source.format if source is not None else ""
        self.description = source.description if source is not None else ""
        self._handovers: dict[tuple[int | None, bool], DumpHandover] = {}

    @property
    def page_size(self) -> int:
        return self.memory.page_size

    def source_json(self) -> dict:
        """``path``, ``format`` (raw, zstd, elf, kho) and ``description``."""
        return {"path": self.path, "format": self.format, "description": self.description}

    def scan(self) -> PageScan:
        """Page starts holding an FDT or an x86 boot_params (scanned once, O(dump data))."""
        return self.source.scan()

    def candidates(self, *, strict: bool = False) -> list[FdtCandidate]:
        """Every FDT found at a page start, classified, KHO maps decoded."""
        return [classify(self.memory, int(p), strict=strict) for p in self.scan().fdt.tolist()]

    def handover(self, *, fdt: int | None = None, strict: bool = False) -> DumpHandover:
        """The handover (see :func:`~kho.dumps.find.find_handover`); ``fdt``: the KHO FDT's
        phys, to choose among several; ``strict``: kho's strict decoding instead of the
        kernel-compatible one.  Computed once per choice."""
        key = (fdt, strict)
        if key not in self._handovers:
            self._handovers[key] = self._find(fdt, strict)
        return self._handovers[key]

    def _find(self, fdt: int | None, strict: bool) -> DumpHandover:
        scan = self.scan()
        return find_handover(self.memory, scan.fdt, scan.boot_params, what=f"{self.path} ({self.description})",
                             fdt=fdt, strict=strict)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()

    def __enter__(self) -> "Dump":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ImageDump(Dump):
    """A kho handover image (``.kho``) opened like a dump: its memory, the KHO FDT and scratch
    array where the image records them (no scan), kho's own encodings recognised too."""

    def __init__(self, path: str, image: LoadedImage):
        super().__init__(path, None, image.memory)
        self.image = image
        self.format = "kho"
        self.description = (f"kho handover image, {image.encoding}, RAM in {len(image.memory.banks)} bank(s), "
                            f"{image.memory.ram_size} bytes of RAM")

    def scan(self) -> PageScan:
        """The recorded KHO FDT only."""
        return PageScan(fdt=np.array([self.image.fdt_phys], np.uint64))

    def _find(self, fdt: int | None, strict: bool) -> DumpHandover:
        image = self.image
        recorded = Handoff(image.fdt_phys, image.fdt_size, image.scratch_phys, image.scratch_size, f"the image {self.path}")
        return find_handover(self.memory, self.scan().fdt, self.scan().boot_params, what=f"{self.path} ({self.description})",
                             fdt=fdt, strict=strict, handoffs=[recorded], compatibles=known_compatibles())


def is_image(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a kho handover image (a msgpack map whose
    first entry is ``magic: "kho-image"``)."""
    return head[:1] in IMAGE_MAP_MARKERS and IMAGE_MAGIC_BYTES in head[:32]


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """RAM ranges from ``START-END`` (END inclusive, as ``/proc/iomem`` and the kernel's e820
    lines print them) or ``START+SIZE`` items, comma-separated; numbers in any base Python
    reads (``0x...``), a size also with a K/M/G/T suffix.  Returns ``(start, size)`` pairs in
    bytes; KHOError(EINVAL) for anything else.  O(items)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            if "+" in item:
                start, size = item.split("+", 1)
                out.append((int(start, 0), parse_size(size.strip())))
            elif "-" in item:
                start, last = item.split("-", 1)
                out.append((int(start, 0), int(last, 0) + 1 - int(start, 0)))
            else:
                raise ValueError(item)
        except (ValueError, KHOError):
            raise KHOError("EINVAL", f"RAM range {item!r} is neither START-END nor START+SIZE") from None
        if out[-1][0] < 0 or out[-1][1] <= 0:
            raise KHOError("EINVAL", f"RAM range {item!r} is empty")
    return out


def _banks(source: Source, ram: Sequence | None, page_size: int) -> list[Bank]:
    """The RAM banks: the source's extents, or ``ram`` (``(start, size)`` pairs or Banks in
    bytes, shrunk to whole pages), each inside one extent (KHOError(EINVAL) otherwise)."""
    if ram is None:
        return [Bank(start, end - start) for start, end in source.extents]
    banks = []
    for r in ram:
        start, size = (r.start, r.size) if isinstance(r, Bank) else r
        lo, hi = -(-start // page_size) * page_size, (start + size) // page_size * page_size
        if hi <= lo:
            raise KHOError("EINVAL", f"RAM range {start:#x}+{size:#x} holds no whole {page_size}-byte page")
        if not any(s <= lo and hi <= e for s, e in source.extents):
            covered = ", ".join(f"{s:#x}-{e:#x}" for s, e in source.extents)
            raise KHOError("EINVAL", f"RAM range {start:#x}+{size:#x} is not inside the dump ({covered})")
        banks.append(Bank(lo, hi - lo))
    return banks


def open_dump(path: str | os.PathLike, *, base: int | None = None, ram: Sequence | None = None,
              page_size: int | None = None) -> Dump | DebugfsHandover:
    """Open a dump or a debugfs directory (see the module docstring).  ``base``: the phys of a
    raw (or zstd raw) dump's first byte (default 0); ``ram``: the RAM ranges, ``(start,
    size)`` in bytes; ``page_size``: the dumped kernel's page size (default: what the dump
    says — a kdump-compressed vmcore's block size, an ELF core's VMCOREINFO ``PAGESIZE`` —
    else 4096; given, it must agree with what the dump says).  KHOError(ENOENT) for a
    missing path, KHOFormatError naming what was recognised for a damaged file."""
    path = os.fspath(path)
    if page_size is not None:
        PageGeometry(page_size)
    if os.path.isdir(path):
        if base is not None or ram is not None:
            raise KHOError("EINVAL", f"{path}: a debugfs directory has no physical addresses (no base or RAM)")
        return read_debugfs(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before open: a FIFO would block, a device never end
            raise KHOError("EINVAL", f"{path}: not a regular file (a dump is a file, or a debugfs directory)")
        file = open(path, "rb")
    except FileNotFoundError:
        raise KHOError("ENOENT", f"{path}: no such file or directory") from None
    except OSError as err:
        raise KHOError("EINVAL", f"{path}: cannot be read: {err.strerror}") from None
    try:
        head = file.read(32)
        file.seek(0)
        if not head:
            raise KHOError("EINVAL", f"{path}: an empty file is not a memory dump")
        if is_image(head):
            if base is not None or ram is not None:
                raise KHOError("EINVAL", f"{path}: a kho handover image records its own RAM (no base or RAM)")
            image = load_image(file)
            file.close()
            return ImageDump(path, image)
        kdump = next((what for sig, what in KDUMP_SIGNATURES.items() if head.startswith(sig)), None)
        if head.startswith(KDUMP_SIGNATURE):
            if base is not None:
                raise KHOError("EINVAL", f"{path}: a kdump-compressed vmcore carries its own physical addresses (no base)")
            source: Source = KdumpSource(path, page_size, file)
        elif kdump:
            raise KHOFormatError("signature", f"{path}: a {kdump}, which kho does not read: rebuild it with "
                                              "makedumpfile -R, or write an ELF vmcore (makedumpfile -E)",
                                 0, where="offset")
        elif head[:4] == ZSTD_MAGIC:
            source = ZstdSource(path, page_size or DEFAULT_PAGE_SIZE, base or 0, file)
        elif head[:4] == ELF_MAGIC:
            if base is not None:
                raise KHOError("EINVAL", f"{path}: an ELF core carries its own physical addresses (no base)")
            source = ElfSource(path, page_size, file)
        else:
            source = RawSource(path, page_size or DEFAULT_PAGE_SIZE, base or 0, file)
        memory = DumpMemory(source, _banks(source, ram, source.page_size), source.page_size)
    except BaseException:
        file.close()
        raise
    return Dump(path, source, memory)
