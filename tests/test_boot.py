"""Booting the next kernel: both deserialization paths, the RAM partition, fallbacks, chained kexecs."""

import fdt
import numpy as np
import pytest
from buddy_invariants import check_free_lists
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kho.abi.kexec_handover import KHO_FDT_MEMORY_MAP_PROP_NAME
from kho.currentkernel.machine import Machine
from kho.devicetree import KHOFdt, build_boot_dtb
from kho.encodings import known_compatibles
from kho.errors import KHOError, KHOFormatError
from kho.handover.outgoing import KHO
from kho.memory.physical import Bank
from kho.nextkernel import boot
from kho.nextkernel.freelist import NORMAL, SCRATCH
from kho.nextkernel.memblock import MemblockFlag
from kho.nextkernel.memmap import FREE, PRESERVED, RESERVED

IMAGE = 1 << 20  # kernel image of both kernels in these small machines


def make_handover(encoding="instructions", seed=0, ram=64 << 20, banks=None, plan=((9, 2), (3, 20), (0, 400)),
                  page_size=4096, **options):
    """A first kernel that preserved random folios (``plan``: (order, count)) and a blob."""
    machine = Machine.boot(ram, page_size, kernel_image=IMAGE, seed=seed, banks=banks)
    kho = KHO(machine.memory, machine.allocator, encoding, **options)
    for order, count in plan:
        count = min(count, int(machine.allocator.nr_free_pages >> order) // 4)
        if count:
            kho.tracker.preserve_many(machine.allocator.alloc_many(count, order), order)
    kho.add_blob("test", b"next kernel, here is your data")
    units = kho.tracker.units_array()
    return machine, kho.finalize(), units


def pages_of(memmap, phys, order, shift):
    """Memmap indices of every page of the units."""
    idx = memmap.index(phys >> np.uint64(shift))
    return np.concatenate([np.arange(i, i + (1 << int(o))) for i, o in zip(idx, order)]) if idx.size else np.empty(0, np.int64)


def check_partition(nk, units):
    """Free, reserved and preserved pages partition RAM, exactly as the kernel's reservations say."""
    mm, shift = nk.memmap, nk.memory.page_shift
    preserved = pages_of(mm, units[0], units[1], shift)
    assert np.array_equal(np.flatnonzero(mm.state == PRESERVED), np.sort(preserved))
    res_s, res_e = nk.memblock.reserved.coverage()
    reserved = np.zeros(mm.nr_pages, bool)
    for s, e in zip(res_s.tolist(), res_e.tolist()):
        first, last = s >> shift, (e + nk.memory.page_size - 1) >> shift
        reserved[mm.index([first])[0]:mm.index([last - 1])[0] + 1] = True
    reserved[preserved] = False
    assert np.array_equal(mm.state == RESERVED, reserved)
    assert np.count_nonzero(mm.state == FREE) + reserved.sum() + preserved.size == mm.nr_pages
    check_free_lists(nk.allocator)


@st.composite
def machines(draw):
    two_banks = draw(st.booleans())
    ram = draw(st.sampled_from([48 << 20, 64 << 20]))
    banks = [Bank(0, ram // 2), Bank(ram, ram // 2, 1)] if two_banks else None
    plan = draw(st.lists(st.tuples(st.integers(0, 10), st.integers(1, 300)), min_size=1, max_size=4))
    plan.sort(reverse=True)  # big folios first, while the memory is not yet fragmented
    return dict(ram=ram, banks=banks, plan=tuple(plan), seed=draw(st.integers(0, 99)))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machines())
def test_both_paths_give_identical_free_lists_and_partition_ram(params):
    machine, handover, units = make_handover(**params)
    dtb = handover.boot_dtb()
    by_path = {path: boot(machine.memory, dtb, path, kernel_image=IMAGE) for path in ("memblock", "instructions")}
    for nk in by_path.values():
        assert nk.revived and not nk.messages
        assert np.array_equal(nk.kho.unit_phys, units[0]) and np.array_equal(nk.kho.unit_order, units[1])
        check_partition(nk, units)
    mb, ins = by_path["memblock"], by_path["instructions"]
    for kind in (NORMAL, SCRATCH):
        for a, b in zip(mb.allocator.free_lists(kind), ins.allocator.free_lists(kind)):
            assert np.array_equal(a, b)
    assert np.array_equal(mb.memmap.state, ins.memmap.state)
    assert np.array_equal(mb.memmap.info, ins.memmap.info)
    assert mb.memblock.reserve_calls == units[0].size + ins.memblock.reserve_calls
    assert len(ins.memblock.reserved) <= 5  # page 0, scratch array, image, memory maps: no unit


def test_memblock_path_reserves_units_noinit_and_keeps_early_allocations_in_scratch():
    machine, handover, units = make_handover("kho-v2")
    nk = boot(machine.memory, handover.boot_dtb(), "memblock", kernel_image=IMAGE)
    regions = nk.memblock.reserved.regions
    noinit = regions[(regions["flags"] & MemblockFlag.RSRV_NOINIT) != 0]
    covered = int(noinit["size"].sum())
    assert covered == int(np.sum(np.left_shift(4096, units[1].astype(np.int64))))
    assert nk.memblock.reserve_calls == units[0].size + 4  # + scratch array, image, one memory map, page 0
    image_phys, image_size = nk.image
    assert any(a.addr <= image_phys and image_phys + image_size <= a.end for a in machine.memory.scratch)
    flagged = {p for r in nk.memblock.memory.regions if r["flags"] & MemblockFlag.KHO_SCRATCH
               for p in range(int(r["base"]), int(r["base"] + r["size"]), 4096)}
    assert flagged == {p for a in machine.memory.scratch for p in range(a.addr, a.end, 4096)}  # neighbours merged
    check_partition(nk, units)
    report = nk.report()
    assert report["free_pages"] + report["free_scratch_pages"] + report["reserved_pages"] + report["preserved_pages"] == report["ram_pages"]
    assert report["leaked_units"] == units[0].size and set(report["timings_s"]) == {"handover", "memblock", "deserialize", "free_lists"}


@pytest.mark.parametrize("encoding,options", [("kho-v1", {"bitmap_bytes": 512}), ("kho-v1", {}), ("kho-v2", {}), ("maple", {})])
def test_memblock_path_reads_every_encoding(encoding, options):
    machine, handover, units = make_handover(encoding, **options)
    nk = boot(machine.memory, handover.boot_dtb(), "memblock", encoding_options=handover.options, kernel_image=IMAGE)
    assert nk.revived, nk.messages
    assert np.array_equal(nk.kho.unit_phys, units[0])
    check_partition(nk, units)


def test_16k_pages():
    machine, handover, units = make_handover(ram=256 << 20, plan=((2, 10), (0, 200)), page_size=16384)
    paths = [boot(machine.memory, handover.boot_dtb(), path, kernel_image=IMAGE) for path in ("memblock", "instructions")]
    for nk in paths:
        assert nk.revived and nk.allocator.max_order == 11
        check_partition(nk, units)
    assert all(np.array_equal(a, b) for a, b in zip(paths[0].allocator.free_lists(), paths[1].allocator.free_lists()))


def test_instruction_path_needs_an_instruction_stream():
    machine, handover, _ = make_handover("kho-v2")
    nk = boot(machine.memory, handover.boot_dtb(), "instructions", kernel_image=IMAGE)
    assert not nk.revived and nk.messages[0].startswith("disabling KHO revival") and "compatible" in nk.messages[0]


def rewrite_fdt(machine, handover, **props):
    fdt_obj = KHOFdt.from_dtb(machine.memory.read(handover.fdt_phys, handover.fdt_size), readable=known_compatibles())
    new = KHOFdt(fdt_obj.compatible, {**fdt_obj.props, **props}, max_size=handover.fdt_size)
    blob = new.to_dtb()
    machine.memory.write(handover.fdt_phys, blob + bytes(handover.fdt_size - len(blob)))


CORRUPTIONS = {
    "fdt header": lambda m, h: m.memory.write(h.fdt_phys, b"\xde\xad\xbe\xef"),
    "compatible": lambda m, h: m.memory.write(h.fdt_phys, m.memory.read(h.fdt_phys, h.fdt_size).replace(b"kho-", b"xyz-")),
    "memory map length": lambda m, h: rewrite_fdt(m, h, **{KHO_FDT_MEMORY_MAP_PROP_NAME: b"\x00\x10\x00\x00"}),
    "memory map zero": lambda m, h: rewrite_fdt(m, h, **{KHO_FDT_MEMORY_MAP_PROP_NAME: bytes(8)}),
    "scratch array": lambda m, h: m.memory.write(h.scratch_phys, b"\x01" * 16),
    "map pointer": lambda m, h: rewrite_fdt(m, h, **{KHO_FDT_MEMORY_MAP_PROP_NAME: (h.fdt_phys + 8).to_bytes(8, "little")}),
    "map contents": lambda m, h: m.memory.write(int(h.encoded.metadata_pages[0]), b"\xff" * 64),
}


@pytest.mark.parametrize("path", ["memblock", "instructions"])
@pytest.mark.parametrize("what", sorted(CORRUPTIONS))
def test_corrupted_handover_falls_back_without_preserved_memory(what, path):
    machine, handover, units = make_handover("instructions")
    CORRUPTIONS[what](machine, handover)
    nk = boot(machine.memory, handover.boot_dtb(), path, kernel_image=IMAGE)
    assert not nk.revived
    assert len(nk.messages) == 1 and nk.messages[0].startswith("disabling KHO revival: ")
    assert nk.memmap.count(PRESERVED) == 0 and nk.kho.unit_phys.size == 0
    with pytest.raises(KHOError) as err:
        nk.retrieve_subtree("test")
    assert err.value.errno_name == "ENOENT"
    with pytest.raises(KHOError) as err:
        nk.restore_folio(int(units[0][0]))
    assert err.value.errno_name == "ENOENT"
    check_partition(nk, (np.empty(0, np.uint64), np.empty(0, np.uint8)))
    # only the kernel's own memory, page 0 (NULL) and, once the handover was accepted, the
    # scratch array are reserved
    reserved = nk.memmap.count(RESERVED)
    assert reserved in (2 * (IMAGE >> 12) + 1, 2 * (IMAGE >> 12) + 2)


def test_boot_without_kho_properties_is_a_plain_boot():
    machine, handover, _ = make_handover()
    tree = fdt.FDT()
    tree.root.append(fdt.Node("chosen"))
    nk = boot(machine.memory, tree.to_dtb(version=17), "memblock", kernel_image=IMAGE)
    assert not nk.revived and nk.messages == ["no KHO handover in /chosen"]
    check_partition(nk, (np.empty(0, np.uint64), np.empty(0, np.uint8)))


def test_unreadable_boot_dtb_and_bad_arguments_are_refused():
    machine, handover, _ = make_handover()
    with pytest.raises(KHOFormatError):
        boot(machine.memory, b"not a devicetree", "memblock")
    with pytest.raises(KHOError) as err:
        boot(machine.memory, handover.boot_dtb(), "fast")
    assert err.value.errno_name == "EINVAL"
    with pytest.raises(KHOError) as err:  # the memory map cannot fit in the scratch areas
        boot(machine.memory, handover.boot_dtb(), "memblock", kernel_image=60 << 20)
    assert err.value.errno_name == "ENOMEM"


def test_fdt_outside_ram_disables_revival():
    machine, handover, _ = make_handover()
    dtb = build_boot_dtb(1 << 40, 4096, handover.scratch_phys, handover.scratch_size)
    nk = boot(machine.memory, dtb, "memblock", kernel_image=IMAGE)
    assert not nk.revived and "memremap" in nk.messages[0]


def test_kernel_image_where_kexec_put_it():
    machine, handover, _ = make_handover()
    area = machine.memory.scratch[0]
    nk = boot(machine.memory, handover.boot_dtb(), "instructions", kernel_image=IMAGE, image_phys=area.addr)
    assert nk.image == (area.addr, IMAGE)
    assert (nk.memmap.state[nk.memmap.index_range(area.addr >> 12, IMAGE >> 12)] == RESERVED).all()


@pytest.mark.parametrize("path", ["memblock", "instructions"])
def test_chained_kexec_preserves_again_with_the_buddy_allocator(path):
    machine, handover, units = make_handover("instructions", plan=((3, 10), (0, 50)))
    memory = machine.memory
    first = int(units[0][-1])  # not the blob
    assert first != handover.subtrees["test"]
    memory.write(first, b"generation 1")
    nk = boot(memory, handover.boot_dtb(), path, kernel_image=IMAGE, seed=3)
    kept = [(int(p), int(o)) for p, o in zip(*units)][-20:]
    for phys, order in kept:
        assert nk.restore_folio(phys) == order
    blob = nk.retrieve_subtree("test")
    assert memory.read(blob, 30) == b"next kernel, here is your data"
    kho = KHO(memory, nk.allocator, "instructions")
    for phys, order in kept:
        kho.tracker.preserve_folio(phys, order)
    fresh = nk.allocator.alloc_many(30, 1)
    kho.tracker.preserve_many(fresh, 1)
    second_units = kho.tracker.units_array()
    handover2 = kho.finalize()
    nk2 = boot(memory, handover2.boot_dtb(), path, kernel_image=IMAGE)
    assert nk2.revived
    assert np.array_equal(nk2.kho.unit_phys, second_units[0]) and np.array_equal(nk2.kho.unit_order, second_units[1])
    assert memory.read(first, 12) == b"generation 1"
    check_partition(nk2, second_units)


@pytest.mark.parametrize("path", ["memblock", "instructions"])
def test_page_zero_is_never_handed_out(path):
    """Phys 0 is NULL in every KHO structure: a next kernel that handed out page 0 let the
    workload of a later generation put it in a vmalloc chunk list, where it ended the list."""
    machine, handover, units = make_handover()
    nk = boot(machine.memory, handover.boot_dtb(), path, kernel_image=IMAGE)
    assert nk.memmap.state[0] == RESERVED
    everything = nk.allocator.alloc_many(nk.allocator.nr_free_pages, 0)
    assert 0 not in everything.tolist()


def test_a_claimed_fdt_size_beyond_a_max_order_block_is_not_read():
    machine, handover, _ = make_handover()
    dtb = build_boot_dtb(handover.fdt_phys, 1 << 40, handover.scratch_phys, handover.scratch_size)
    nk = boot(machine.memory, dtb, "memblock", kernel_image=IMAGE)
    assert not nk.revived and "larger than" in nk.messages[0]


def test_lenient_boot_accepts_double_preservation_like_linux():
    machine = Machine.boot(64 << 20, kho_scratch="4M,4M,4M", kernel_image=IMAGE, seed=1)
    kho = KHO(machine.memory, machine.allocator, "kho-v2", strict=False)
    folio = machine.allocator.alloc_pages(2)
    kho.tracker.preserve_folio(folio, 2)
    kho.tracker.preserve_folio(folio + 4096, 0)  # inside the order-2 folio: the kernel accepts it
    dtb = kho.finalize().boot_dtb()
    strict = boot(machine.memory, dtb, "memblock", kernel_image=IMAGE)
    assert not strict.revived and "overlap" in strict.messages[0]
    lenient = boot(machine.memory, dtb, "memblock", kernel_image=IMAGE, strict=False)
    assert lenient.revived and lenient.restore_folio(folio) == 2
