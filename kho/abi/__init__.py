"""Every kernel ABI kho reads or writes, defined once, mirroring ``include/linux/kho/abi/``.

One module per kernel header or structure family; each layout is a numpy dtype or a
``struct.Struct`` with the kernel's field names and its size asserted, and every kernel
literal (compatible strings, property names, magics, flags) lives here only:

- :mod:`~kho.abi.kexec_handover`: the KHO root FDT names, the radix tree (kho-v2 .. kho-v4),
  ``struct kho_vmalloc``, ``struct kho_scratch`` and the page ``private`` magic.
- :mod:`~kho.abi.kho_v1`: the 6.16-6.19 chunk list (``struct khoser_mem_chunk``) and
  ``PRESERVE_BITS``.

kho's own formats (maple, instructions, ranges-packed, the ``.kho`` image) define their
layouts at the top of their own modules, not here.
"""
