"""The kernel-version table (kho.abi.versions): lookups, its internal consistency, and the
7.3 entry against what a real 7.3 kernel wrote."""

from pathlib import Path

import pytest

from kho.abi.kexec_handover import (
    KHO_FDT_COMPATIBLES,
    KHO_SUB_TREE_PROP_NAME,
    KHO_SUB_TREE_SIZE_PROP_NAME,
    KHO_V1_SUB_TREE_PROP_NAME,
    RadixGeometry,
)
from kho.abi.versions import (
    DEFAULT_KERNEL,
    KERNEL_VERSIONS,
    MAX_ORDER_CAPPED,
    MAX_ORDER_UNCAPPED_NUMA,
    SUB_NODES_NEWEST_FIRST,
    TRACKER_RADIX,
    TRACKER_XARRAY_BITMAPS,
    kernel_version,
)
from kho.errors import KHOError

FIXTURES = Path(__file__).parent / "fixtures" / "linux-7.3-x86_64"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "realkernel" / "linux-7.3-x86_64"
NAMES = ("6.16", "6.17", "6.18", "6.19", "7.0", "7.1", "7.2", "7.3")


def test_lookup_and_default():
    assert [v.version for v in KERNEL_VERSIONS] == list(NAMES)
    assert DEFAULT_KERNEL == "7.3" and kernel_version() is kernel_version("7.3")
    for name in NAMES:
        assert kernel_version(name).version == name


@pytest.mark.parametrize("bad", ["7.4", "6.15", "", "v7.3", "7.3.1", 7.3, None])
def test_unknown_version_names_the_known_ones(bad):
    with pytest.raises(KHOError) as err:
        kernel_version(bad)
    assert err.value.errno_name == "EINVAL"
    assert all(name in err.value.message for name in NAMES)


def test_table_is_consistent():
    """Compatibles only move forward; the radix tracker goes with stateless KHO, uncapped
    orders, a depth formula, a preserved FDT page and newest-first sub-nodes; the xarray
    tracker with finalize, a bitmap size, capped orders and the ``fdt`` property."""
    ranks = [KHO_FDT_COMPATIBLES.index(v.compatible) for v in KERNEL_VERSIONS]
    assert ranks == sorted(ranks) and ranks[0] == 0 and ranks[-1] == 3
    for v in KERNEL_VERSIONS:
        radix = v.tracker == TRACKER_RADIX
        assert v.tracker in (TRACKER_RADIX, TRACKER_XARRAY_BITMAPS)
        assert v.stateless == radix == (not v.finalize) == v.fdt_page_preserved
        assert (v.radix_depth_fix is not None) == radix == (v.preserve_bits is None)
        assert v.max_order_policy == (MAX_ORDER_UNCAPPED_NUMA if radix else MAX_ORDER_CAPPED)
        assert v.restore_caps_order == (not radix)
        assert (v.sub_node_order == SUB_NODES_NEWEST_FIRST) == radix
        if v.compatible == "kho-v1":
            assert v.sub_node_props == (KHO_V1_SUB_TREE_PROP_NAME,)
        elif v.compatible == "kho-v2":
            assert v.sub_node_props == (KHO_SUB_TREE_PROP_NAME,)
        else:
            assert v.sub_node_props == (KHO_SUB_TREE_SIZE_PROP_NAME, KHO_SUB_TREE_PROP_NAME)
        assert len(v.handoff) == 2 and set(v.chosen) <= set(v.__dataclass_fields__)
    assert [v.bitmap_bytes(4096) for v in KERNEL_VERSIONS[:5]] == [512, 512, 512, 4096, 4096]
    assert kernel_version("7.0").bitmap_bytes(16384) == 16384 and kernel_version("7.3").bitmap_bytes(4096) is None


def test_radix_depths_per_version():
    """16 KiB pages: 4 levels with 7.1's formula, 5 after the fix; 4 KiB: 6 and 64 KiB: 4 either way."""
    for name, depth16 in (("7.1", 4), ("7.2", 5), ("7.3", 5)):
        fix = kernel_version(name).radix_depth_fix
        assert [RadixGeometry(shift, fix).depth for shift in (12, 14, 16)] == [6, depth16, 4]


def test_73_matches_the_real_kernel():
    """The real 7.3 map holds the FDT page as an order-0 unit at its own address (0x344000)."""
    v = kernel_version("7.3")
    units = [line.split() for line in (FIXTURES / "units-0x344000.txt").read_text().splitlines() if line.strip()]
    assert v.fdt_page_preserved and ["0x344000", "0"] in units
    assert max(int(order) for _, order in units) == 10  # x86's MAX_PAGE_ORDER: nothing larger was preserved there


@pytest.mark.skipif(not (SHARED / "kho-fdt-0x344000.dtb").exists(), reason="needs ../shared/realkernel")
def test_73_fdt_layout_matches_the_real_kernel():
    """Compatible, sub-node order (newest first = added order reversed) and property order."""
    fdt = pytest.importorskip("fdt")
    tree = fdt.parse_dtb((SHARED / "kho-fdt-0x344000.dtb").read_bytes())
    v = kernel_version("7.3")
    assert tree.root.get_property("compatible").value == v.compatible
    assert [node.name for node in tree.root.nodes] == list(reversed(v.sub_nodes))
    for node in tree.root.nodes:
        assert tuple(p.name for p in node.props) == v.sub_node_props
