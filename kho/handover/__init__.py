"""What crosses the reboot: the outgoing KHO (finalize into a handover) and the ``.kho`` file.

- :mod:`~kho.handover.outgoing`: the running kernel's KHO: preserve, sub-trees, finalize.
- :mod:`~kho.handover.imagefile`: saving and loading a handover as a ``.kho`` image file.
"""
