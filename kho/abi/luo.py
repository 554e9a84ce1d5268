"""``include/linux/kho/abi/luo.h``: the Live Update Orchestrator state, ``luo-v5`` (Linux 7.3).

The KHO sub-node ``LUO`` is a raw ``struct luo_ser`` (32 bytes, ``blob-size`` 32) in a
preserved page.  ``sessions_pa`` is the first block of a KHO block set
(:mod:`kho.abi.block`) of ``struct luo_session_ser``; it stays 0 until the sessions are
serialized at reboot.  Each session's ``file_set_ser.files`` is the first block of a block
set of ``struct luo_file_ser`` and ``file_set_ser.count`` their number.  ``flbs_pa`` is
one preserved page: ``struct luo_flb_header_ser`` then ``count`` ``struct luo_flb_ser``.
Strings are NUL-padded char arrays.  All values little-endian, pointers are physical
addresses in bytes.
"""

from __future__ import annotations

import numpy as np

#: ``LUO_KHO_ENTRY_NAME``: the KHO sub-node name.
LUO_KHO_ENTRY_NAME = "LUO"
#: ``LUO_ABI_COMPATIBLE`` and ``LUO_ABI_COMPAT_LEN`` (``ALIGN(sizeof("luo-v5"), 8)``).
LUO_ABI_COMPATIBLE = "luo-v5"
LUO_ABI_COMPAT_LEN = 8
#: ``LIVEUPDATE_SESSION_NAME_LENGTH`` (uapi/linux/liveupdate.h), with the NUL.
LIVEUPDATE_SESSION_NAME_LENGTH = 64
#: ``LIVEUPDATE_HNDL_COMPAT_LENGTH``: a file handler's compatible, with the NUL.
LIVEUPDATE_HNDL_COMPAT_LENGTH = 48
#: ``LIVEUPDATE_FLB_COMPAT_LENGTH``: an FLB's compatible, with the NUL.
LIVEUPDATE_FLB_COMPAT_LENGTH = 48
#: ``LUO_FLB_PGCNT`` (kernel/liveupdate/luo_flb.c): pages of the FLB area.
LUO_FLB_PGCNT = 1

#: ``struct luo_ser``: compatible, live-update number, first session block, FLB header.
LUO_SER_DTYPE = np.dtype([("compatible", f"S{LUO_ABI_COMPAT_LEN}"), ("liveupdate_num", "<u8"),
                          ("sessions_pa", "<u8"), ("flbs_pa", "<u8")])
assert LUO_SER_DTYPE.itemsize == 32
#: ``struct luo_file_ser``: handler compatible, the handler's opaque data, the user's token.
LUO_FILE_SER_DTYPE = np.dtype([("compatible", f"S{LIVEUPDATE_HNDL_COMPAT_LENGTH}"), ("data", "<u8"), ("token", "<u8")])
assert LUO_FILE_SER_DTYPE.itemsize == 64
#: ``struct luo_file_set_ser``: first block of the files, number of files.
LUO_FILE_SET_SER_DTYPE = np.dtype([("files", "<u8"), ("count", "<u8")])
assert LUO_FILE_SET_SER_DTYPE.itemsize == 16
#: ``struct luo_session_ser``: name and file set.
LUO_SESSION_SER_DTYPE = np.dtype([("name", f"S{LIVEUPDATE_SESSION_NAME_LENGTH}"), ("file_set_ser", LUO_FILE_SET_SER_DTYPE)])
assert LUO_SESSION_SER_DTYPE.itemsize == 80
#: ``struct luo_flb_header_ser``: pages of the FLB area, number of FLB entries.
LUO_FLB_HEADER_SER_DTYPE = np.dtype([("pgcnt", "<u8"), ("count", "<u8")])
assert LUO_FLB_HEADER_SER_DTYPE.itemsize == 16
#: ``struct luo_flb_ser``: FLB compatible, its opaque data, the files depending on it.
LUO_FLB_SER_DTYPE = np.dtype([("name", f"S{LIVEUPDATE_FLB_COMPAT_LENGTH}"), ("data", "<u8"), ("count", "<u8")])
assert LUO_FLB_SER_DTYPE.itemsize == 64


def luo_flb_max(page_size: int) -> int:
    """``LUO_FLB_MAX``: FLB entries the FLB area holds (63 with 4 KiB pages).  O(1)."""
    return (LUO_FLB_PGCNT * page_size - LUO_FLB_HEADER_SER_DTYPE.itemsize) // LUO_FLB_SER_DTYPE.itemsize
