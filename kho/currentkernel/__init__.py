"""The running (current) kernel: its page allocator, scratch placement and KHO tracker.

- :mod:`~kho.currentkernel.machine`: a booted first kernel (memory, own regions, allocator).
- :mod:`~kho.currentkernel.scratch`: the kernel's own regions and scratch-area placement.
- :mod:`~kho.currentkernel.pagealloc`: the first kernel's page allocator.
- :mod:`~kho.currentkernel.xarray`: the Linux XArray (64-slot radix nodes).
- :mod:`~kho.currentkernel.tracker`: the 6.16 tracker, per-order bitmaps in XArrays.
"""
