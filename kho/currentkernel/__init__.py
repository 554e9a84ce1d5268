"""The running (current) kernel: its page allocator, scratch placement and KHO tracker.

- :mod:`~kho.currentkernel.machine`: a booted first kernel (memory, own regions, allocator).
- :mod:`~kho.currentkernel.scratch`: the kernel's own regions and scratch-area placement.
- :mod:`~kho.currentkernel.pagealloc`: the first kernel's page allocator.
- :mod:`~kho.currentkernel.xarray`: the Linux XArray (64-slot radix nodes).
- :mod:`~kho.currentkernel.tracker`: the 6.16 tracker, per-order bitmaps in XArrays.
- :mod:`~kho.currentkernel.radix_tracker`: the 7.x tracker, the live KHO radix tree.
- :mod:`~kho.currentkernel.trackerbase`: what both trackers share (page-cover queries,
  page ranges, counts).
- :mod:`~kho.currentkernel.batches`: batches of units as both trackers take them (arrays,
  duplicates, packed bitmaps).
- :mod:`~kho.currentkernel.cover`: both trackers' host-side index of preserved pages and
  their unit placement checks.
"""
