"""``include/linux/kho/abi/memfd.h``: a preserved memfd (the ``data`` of a LUO file).

``struct memfd_luo_ser`` lives in a preserved page (``kho_alloc_preserve``); its
``folios`` is a ``struct kho_vmalloc`` (:mod:`kho.abi.kexec_handover`) describing an array
of ``nr_folios`` ``struct memfd_luo_folio_ser``.  ``memfd-v2`` (Linux 7.3) added ``seals``
and ``flags`` (40 -> 48 bytes); ``memfd-v1`` has neither.

``struct memfd_luo_folio_ser { u64 pfn:52; u64 flags:12; u64 index; }``: the bit-fields
share one little-endian u64, ``pfn`` in bits 0..51 and ``flags`` in bits 52..63 (here the
field ``pfn_flags``); ``index`` is the folio's offset in the file in pages.
"""

from __future__ import annotations

import numpy as np

from kho.abi.kexec_handover import KHO_VMALLOC_DTYPE

#: ``MEMFD_LUO_FH_COMPATIBLE`` of Linux 7.3, and the one before it.
MEMFD_LUO_FH_COMPATIBLE = "memfd-v2"
MEMFD_LUO_FH_COMPATIBLE_V1 = "memfd-v1"

#: ``memfd_luo_folio_ser.flags``: the folio holds user data / has been zeroed.
MEMFD_LUO_FOLIO_DIRTY = 0x1
MEMFD_LUO_FOLIO_UPTODATE = 0x2
#: Width of the ``pfn`` bit-field; ``flags`` takes the 12 bits above it.
MEMFD_LUO_PFN_BITS = 52
MEMFD_LUO_FLAGS_BITS = 12

#: ``F_SEAL_*`` (uapi/linux/fcntl.h) and ``MEMFD_LUO_ALL_SEALS``, the seals memfd-v2 carries.
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010
F_SEAL_EXEC = 0x0020
MEMFD_LUO_ALL_SEALS = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_FUTURE_WRITE | F_SEAL_EXEC

#: ``struct memfd_luo_folio_ser``: 16 bytes (see the module docstring for ``pfn_flags``).
MEMFD_LUO_FOLIO_SER_DTYPE = np.dtype([("pfn_flags", "<u8"), ("index", "<u8")])
assert MEMFD_LUO_FOLIO_SER_DTYPE.itemsize == 16

#: ``struct memfd_luo_ser`` of memfd-v2: position and size in bytes, seals, flags (0), folios.
MEMFD_LUO_SER_DTYPE = np.dtype([("pos", "<u8"), ("size", "<u8"), ("seals", "<u4"), ("flags", "<u4"),
                                ("nr_folios", "<u8"), ("folios", KHO_VMALLOC_DTYPE)])
assert MEMFD_LUO_SER_DTYPE.itemsize == 48
#: ``struct memfd_luo_ser`` of memfd-v1.
MEMFD_LUO_SER_V1_DTYPE = np.dtype([("pos", "<u8"), ("size", "<u8"), ("nr_folios", "<u8"), ("folios", KHO_VMALLOC_DTYPE)])
assert MEMFD_LUO_SER_V1_DTYPE.itemsize == 40

#: The serialized layout of each compatible.
MEMFD_LUO_SER_DTYPES = {MEMFD_LUO_FH_COMPATIBLE: MEMFD_LUO_SER_DTYPE, MEMFD_LUO_FH_COMPATIBLE_V1: MEMFD_LUO_SER_V1_DTYPE}
