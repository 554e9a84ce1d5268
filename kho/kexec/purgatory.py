"""Purgatory: the small program kexec-tools (``kexec_load``) runs between the relocation
and the new kernel, which checks a SHA-256 digest of the segments unless ``--no-checks``.

The model's purgatory is one segment holding :data:`PURGATORY_DTYPE`: the regions to
hash (``struct sha256_region { u64 start; u64 len; }``, at most
:data:`SHA256_REGIONS_MAX`) and the digest computed at load time.  :func:`verify` reads
the regions back from memory after the relocation and compares (``hashlib``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory

#: Regions kexec-tools' purgatory can hash (``sha256_regions[16]``).
SHA256_REGIONS_MAX = 16
#: Identifies the model's purgatory header.
PURGATORY_MAGIC = b"KHOPURG1"
#: The purgatory segment's contents: magic, region count, digest, regions (little-endian).
PURGATORY_DTYPE = np.dtype([
    ("magic", "S8"),
    ("nr_regions", "<u4"),
    ("reserved", "<u4"),
    ("digest", "u1", 32),
    ("regions", np.dtype([("start", "<u8"), ("len", "<u8")]), SHA256_REGIONS_MAX),
])


def build(segments) -> bytes:
    """The purgatory segment's bytes for ``segments`` (their ``buf`` as loaded, tails zeroed).

    Hashes each segment's whole destination ``[mem, mem + memsz)``.  EINVAL above
    :data:`SHA256_REGIONS_MAX` segments.  O(bytes).
    """
    if len(segments) > SHA256_REGIONS_MAX:
        raise KHOError("EINVAL", f"purgatory hashes at most {SHA256_REGIONS_MAX} segments, not {len(segments)}")
    head = np.zeros(1, dtype=PURGATORY_DTYPE)
    head["magic"] = PURGATORY_MAGIC
    head["nr_regions"] = len(segments)
    h = hashlib.sha256()
    for i, seg in enumerate(segments):
        head["regions"][0, i] = (seg.mem, seg.memsz)
        h.update(seg.buf)
        h.update(bytes(seg.memsz - seg.bufsz))
    head["digest"][0] = np.frombuffer(h.digest(), dtype=np.uint8)
    return head.tobytes()


@dataclass(frozen=True)
class PurgatoryCheck:
    """Result of the purgatory's check: bytes hashed and whether the digest matched."""

    bytes_hashed: int
    ok: bool
    expected: bytes
    actual: bytes


def verify(memory: PhysicalMemory, phys: int, chunk: int = 16 << 20) -> PurgatoryCheck:
    """Hash the regions the purgatory at ``phys`` lists, as found in memory now.

    KHOFormatError on a malformed header (magic, region count, regions outside RAM).
    O(bytes hashed).
    """
    raw = memory.read(phys, PURGATORY_DTYPE.itemsize)
    head = np.frombuffer(raw, dtype=PURGATORY_DTYPE)[0]
    if bytes(head["magic"]) != PURGATORY_MAGIC:
        raise KHOFormatError("purgatory.magic", f"{bytes(head['magic'])!r} is not {PURGATORY_MAGIC!r}", phys)
    n = int(head["nr_regions"])
    if n > SHA256_REGIONS_MAX:
        raise KHOFormatError("purgatory.nr_regions", f"{n} > {SHA256_REGIONS_MAX}", phys)
    h = hashlib.sha256()
    total = 0
    for start, length in head["regions"][:n].tolist():
        if length and not memory.in_ram(start, length):
            raise KHOFormatError("purgatory.regions", f"region {start:#x}+{length:#x} is outside RAM", phys)
        for off in range(0, length, chunk):
            h.update(memory.read(start + off, min(chunk, length - off)))
        total += length
    expected = bytes(head["digest"])
    actual = h.digest()
    return PurgatoryCheck(total, actual == expected, expected, actual)
