"""The ``kexec-metadata`` sub-node (``include/linux/kho/abi/kexec_metadata.h``, Linux 7.3).

Writer (``kho_out_kexec_metadata``): a zeroed preserved page holding ``struct
kho_kexec_metadata`` with ``version`` 1, the running kernel's release as
``previous_release`` and ``kexec_count`` = the count it received + 1 (it receives 0 on a
cold boot); ``blob-size`` 73.  Reader (``kho_in_kexec_metadata``): both modes refuse what
the kernel ignores (a blob under 4 bytes, another version, a blob under 73 bytes); strict
also wants ``blob-size`` exactly 73, a page-aligned blob and a NUL-terminated printable
release.  O(1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kho.abi.kexec_metadata import (
    KHO_KEXEC_METADATA_DTYPE,
    KHO_KEXEC_METADATA_VERSION,
    KHO_METADATA_NODE_NAME,
    NEW_UTS_LEN,
)
from kho.errors import KHOError, KHOFormatError
from kho.subsystems.common import (
    Blob,
    Range,
    alloc_preserve,
    c_string,
    encode_c_string,
    read_checked,
)

#: Bytes of the ``version`` field the kernel reads first.
_VERSION_BYTES = KHO_KEXEC_METADATA_DTYPE["version"].itemsize
_U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class KexecMetadata:
    """A decoded ``struct kho_kexec_metadata`` found at ``phys``."""

    phys: int
    version: int
    previous_release: str
    kexec_count: int

    def referenced_ranges(self, page_size: int) -> list[Range]:
        """The struct (``page_size`` unused: every reader takes it)."""
        return [Range(self.phys, KHO_KEXEC_METADATA_DTYPE.itemsize, KHO_METADATA_NODE_NAME)]

    def to_json(self) -> dict:
        return {"version": self.version, "previous_release": self.previous_release, "kexec_count": self.kexec_count}


def pack_kexec_metadata(release: str, kexec_count: int) -> bytes:
    """The 73 bytes of a version-1 struct.  EINVAL for a release of more than 64
    printable ASCII characters or a count outside u32."""
    if not 0 <= kexec_count <= _U32_MAX:
        raise KHOError("EINVAL", f"kexec_count {kexec_count} is not a u32")
    rec = np.zeros(1, dtype=KHO_KEXEC_METADATA_DTYPE)
    rec["version"] = KHO_KEXEC_METADATA_VERSION
    rec["previous_release"] = encode_c_string(release, NEW_UTS_LEN + 1, "release")
    rec["kexec_count"] = kexec_count
    return rec.tobytes()


def write_kexec_metadata(memory, allocator, tracker, release: str, received_count: int = 0) -> Blob:
    """``kho_out_kexec_metadata`` of a kernel whose ``uname -r`` is ``release`` and which
    received ``received_count`` (0 on a cold boot).  Returns the blob to add as the
    ``kexec-metadata`` sub-node."""
    data = pack_kexec_metadata(release, received_count + 1)
    phys = alloc_preserve(memory, allocator, tracker, len(data))
    memory.write(phys, data)
    return Blob(KHO_METADATA_NODE_NAME, phys, len(data))


def read_kexec_metadata(memory, phys: int, size: int, *, strict: bool = True) -> KexecMetadata:
    """Decode the blob of ``size`` bytes (the sub-node's ``blob-size``) at ``phys``."""
    field = KHO_METADATA_NODE_NAME
    need = KHO_KEXEC_METADATA_DTYPE.itemsize
    if size < _VERSION_BYTES:
        raise KHOFormatError(f"{field}.blob-size", f"{size} bytes cannot hold a version", phys)
    if strict and (size != need or phys % memory.page_size):
        raise KHOFormatError(f"{field}.blob-size", f"a {size}-byte blob at a {'' if phys % memory.page_size else 'page-'}"
                             f"aligned address; the kernel writes {need} bytes at the start of a page", phys)
    version = int.from_bytes(read_checked(memory, phys, _VERSION_BYTES, f"{field}.version"), "little")
    if version != KHO_KEXEC_METADATA_VERSION:
        raise KHOFormatError(f"{field}.version", f"version {version}, not {KHO_KEXEC_METADATA_VERSION}", phys)
    if size < need:
        raise KHOFormatError(f"{field}.blob-size", f"{size} bytes is smaller than the {need}-byte version {version}", phys)
    rec = np.frombuffer(read_checked(memory, phys, need, field), dtype=KHO_KEXEC_METADATA_DTYPE)[0]
    offset = KHO_KEXEC_METADATA_DTYPE.fields["previous_release"][1]
    raw = memory.read(phys + offset, NEW_UTS_LEN + 1)
    release = c_string(raw, f"{field}.previous_release", phys + offset, strict=strict)
    return KexecMetadata(phys, version, release, int(rec["kexec_count"]))
