"""The sub-nodes of a handover found in a dump, decoded with :mod:`kho.subsystems`, and every
physical range the handover references.

A sub-node's reader is chosen by the node's name as the kernel registers it
(:mod:`kho.subsystems.registry`: ``memblock``, ``LUO``, ``kho_test``, ``kexec-metadata``),
else by its blob's compatible (``memblock-v1``, ``kho-test-v1``, ``luo-v5``); other sub-nodes
stay undecoded.

:func:`referenced_ranges` lists what the next kernel will read or hand back: the KHO FDT,
the radix (or chunk) pages, the scratch array, every sub-node blob and what each decoded
sub-node points at (vmalloc chunks and their pages, LUO blocks, memfd records, the
self-test's folios, ``reserve_mem`` regions, memfd folios), each with its
:class:`~kho.subsystems.common.RangeKind` (preserved contents, structures, the FDT, the
map's pages, the scratch array).
"""

from __future__ import annotations

from kho.abi.luo import LUO_ABI_COMPATIBLE, LUO_KHO_ENTRY_NAME
from kho.abi.memblock import MEMBLOCK_KHO_FDT, MEMBLOCK_KHO_NODE_COMPATIBLE
from kho.abi.test_kho import KHO_TEST_COMPAT, KHO_TEST_FDT
from kho.subsystems.common import Range, RangeKind
from kho.subsystems.registry import SUBNODE_READERS, read_subnode

#: The sub-node name whose reader reads a blob of each compatible (for renamed nodes).
NAME_OF_COMPATIBLE = {
    MEMBLOCK_KHO_NODE_COMPATIBLE: MEMBLOCK_KHO_FDT,
    LUO_ABI_COMPATIBLE: LUO_KHO_ENTRY_NAME,
    KHO_TEST_COMPAT: KHO_TEST_FDT,
}


def decode_subnode(memory, name: str, phys: int, size: int, compatible: str | None, *, strict: bool):
    """The decoded sub-node (a :mod:`kho.subsystems` object) by its name
    (:func:`~kho.subsystems.registry.read_subnode`), else by its blob's compatible; None when
    neither is known.  KHOError / KHOFormatError from the reader pass through."""
    if name not in SUBNODE_READERS:
        name = NAME_OF_COMPATIBLE.get(compatible or "", name)
    return read_subnode(memory, name, phys, size, strict=strict)


def referenced_ranges(handover, page_size: int) -> list[Range]:
    """Every range the handover references (see the module docstring), in discovery order.
    Sub-nodes that failed to decode contribute their blob only.  O(references)."""
    out = [Range(handover.fdt_phys, handover.fdt_size, "KHO FDT", RangeKind.FDT)]
    out += [Range(int(p), page_size, f"{handover.encoding} map page", RangeKind.MAP)
            for p in handover.decoded.metadata_pages.tolist()]
    if handover.handoff is not None:
        out.append(Range(handover.handoff.scratch_addr, handover.handoff.scratch_size, "scratch array", RangeKind.SCRATCH))
    for node in handover.subnodes:
        if node.decoded is not None:
            out += node.decoded.referenced_ranges(page_size)
        elif node.phys is not None and node.data is not None:
            out.append(Range(node.phys, len(node.data), f"{node.name} blob"))
    return out

