"""What each Linux kernel version writes for KHO: the table behind ``kernel=`` / ``--kernel``.

One frozen :class:`KernelVersion` per release from the first KHO merge (6.16) to 7.3, as
established from the kernel's history; ``spec/kernel-versions.md`` gives the source of
every entry and names the entries that could not be established from the sources kho's
authors could read (those follow ``DESIGN.md`` section 7 and are listed in
:attr:`KernelVersion.chosen`).  Reading never needs this table: decoders follow the
compatible strings they find.

Units: ``preserve_bits`` in bits, :meth:`KernelVersion.bitmap_bytes` in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kho.abi.kexec_handover import (
    KHO_FDT_COMPATIBLE_V1,
    KHO_FDT_COMPATIBLE_V2,
    KHO_FDT_COMPATIBLE_V3,
    KHO_FDT_COMPATIBLE_V4,
    KHO_SUB_TREE_PROP_NAME,
    KHO_SUB_TREE_SIZE_PROP_NAME,
    KHO_V1_SUB_TREE_PROP_NAME,
)
from kho.abi.kexec_metadata import KHO_METADATA_NODE_NAME
from kho.abi.luo import LUO_KHO_ENTRY_NAME
from kho.abi.memblock import MEMBLOCK_KHO_FDT
from kho.abi.test_kho import KHO_TEST_FDT
from kho.errors import KHOError

# -- names ------------------------------------------------------------------------------------

#: ``tracker``: per-order XArrays of bitmaps, serialized to a chunk list at finalize (kho-v1).
TRACKER_XARRAY_BITMAPS = "xarray-bitmaps"
#: ``tracker``: the radix tree of page-sized nodes is the tracker and the map (kho-v2 ..).
TRACKER_RADIX = "radix"

#: ``max_order_policy``: ``kho_preserve_pages`` units never above MAX_PAGE_ORDER (kho's model
#: of 6.16 .. 7.0, whose next kernel refused to restore anything larger).
MAX_ORDER_CAPPED = "capped"
#: ``max_order_policy``: the greedy split is not capped; it is cut where the NUMA node changes.
MAX_ORDER_UNCAPPED_NUMA = "uncapped-numa"

#: ``sub_node_order``: sub-nodes appear in the FDT in the order they were added.
SUB_NODES_OLDEST_FIRST = "oldest-first"
#: ``sub_node_order``: every new sub-node is inserted before the existing ones (libfdt
#: ``fdt_add_subnode`` on the live FDT), so the newest comes first.
SUB_NODES_NEWEST_FIRST = "newest-first"

#: ``handoff``: how the first kernel tells the next one where the KHO FDT and scratch are.
HANDOFF_ARM64_CHOSEN = "arm64: /chosen linux,kho-fdt and linux,kho-scratch"
HANDOFF_X86_SETUP_DATA = "x86_64: setup_data type 10 (SETUP_KEXEC_KHO), struct kho_data"


@dataclass(frozen=True)
class KernelVersion:
    """What one kernel release writes.  See ``spec/kernel-versions.md`` for the sources.

    ``preserve_bits``: ``PRESERVE_BITS`` of the xarray tracker (4096, or ``"page"`` for
    ``PAGE_SIZE * 8``), None for the radix tracker.  ``radix_depth_fix``: which
    ``KHO_TREE_MAX_DEPTH`` formula (:class:`~kho.abi.kexec_handover.RadixGeometry`
    ``depth_fix``), None without a radix tree.  ``sub_nodes``: the sub-nodes that kernel's
    own subsystems add (each only when in use), in the order a booting kernel adds them.
    ``sub_node_props``: the properties of one sub-node in FDT order.  ``restore_caps_order``:
    the next kernel's ``kho_restore_folio``/``kho_restore_pages`` refuse a unit above
    MAX_PAGE_ORDER.  ``chosen``: names of the fields that follow ``DESIGN.md`` or an
    inference rather than a source read for that release.
    """

    version: str
    compatible: str
    tracker: str
    preserve_bits: int | str | None
    finalize: bool
    radix_depth_fix: bool | None
    max_order_policy: str
    restore_caps_order: bool
    sub_nodes: tuple[str, ...]
    sub_node_props: tuple[str, ...]
    sub_node_order: str
    fdt_page_preserved: bool
    handoff: tuple[str, ...]
    source: str
    chosen: tuple[str, ...] = ()

    @property
    def stateless(self) -> bool:
        """True when there is no finalize step: the map is valid at every moment."""
        return not self.finalize

    def bitmap_bytes(self, page_size: int) -> int | None:
        """Bytes of one tracker bitmap (512, or ``page_size``); None for the radix tracker."""
        if self.preserve_bits is None:
            return None
        return page_size if self.preserve_bits == "page" else self.preserve_bits // 8


_HANDOFF = (HANDOFF_ARM64_CHOSEN, HANDOFF_X86_SETUP_DATA)
_OLD_SRC = "kernel/kexec_handover.c"
_NEW_SRC = "kernel/liveupdate/kexec_handover.c"


def _v1(version: str, preserve_bits: int | str, sub_nodes: tuple[str, ...], source: str, chosen: tuple[str, ...]) -> KernelVersion:
    """A kho-v1 release: xarray tracker, finalize, capped orders (6.16 .. 7.0)."""
    return KernelVersion(version, KHO_FDT_COMPATIBLE_V1, TRACKER_XARRAY_BITMAPS, preserve_bits, True, None,
                         MAX_ORDER_CAPPED, True, sub_nodes, (KHO_V1_SUB_TREE_PROP_NAME,), SUB_NODES_OLDEST_FIRST,
                         False, _HANDOFF, source, chosen + ("sub_node_order", "fdt_page_preserved", "handoff"))


_V1_NODES = (MEMBLOCK_KHO_FDT,)
_TEST_NODES = (MEMBLOCK_KHO_FDT, KHO_TEST_FDT)
_LUO_NODES = (MEMBLOCK_KHO_FDT, KHO_TEST_FDT, LUO_KHO_ENTRY_NAME)
#: 7.3's FDT (newest first) holds memblock, LUO, kho_test, kexec-metadata: added in reverse.
_META_NODES = (KHO_METADATA_NODE_NAME, KHO_TEST_FDT, LUO_KHO_ENTRY_NAME, MEMBLOCK_KHO_FDT)
_V3_PROPS = (KHO_SUB_TREE_SIZE_PROP_NAME, KHO_SUB_TREE_PROP_NAME)

#: Every release kho knows, oldest first.
KERNEL_VERSIONS: tuple[KernelVersion, ...] = (
    _v1("6.16", 4096, _V1_NODES, _OLD_SRC, ()),
    _v1("6.17", 4096, _TEST_NODES, _OLD_SRC, ("sub_nodes",)),
    _v1("6.18", 4096, _TEST_NODES, _OLD_SRC, ("sub_nodes",)),
    _v1("6.19", "page", _LUO_NODES, _NEW_SRC, ("preserve_bits",)),
    _v1("7.0", "page", _LUO_NODES, _NEW_SRC, ("preserve_bits",)),
    KernelVersion("7.1", KHO_FDT_COMPATIBLE_V2, TRACKER_RADIX, None, False, False, MAX_ORDER_UNCAPPED_NUMA, False,
                  _LUO_NODES, (KHO_SUB_TREE_PROP_NAME,), SUB_NODES_NEWEST_FIRST, True, _HANDOFF, _NEW_SRC,
                  ("sub_nodes", "fdt_page_preserved", "handoff")),
    KernelVersion("7.2", KHO_FDT_COMPATIBLE_V3, TRACKER_RADIX, None, False, True, MAX_ORDER_UNCAPPED_NUMA, False,
                  _META_NODES, _V3_PROPS, SUB_NODES_NEWEST_FIRST, True, _HANDOFF, _NEW_SRC,
                  ("compatible", "radix_depth_fix", "sub_nodes", "fdt_page_preserved", "handoff")),
    KernelVersion("7.3", KHO_FDT_COMPATIBLE_V4, TRACKER_RADIX, None, False, True, MAX_ORDER_UNCAPPED_NUMA, False,
                  _META_NODES, _V3_PROPS, SUB_NODES_NEWEST_FIRST, True, _HANDOFF, _NEW_SRC,
                  ("radix_depth_fix",)),
)

#: The version kho writes for unless told otherwise.
DEFAULT_KERNEL = "7.3"

_BY_NAME = {v.version: v for v in KERNEL_VERSIONS}


def kernel_version(version: str = DEFAULT_KERNEL) -> KernelVersion:
    """The table entry of ``version`` (``"6.16"`` .. ``"7.3"``); EINVAL naming the known ones.  O(1)."""
    entry = _BY_NAME.get(version) if isinstance(version, str) else None
    if entry is None:
        known = ", ".join(_BY_NAME)
        raise KHOError("EINVAL", f"unknown kernel version {version!r}: kho knows {known}")
    return entry
