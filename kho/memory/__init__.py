"""The machine's physical memory, the one thing that outlives every modelled kexec.

- :mod:`~kho.memory.geometry`: page size, pfn <-> phys, the kernel's greedy split of a range.
- :mod:`~kho.memory.physical`: RAM banks, scratch areas and sparse page contents.
- :mod:`~kho.memory.contents`: deterministic generated page contents (seed, pfn).
- :mod:`~kho.memory.intervals`: sorted, disjoint ``[start, end)`` interval arrays.
"""
