"""kho: a model of Linux Kexec HandOver (KHO), and a reader and checker of real handovers.

The stable public API (documented in README.md, "Python API"); everything else is reachable
through its module path (:mod:`kho.abi`, :mod:`kho.encodings`, :mod:`kho.nextkernel`, ...):

- :class:`Machine`: a booted first kernel (RAM, its own regions, scratch areas, allocator).
- :class:`PhysicalMemory`, :class:`Bank`, :class:`ScratchArea`: the memory that survives kexec.
- :class:`Tracker` (6.16's per-order bitmaps in :class:`XArray`\\ s): what is preserved.
- :class:`KHO`: the running kernel's KHO; ``finalize()`` gives a :class:`Handover`.
- :func:`save_image` / :func:`load_image`: the ``.kho`` handover file.
- :func:`get_encoding`: a preservation-map encoding by name (``kho-v1``, ``kho-v2``, ...).
- :func:`boot`: the next kernel booting on a handover.
- :func:`open_dump`: a real kernel's handover in a memory dump (raw, zstd, ELF core), a
  debugfs ``kho/out`` / ``kho/in`` directory or a ``.kho`` image.
- :class:`KHOError` / :class:`KHOFormatError`: every error kho raises.
"""

from kho.currentkernel.machine import Machine
from kho.currentkernel.tracker import Tracker
from kho.currentkernel.xarray import XArray
from kho.dumps import open_dump
from kho.encodings import get_encoding
from kho.errors import KHOError, KHOFormatError
from kho.handover.imagefile import load_image, save_image
from kho.handover.outgoing import KHO, Handover
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea
from kho.nextkernel.boot import boot
from kho.version import __version__

__all__ = [
    "KHO", "Bank", "Handover", "KHOError", "KHOFormatError", "Machine", "PhysicalMemory", "ScratchArea", "Tracker",
    "XArray", "__version__", "boot", "get_encoding", "load_image", "open_dump", "save_image",
]
