"""Every kernel ABI kho reads or writes, defined once, mirroring ``include/linux/kho/abi/``.

One module per kernel header or structure family; each layout is a numpy dtype or a
``struct.Struct`` with the kernel's field names and its size asserted, and every kernel
literal (compatible strings, property names, magics, flags) lives here only:

- :mod:`~kho.abi.kexec_handover`: the KHO root FDT names, the radix tree (kho-v2 .. kho-v4),
  ``struct kho_vmalloc``, ``struct kho_scratch`` and the page ``private`` magic.
- :mod:`~kho.abi.kho_v1`: the 6.16-6.19 chunk list (``struct khoser_mem_chunk``) and
  ``PRESERVE_BITS``.
- :mod:`~kho.abi.block`: KHO serialization blocks (``struct kho_block_header_ser``, 10,000-block cap).
- :mod:`~kho.abi.kexec_metadata`: ``struct kho_kexec_metadata`` (the ``kexec-metadata`` sub-node).
- :mod:`~kho.abi.memblock`: the ``memblock`` sub-node's compatibles and properties (``reserve_mem=``).
- :mod:`~kho.abi.luo`: the Live Update Orchestrator, ``luo-v5`` (``struct luo_ser``, sessions, files, FLBs).
- :mod:`~kho.abi.memfd`: a preserved memfd, ``memfd-v2`` and ``memfd-v1`` (``struct memfd_luo_ser``).
- :mod:`~kho.abi.test_kho`: the KHO self-test's ``kho_test`` sub-node (``lib/test_kho.c``).

kho's own formats (maple, instructions, ranges-packed, the ``.kho`` image) define their
layouts at the top of their own modules, not here.
"""
