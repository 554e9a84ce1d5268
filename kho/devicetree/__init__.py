"""Devicetree blobs of KHO: the KHO root FDT, the boot DTB's ``/chosen`` and the scratch array.

* :class:`KHOFdt` — the root FDT (``compatible``, ``preserved-memory-map``, sub-nodes);
* :func:`build_boot_dtb` / :func:`parse_chosen` — ``/chosen/linux,kho-fdt`` and
  ``linux,kho-scratch``;
* :func:`write_scratch_array` / :func:`read_scratch_array` — ``struct kho_scratch`` entries;
* :func:`parse_fdt` — the strict blob reader they share (handles ``FDT_NOP``).

Layouts and names: :mod:`kho.devicetree.layout`.
"""

from kho.devicetree.chosen import ChosenKHO, build_boot_dtb, parse_chosen, read_scratch_array, write_scratch_array
from kho.devicetree.flat import parse_fdt
from kho.devicetree.khofdt import KERNEL_COMPATIBLES, KHOFdt, subtree_prop

__all__ = [
    "ChosenKHO", "KERNEL_COMPATIBLES", "KHOFdt", "build_boot_dtb", "parse_chosen", "parse_fdt",
    "read_scratch_array", "subtree_prop", "write_scratch_array",
]
