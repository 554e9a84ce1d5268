"""What every sub-node reader and writer shares: blobs, ranges, checked reads, C strings.

Units: ``phys`` and sizes in bytes.  Every helper is O(bytes it reads).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum

from kho.errors import KHOError, KHOFormatError


class FieldsJson:
    """Mixin for frozen dataclasses of plain values: ``to_json()`` is their fields by name,
    in declaration order.  O(fields)."""

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Blob(FieldsJson):
    """A sub-node's blob as ``kho_add_subtree`` registers it: name, phys and size (bytes)."""

    name: str
    phys: int
    size: int


class RangeKind(str, Enum):
    """What a referenced range is, for the checks that treat them apart (``kho check``,
    the fixture cutter): a ``structure`` a reader follows, preserved ``contents`` a
    subsystem hands over (folios, ``reserve_mem`` regions: their bytes are the payload),
    the KHO ``fdt``, the preservation ``map``'s own pages, the ``scratch`` array."""

    STRUCTURE = "structure"
    CONTENTS = "contents"
    FDT = "fdt"
    MAP = "map"
    SCRATCH = "scratch"


@dataclass(frozen=True)
class Range(FieldsJson):
    """A physical range a structure references: ``[phys, phys + size)`` (bytes), what it
    holds (``what``, for people) and its :class:`RangeKind` (for programs)."""

    phys: int
    size: int
    what: str
    kind: RangeKind = RangeKind.STRUCTURE


def in_ram(memory, phys: int, size: int) -> bool:
    """True when ``[phys, phys + size)`` is readable: ``memory.in_ram`` when it has one,
    else a probe of its first and last byte.  O(1)."""
    if phys < 0 or size < 0:
        return False
    check = getattr(memory, "in_ram", None)
    if check is not None:
        return bool(check(phys, max(size, 1)))
    try:
        memory.read(phys, 1)
        memory.read(phys + max(size, 1) - 1, 1)
    except (KHOError, ValueError, IndexError):
        return False
    return True


def read_checked(memory, phys: int, size: int, field: str) -> bytes:
    """``size`` bytes at ``phys``, or KHOFormatError(field) when they are not all in RAM.  O(size)."""
    if phys < 0 or not in_ram(memory, phys, size):
        raise KHOFormatError(field, f"{size} bytes are not in RAM", phys)
    return memory.read(phys, size)


def check_pointer(memory, phys: int, size: int, field: str, align: int) -> None:
    """A pointer must be nonzero, ``align``-aligned and point at ``size`` bytes of RAM."""
    if phys == 0:
        raise KHOFormatError(field, "null pointer", phys)
    if phys % align:
        raise KHOFormatError(field, f"not aligned to {align:#x}", phys)
    if not in_ram(memory, phys, size):
        raise KHOFormatError(field, f"{size} bytes are not in RAM", phys)


def c_string(raw: bytes, field: str, location: int | None, *, strict: bool, allow_empty: bool = False) -> str:
    """The string in a NUL-padded ``char[N]`` array.

    Strict: a NUL inside the array, only NULs after it, printable ASCII, not empty (unless
    ``allow_empty``).  Lenient, as ``strscpy(dst, src, N)`` reads it: up to the first NUL,
    or the first ``N - 1`` bytes when there is none; bytes outside printable ASCII shown as
    ``\\xNN``.  O(N).
    """
    end = raw.find(b"\0")
    if strict:
        if end < 0:
            raise KHOFormatError(field, f"no NUL in {len(raw)} bytes", location)
        if any(raw[end:]):
            raise KHOFormatError(field, "bytes after the terminating NUL are not zero", location)
        if not end and not allow_empty:
            raise KHOFormatError(field, "empty string", location)
        text = raw[:end]
        if any(c < 0x20 or c > 0x7E for c in text):
            raise KHOFormatError(field, "not printable ASCII", location)
        return text.decode("ascii")
    text = raw[:end] if end >= 0 else raw[:max(len(raw) - 1, 0)]
    return "".join(chr(c) if 0x20 <= c <= 0x7E else f"\\x{c:02x}" for c in text)


def encode_c_string(text: str, length: int, what: str) -> bytes:
    """``text`` as a NUL-padded ``char[length]``; EINVAL when it does not fit with its NUL
    or is not printable ASCII (what the kernel's writers accept)."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raw = b"\x80"
    if not raw or len(raw) >= length or any(c < 0x20 or c > 0x7E for c in raw):
        raise KHOError("EINVAL", f"{what} {text!r} must be 1 to {length - 1} printable ASCII characters")
    return raw.ljust(length, b"\0")


def get_order(size: int, page_size: int) -> int:
    """The kernel's ``get_order``: the smallest order whose block holds ``size`` bytes.  O(1)."""
    pages = max(1, -(-size // page_size))
    return (pages - 1).bit_length()


def alloc_preserve(memory, allocator, tracker, size: int) -> int:
    """``kho_alloc_preserve``: a zeroed folio of ``get_order(size)``, preserved; its phys.

    EINVAL for size 0, E2BIG above MAX_PAGE_ORDER, ENOMEM from the allocator; the folio
    is freed again when preserving it fails.  O(folio bytes).
    """
    if size <= 0:
        raise KHOError("EINVAL", "kho_alloc_preserve of 0 bytes")
    order = get_order(size, memory.page_size)
    if order > memory.geometry.max_order:
        raise KHOError("E2BIG", f"{size} bytes need order {order}, above MAX_PAGE_ORDER")
    phys = allocator.alloc_pages(order)
    try:
        memory.write(phys, bytes(memory.page_size << order))
        tracker.preserve_folio(phys, order)
    except KHOError:
        allocator.free_pages(phys, order)
        raise
    return phys
