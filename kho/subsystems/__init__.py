"""The sub-nodes a Linux 7.3 kernel hands over through KHO, one module a structure.

Each module has a *writer* (the running kernel's side: it allocates pages from an
allocator with ``alloc_pages(order)`` / ``free_pages(phys, order)``, writes into a
:class:`~kho.memory.physical.PhysicalMemory` and preserves through a tracker with
``preserve_folio(phys, order)`` / ``preserve_pages(phys, nr_pages)``) and a *reader* (the
next kernel's side: it reads from anything with ``read(phys, nbytes)`` and
``page_size``, strictly by default or, with ``strict=False``, as leniently as the kernel
itself).  Readers return frozen dataclasses with ``to_json()`` and
``referenced_ranges(page_size)`` (each :class:`~kho.subsystems.common.Range` with its
:class:`~kho.subsystems.common.RangeKind`); malformed data raises :class:`~kho.errors.KHOFormatError` naming
the field and the physical address, and no loop or allocation is sized by a claimed count.

- :mod:`~kho.subsystems.vmalloc`: ``struct kho_vmalloc`` and its chunk pages;
- :mod:`~kho.subsystems.blocks`: KHO serialization blocks (``abi/block.h``);
- :mod:`~kho.subsystems.kexec_metadata`: the ``kexec-metadata`` sub-node;
- :mod:`~kho.subsystems.memblock`: the ``memblock`` sub-node (``reserve_mem=`` regions);
- :mod:`~kho.subsystems.kho_test`: the self-test's ``kho_test`` sub-node, with
  :mod:`~kho.subsystems.checksum` (the kernel's ``csum_partial``);
- :mod:`~kho.subsystems.memfd`: a preserved memfd (``memfd-v2``, reading ``memfd-v1``);
- :mod:`~kho.subsystems.luo`: the ``LUO`` sub-node (``luo-v5``: sessions, files, FLBs).
- :mod:`~kho.subsystems.registry`: the readers by sub-node name (:func:`~kho.subsystems.registry.read_subnode`).

Layouts and kernel literals: :mod:`kho.abi` (one module per kernel header).
"""
