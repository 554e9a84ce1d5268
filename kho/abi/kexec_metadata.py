"""``include/linux/kho/abi/kexec_metadata.h``: the ``kexec-metadata`` sub-node (Linux 7.3).

A plain packed struct (not an FDT) in a preserved page, registered as the KHO sub-node
``kexec-metadata`` with ``blob-size`` = 73.  The running kernel writes its own release
(``uname -r``) as ``previous_release`` and ``kexec_count`` = the count it received + 1 (0
received on a cold boot, so a cold-booted kernel hands over 1).  The next kernel
(``kho_in_kexec_metadata``) ignores the blob when it is smaller than 4 bytes, its
``version`` is not :data:`KHO_KEXEC_METADATA_VERSION`, or it is smaller than the struct.
"""

from __future__ import annotations

import numpy as np

#: ``KHO_KEXEC_METADATA_VERSION``.
KHO_KEXEC_METADATA_VERSION = 1
#: ``KHO_METADATA_NODE_NAME``: the KHO sub-node name.
KHO_METADATA_NODE_NAME = "kexec-metadata"
#: ``__NEW_UTS_LEN`` (uapi): longest release string, without its NUL.
NEW_UTS_LEN = 64

#: ``struct kho_kexec_metadata { u32 version; char previous_release[65]; u32 kexec_count; } __packed``.
KHO_KEXEC_METADATA_DTYPE = np.dtype([("version", "<u4"), ("previous_release", f"S{NEW_UTS_LEN + 1}"),
                                     ("kexec_count", "<u4")])
assert KHO_KEXEC_METADATA_DTYPE.itemsize == 73
