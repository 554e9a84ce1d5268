"""kho.handover.outgoing: the running kernel's KHO, finalize, and what the next kernel finds."""

import numpy as np
import pytest

from kho.currentkernel.machine import Machine
from kho.currentkernel.pagealloc import PageAllocator
from kho.devicetree import KHOFdt, parse_chosen
from kho.encodings import get_encoding
from kho.errors import KHOError
from kho.handover.outgoing import KHO, order_for
from kho.handover.scratch_array import read_scratch_array
from kho.memory.physical import PhysicalMemory

MiB = 1 << 20


def machine(seed=0):
    return Machine.boot(512 * MiB, seed=seed)


def errno_of(fn, *args, **kwargs):
    with pytest.raises(KHOError) as err:
        fn(*args, **kwargs)
    return err.value.errno_name


def test_order_for():
    assert [order_for(n, 4096) for n in (1, 4096, 4097, 8192, 3 * 4096, 4 << 20)] == [0, 0, 1, 1, 2, 10]


@pytest.mark.parametrize("encoding, options, prop", [
    ("kho-v2", {}, "preserved-data"), ("kho-v1", {}, "fdt"), ("kho-v1", {"bitmap_bytes": 512}, "fdt"),
])
def test_finalize_and_read_back(encoding, options, prop):
    m = machine()
    kho = KHO(m.memory, m.allocator, encoding, **options)
    folios = m.allocator.alloc_many(30, 2)
    kho.tracker.preserve_many(folios, 2)
    blob_phys = kho.add_blob("workload", b"hello kho" * 100)
    kho.add_subtree("external", 0x1234000)
    handover = kho.finalize()
    assert handover.encoding == encoding and handover.options == kho.encoding.options()
    # the kernel writes nodes + 2 entries: lowmem, global (empty here: all the kernel's memory is low), node0
    assert handover.fdt_size == 4096 and handover.scratch_size == 16 * 3

    chosen = parse_chosen(handover.boot_dtb())
    assert (chosen.fdt_phys, chosen.fdt_size, chosen.scratch_phys, chosen.scratch_size) == (
        handover.fdt_phys, handover.fdt_size, handover.scratch_phys, handover.scratch_size)
    fdt = KHOFdt.from_dtb(m.memory.read(chosen.fdt_phys, chosen.fdt_size))
    assert fdt.compatible == encoding and fdt.subtree_prop == prop
    assert fdt.retrieve_subtree("workload") == blob_phys and fdt.subtree_size("workload") == 900
    assert fdt.subtrees() == handover.subtrees == {"external": 0x1234000, "workload": blob_phys}
    areas = read_scratch_array(m.memory, chosen.scratch_phys, chosen.scratch_size)
    assert areas[0].kind == "lowmem" and areas[-1].kind == "node0"  # the kernel's order
    assert sorted(areas, key=lambda a: a.addr) == list(m.memory.scratch)
    assert m.memory.read(blob_phys, 9) == b"hello kho"

    decoded = get_encoding(encoding, 4096, **options).decode(m.memory, fdt.props)
    assert decoded.units() == kho.tracker.units()
    assert (blob_phys, 0) in decoded.units()

    keep = handover.pages_to_keep()
    assert handover.fdt_phys in keep and handover.scratch_phys in keep
    assert set(handover.encoded.metadata_pages.tolist()) <= set(keep.tolist())
    assert not kho.tracker.is_preserved_array(keep).any()  # kept pages are read, not preserved
    assert not m.memory.overlaps_scratch_array(keep, np.uint64(4096)).any()
    assert handover.kho_fdt().subtrees() == fdt.subtrees()


def test_finalized_kho_is_frozen():
    """The finalize model (6.16-style tracker): finalize freezes everything."""
    m = machine()
    kho = KHO(m.memory, m.allocator, "kho-v2")
    kho.finalize()
    assert errno_of(kho.finalize) == "EBUSY"
    assert errno_of(kho.add_subtree, "x", 0x1000) == "EBUSY"
    assert errno_of(kho.add_blob, "x", b"1") == "EBUSY"
    assert errno_of(kho.tracker.preserve_folio, int(m.allocator.alloc_pages(0)), 0) == "EBUSY"


@pytest.mark.parametrize("kernel", [None, "7.3"])
def test_subtree_errors_change_nothing(kernel):
    m = machine()
    kho = KHO(m.memory, m.allocator, "kho-v2" if kernel is None else None, kernel=kernel)
    base = len(kho.tracker)  # 7.3 preserves its FDT page from the start
    kho.add_blob("a", b"x")
    free = m.allocator.nr_free_pages
    assert errno_of(kho.add_blob, "a", b"y") == "EEXIST"
    assert errno_of(kho.add_subtree, "a", 0x1000) == "EEXIST"
    assert errno_of(kho.add_blob, "b", b"") == "EINVAL"
    assert errno_of(kho.add_blob, "b", bytes((4 << 20) + 1)) == "E2BIG"
    assert errno_of(kho.add_blob, "bad/name", b"x") == "EINVAL"
    assert m.allocator.nr_free_pages == free and len(kho.tracker) == base + 1
    assert errno_of(kho.remove_subtree, "zzz") == "ENOENT"
    kho.remove_subtree("a")  # the blob is unpreserved and freed
    assert len(kho.tracker) == base and m.allocator.nr_free_pages == free + 1


def test_fdt_page_limit_for_kernel_abis():
    m = machine()
    kho = KHO(m.memory, m.allocator, "kho-v1")
    with pytest.raises(KHOError) as err:
        for i in range(1000):
            kho.add_subtree(f"s{i}", 0x1000 * i)
    assert err.value.errno_name == "E2BIG"
    handover = kho.finalize()  # what was accepted still fits with the real map pointer
    assert handover.fdt_size == 4096 and len(handover.kho_fdt().subtrees()) == i


class FailingAllocator:
    """Wraps a PageAllocator and fails the n-th allocation with ENOMEM."""

    def __init__(self, inner, fail_at):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def alloc_pages(self, order=0):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KHOError("ENOMEM", "injected")
        return self.inner.alloc_pages(order)

    def free_pages(self, phys, order=0):
        self.inner.free_pages(phys, order)


@pytest.mark.parametrize("fail_at", [1, 3, 6, 7])
def test_enomem_in_finalize_leaves_nothing_behind(fail_at):
    m = machine()
    alloc = FailingAllocator(m.allocator, fail_at=10**9)
    kho = KHO(m.memory, alloc, "kho-v2")
    kho.tracker.preserve_many(m.allocator.alloc_many(10, 0), 0)  # a 6-node tree -> 6 allocations, then FDT, scratch
    stored, free = m.memory.nr_stored_pages, m.allocator.nr_free_pages
    alloc.fail_at, alloc.calls = fail_at, 0
    assert errno_of(kho.finalize) == "ENOMEM"
    assert m.allocator.nr_free_pages == free and m.memory.nr_stored_pages == stored
    assert not kho.tracker.finalized and kho.handover is None
    alloc.fail_at = 10**9
    assert len(get_encoding("kho-v2").decode(m.memory, kho.finalize().kho_fdt().props)) == 10


def test_no_scratch_no_handover():
    memory = PhysicalMemory.single_bank(64 * MiB)
    assert errno_of(KHO(memory, PageAllocator(memory)).finalize) == "EINVAL"


def test_unknown_encoding_and_options():
    m = machine()
    assert errno_of(KHO, m.memory, m.allocator, "nope") == "EINVAL"
    assert errno_of(KHO, m.memory, m.allocator, "kho-v2", bitmap_bytes=512) == "EINVAL"


def test_chained_handover_on_the_same_memory():
    """A second KHO on the same memory (as the next kernel would do) hands over its own map."""
    m = machine(seed=3)
    first = KHO(m.memory, m.allocator, "kho-v1")
    keep = m.allocator.alloc_many(5, 1)
    first.tracker.preserve_many(keep, 1)
    h1 = first.finalize()
    second = KHO(m.memory, m.allocator, "kho-v2")
    second.tracker.preserve_many(keep, 1)
    h2 = second.finalize()
    assert h2.fdt_phys != h1.fdt_phys
    decoded = get_encoding("kho-v2").decode(m.memory, h2.kho_fdt().props)
    assert decoded.units() == [(int(p), 1) for p in keep]
