"""``include/linux/kho/abi/memblock.h``: the ``memblock`` sub-node (``reserve_mem=`` regions).

An FDT written by ``mm/memblock.c`` (``prepare_kho_fdt``) with libfdt's sequential-write
API into one page (``fdt_create(fdt, PAGE_SIZE)``)::

    / { compatible = "memblock-v1";
        NAME { compatible = "reserve-mem-v1"; start = <u64>; size = <u64>; }; ... };

one child per region, named after it (``reserve_mem=SIZE:ALIGN:NAME``), ``start`` and
``size`` little-endian u64 (bytes).  The regions themselves are preserved with
``kho_preserve_pages`` and the FDT page as an order-0 unit.  The next kernel revives a
region at the same address when its node has the right compatible, 8-byte ``start`` and
``size``, the size it asks for and a start aligned as it asks.
"""

from __future__ import annotations

import struct

#: ``MEMBLOCK_KHO_FDT``: the KHO sub-node name.
MEMBLOCK_KHO_FDT = "memblock"
#: ``MEMBLOCK_KHO_NODE_COMPATIBLE``: the root compatible.
MEMBLOCK_KHO_NODE_COMPATIBLE = "memblock-v1"
#: ``RESERVE_MEM_KHO_NODE_COMPATIBLE``: each region node's compatible.
RESERVE_MEM_KHO_NODE_COMPATIBLE = "reserve-mem-v1"
#: Region properties: physical start and size, bytes.
RESERVE_MEM_START_PROP = "start"
RESERVE_MEM_SIZE_PROP = "size"
#: ``phys_addr_t`` as stored in ``start`` and ``size``: little-endian u64.
RESERVE_MEM_U64 = struct.Struct("<Q")
assert RESERVE_MEM_U64.size == 8
#: ``RESERVE_MEM_NAME_SIZE`` (include/linux/memblock.h): a region name and its NUL.
RESERVE_MEM_NAME_SIZE = 16
