"""Errors raised by kho.

Every failure kho reports on purpose is a :class:`KHOError`.  It carries the name of
the errno the Linux kernel returns in the same situation (``EINVAL``, ``EBUSY``, ...),
so a test or a caller can tell *why* something was refused without parsing text.

Malformed serialized data (a chunk list, a radix node, an FDT, an image file) raises
:class:`KHOFormatError`, which also names the field that was wrong and the physical
address or file offset where it was found.
"""

from __future__ import annotations

import errno as _errno

#: errno names kho uses, each with the kernel's meaning in the KHO/kexec context.
ERRNO_NAMES = (
    "EINVAL",  # invalid argument: unaligned, out of range, malformed
    "EBUSY",  # the tracker is finalized; nothing may change
    "EEXIST",  # already preserved / sub-tree name already present
    "ENOENT",  # not preserved / sub-tree not found
    "ENOMEM",  # no memory left to allocate from
    "EADDRNOTAVAIL",  # a kexec segment does not fit where it must go
    "E2BIG",  # something does not fit in its page or area
    "EOPNOTSUPP",  # KHO is disabled (kho=off), as the kernel's KHO calls then answer
    "EACCES",  # a file or the running kernel's memory cannot be read by this user
)


class KHOError(Exception):
    """A refused operation, tagged with the kernel's errno name.

    ``errno_name`` is one of :data:`ERRNO_NAMES`; ``errno`` is its numeric value on
    this host (the names are what matter: they are the same on every Linux arch).
    """

    def __init__(self, errno_name: str, message: str):
        if errno_name not in ERRNO_NAMES:
            raise ValueError(f"unknown errno name {errno_name!r}")
        super().__init__(f"{errno_name}: {message}")
        self.errno_name = errno_name
        self.errno = getattr(_errno, errno_name)
        self.message = message


class KHOFormatError(KHOError):
    """Malformed serialized data.

    ``field`` names what was wrong (``"chunk.num_elms"``, ``"fdt.compatible"``, ...);
    ``location`` is the physical address (for data in modelled memory) or the byte
    offset (for data in a file or blob) where it was found, or ``None`` when the data
    has no address.  The errno is always ``EINVAL``, as a kernel decoder would return.
    """

    def __init__(self, field: str, message: str, location: int | None = None, *, where: str = "phys"):
        at = "" if location is None else f" at {where} {location:#x}"
        super().__init__("EINVAL", f"{field}{at}: {message}")
        self.field = field
        self.location = location
