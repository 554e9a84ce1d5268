"""The stateless KHO of Linux 7.1 and later: the radix tree is tracker and map, the root FDT
page is preserved and live, and handing over only places the scratch array."""

import io

import numpy as np
import pytest

from kho.currentkernel.machine import Machine
from kho.currentkernel.radix_tracker import RadixTracker
from kho.currentkernel.tracker import Tracker
from kho.devicetree import KHOFdt, parse_chosen
from kho.encodings import get_encoding
from kho.errors import KHOError
from kho.handover.imagefile import load_image, save_image
from kho.handover.outgoing import KHO, SCRATCH_ARRAY_ALIGN
from kho.handover.scratch_array import read_scratch_array
from kho.nextkernel.boot import boot

MiB = 1 << 20


def machine(seed=0):
    return Machine.boot(512 * MiB, seed=seed)


def live_fdt(m, kho):
    return KHOFdt.from_dtb(m.memory.read(kho.fdt_phys, m.memory.page_size))


@pytest.mark.parametrize("kernel, compatible", [("7.1", "kho-v2"), ("7.2", "kho-v3"), ("7.3", "kho-v4")])
def test_fdt_page_is_preserved_and_live(kernel, compatible):
    m = machine()
    kho = KHO(m.memory, m.allocator, kernel=kernel)
    assert kho.live and isinstance(kho.tracker, RadixTracker)
    assert kho.tracker.units() == [(kho.fdt_phys, 0)]  # the FDT page, preserved at boot
    fdt = live_fdt(m, kho)
    assert fdt.compatible == compatible and fdt.memory_map() == kho.tracker.root_phys
    blob = kho.add_blob("demo", b"x" * 100)
    fdt = live_fdt(m, kho)  # no finalize: the page in memory already says it
    assert fdt.retrieve_subtree("demo") == blob
    if compatible != "kho-v2":
        assert fdt.subtree_size("demo") == 100 and list(fdt.subnode_props()["demo"])[0] == "blob-size"
    kho.remove_subtree("demo")
    assert "demo" not in live_fdt(m, kho).subtrees() and kho.tracker.units() == [(kho.fdt_phys, 0)]


def test_default_kernel_is_7_3_and_old_kernels_keep_the_finalize_model():
    m = machine()
    assert KHO(m.memory, m.allocator).encoding.name == "kho-v4"
    old = KHO(m.memory, m.allocator, kernel="6.16")
    assert not old.live and isinstance(old.tracker, Tracker) and old.tracker.preserve_bits == 4096
    assert old.encoding.name == "kho-v1" and old.encoding.options() == {"bitmap_bytes": 512}
    assert KHO(m.memory, m.allocator, kernel="7.0").encoding.options() == {"bitmap_bytes": "page"}
    what_if = KHO(m.memory, m.allocator, "maple", kernel="7.3")  # another encoding on a 7.3 system
    assert not what_if.live and what_if.encoding.name == "maple"
    with pytest.raises(KHOError) as err:
        KHO(m.memory, m.allocator, kernel="5.10")
    assert err.value.errno_name == "EINVAL" and "7.3" in str(err.value)


def test_hand_over_places_the_scratch_array_and_nothing_freezes():
    m = machine()
    kho = KHO(m.memory, m.allocator)
    folios = m.allocator.alloc_many(20, 2)
    kho.tracker.preserve_many(folios, 2)
    handover = kho.finalize()
    lowmem = next(a for a in m.memory.scratch if a.kind == "lowmem")
    assert handover.scratch_phys == (lowmem.end - handover.scratch_size) // SCRATCH_ARRAY_ALIGN * SCRATCH_ARRAY_ALIGN
    assert handover.fdt_phys == kho.fdt_phys and handover.fdt_size == m.memory.page_size
    areas = read_scratch_array(m.memory, handover.scratch_phys, handover.scratch_size)
    assert [a.kind for a in areas] == ["lowmem", "node0"]
    raw = np.frombuffer(m.memory.read(handover.scratch_phys, handover.scratch_size), dtype="<u8").reshape(-1, 2)
    assert raw.tolist()[1] == [0, 0] and raw[0, 0] == lowmem.addr  # global came out empty: an empty entry
    # the map is valid at every moment: preserving after a kexec load is fine
    more = m.allocator.alloc_many(3, 0)
    kho.tracker.preserve_many(more, 0)
    again = kho.finalize()
    decoded = get_encoding("kho-v4", m.memory.page_size).decode(m.memory, again.kho_fdt().props)
    assert decoded.units() == kho.tracker.units()
    assert set(again.encoded.metadata_pages.tolist()) == set(kho.tracker.radix_pages().tolist())


def test_next_kernel_revives_a_live_handover():
    m = machine(seed=3)
    kho = KHO(m.memory, m.allocator)
    folios = np.asarray(m.allocator.alloc_many(16, 3))
    kho.tracker.preserve_many(folios, 3)
    blob = kho.add_blob("state", b"survives")
    handover = kho.finalize()
    nk = boot(m.memory, handover.boot_dtb())
    assert nk.revived, nk.messages
    assert nk.retrieve_subtree("state") == blob
    for phys in folios.tolist():
        assert nk.kho.restore_folio(phys) == 3
    assert m.memory.read(blob, 8) == b"survives"


def test_live_handover_image_round_trip():
    m = machine(seed=5)
    kho = KHO(m.memory, m.allocator)
    kho.tracker.preserve_many(m.allocator.alloc_many(40, 0), 0)
    kho.add_blob("a", b"abc")
    handover = kho.finalize()
    buf = io.BytesIO()
    save_image(buf, handover)
    image = load_image(io.BytesIO(buf.getvalue()))
    assert image.decode().units() == kho.tracker.units()
    assert parse_chosen(image.boot_dtb).fdt_phys == kho.fdt_phys
    assert image.kho_fdt().retrieve_subtree("a") == kho._fdt.retrieve_subtree("a")


def test_units_above_max_page_order_are_revived_and_restored():
    """7.x's kho_preserve_pages does not cap its split: an 8 MiB-aligned 8 MiB range is one
    order-11 unit; the next kernel reserves it through memblock and, from 7.1 on, restores it."""
    m = machine(seed=7)
    kho = KHO(m.memory, m.allocator)
    phys = next(p for p in range(64 << 20, 400 << 20, 8 << 20)
                if m.allocator.is_free(p, 8 << 20) and not m.memory.overlaps_scratch(p, 8 << 20))
    kho.tracker.preserve_pages(phys, 2048)
    assert (phys, 11) in kho.tracker.units()
    nk = boot(m.memory, kho.finalize().boot_dtb())
    assert nk.revived and phys in nk.kho.leaked()[0].tolist()
    start, end = nk.memblock.reserved.coverage()
    i = int(np.searchsorted(start, phys, side="right")) - 1
    assert i >= 0 and end[i] >= phys + (8 << 20)  # reserved through memblock, whole
    assert nk.kho.restore_folio(phys) == 11
    assert phys not in nk.kho.leaked()[0].tolist()
    fresh = Machine.boot(512 * MiB)
    old = KHO(fresh.memory, fresh.allocator, kernel="6.16")
    old.tracker.preserve_pages(phys, 2048)
    assert max(order for _, order in old.tracker.units()) == 10  # 6.16's tracker caps the split
