"""Whole-system runs above both kernels: preserved-set generators, workloads, ``simulate``.

- :mod:`~kho.simulation.preserved_sets`: generated sets of preserved units (random, runs, ...).
- :mod:`~kho.simulation.workload`: a subsystem that preserves folios and verifies them.
- :mod:`~kho.simulation.simulate`: preserve, finalize, kexec load, reboot, boot, verify.
"""
