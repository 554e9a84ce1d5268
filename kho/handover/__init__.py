"""What crosses the reboot: the outgoing KHO (finalize into a handover) and the ``.kho`` file.

- :mod:`~kho.handover.outgoing`: the running kernel's KHO: preserve, sub-trees, finalize.
- :mod:`~kho.handover.imagefile`: saving and loading a handover as a ``.kho`` image file.
- :mod:`~kho.handover.scratch_array`: the ``struct kho_scratch`` array handed to the next kernel.
- :mod:`~kho.handover.x86_boot_params`: the x86_64 handoff, ``boot_params`` and its
  ``SETUP_KEXEC_KHO`` ``setup_data`` node.
"""
