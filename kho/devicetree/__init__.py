"""Devicetree blobs of KHO: the KHO root FDT and the boot DTB's ``/chosen``.

* :class:`KHOFdt` — the root FDT (``compatible``, ``preserved-memory-map``, sub-nodes);
* :func:`build_boot_dtb` / :func:`parse_chosen` — ``/chosen/linux,kho-fdt`` and
  ``linux,kho-scratch``;
* :func:`parse_fdt` — the strict blob reader they share (handles ``FDT_NOP``).

Layouts: :mod:`kho.devicetree.layout`; KHO's names: :mod:`kho.abi.kexec_handover`.
"""

from kho.devicetree.chosen import ChosenKHO, build_boot_dtb, parse_chosen
from kho.devicetree.flat import parse_fdt
from kho.devicetree.khofdt import KERNEL_COMPATIBLES, KHOFdt, subtree_prop

__all__ = ["ChosenKHO", "KERNEL_COMPATIBLES", "KHOFdt", "build_boot_dtb", "parse_chosen", "parse_fdt", "subtree_prop"]
