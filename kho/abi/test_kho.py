"""``lib/test_kho.c``: the KHO self-test's ``kho_test`` sub-node, as Linux 7.3 writes it.

The self-test allocates folios of random orders (0 .. MAX_PAGE_ORDER) until ``max_mem``
bytes, fills them with random bytes, checksums them with ``csum_partial`` (a 32-bit
``__wsum``, chained folio by folio from 0), and preserves them.  It records each folio as
the u64 ``phys | order`` in a vmalloc'ed array preserved with ``kho_preserve_vmalloc``,
and describes everything in an FDT written with libfdt's sequential-write API into a
folio of ``get_order(nr_folios * 8 + PAGE_SIZE)`` (the FDT buffer is ``nr_folios * 8 +
PAGE_SIZE`` bytes)::

    / { compatible = "kho-test-v1"; magic = <u32 0x4b484f21>;
        data { nr_folios = <u32>; folios_info = <struct kho_vmalloc>; csum = <u32>; }; };

``magic``, ``nr_folios`` and ``csum`` are native-endian (little-endian) u32, not the
big-endian cells devicetrees usually hold.
"""

from __future__ import annotations

#: ``KHO_TEST_FDT``: the KHO sub-node name.
KHO_TEST_FDT = "kho_test"
#: ``KHO_TEST_COMPAT``: the root compatible (stored with its NUL, 12 bytes).
KHO_TEST_COMPAT = "kho-test-v1"
#: ``KHO_TEST_MAGIC``: 'KHO!'.
KHO_TEST_MAGIC = 0x4B484F21
#: Node and property names.
KHO_TEST_DATA_NODE = "data"
KHO_TEST_MAGIC_PROP = "magic"
KHO_TEST_NR_FOLIOS_PROP = "nr_folios"
KHO_TEST_FOLIOS_INFO_PROP = "folios_info"
KHO_TEST_CSUM_PROP = "csum"
#: Bytes of the ``nr_folios``, ``magic`` and ``csum`` values (``unsigned int`` / ``__wsum``).
KHO_TEST_U32_BYTES = 4
#: Bytes of one ``folios_info`` record (``phys_addr_t``: ``phys | order``).
KHO_TEST_RECORD_BYTES = 8


def kho_test_default_max_mem(page_size: int, max_page_order: int) -> int:
    """The module parameter ``max_mem``'s default: ``(PAGE_SIZE << MAX_PAGE_ORDER) * 2`` bytes.  O(1)."""
    return (page_size << max_page_order) * 2


def kho_test_fdt_buffer_size(nr_folios: int, page_size: int) -> int:
    """Bytes the self-test gives ``fdt_create``: ``nr_folios * sizeof(phys_addr_t) + PAGE_SIZE``.  O(1)."""
    return nr_folios * KHO_TEST_RECORD_BYTES + page_size
