"""The restore API after boot: kernel semantics of restore_folio / restore_pages / retrieve_subtree."""

import pytest
from buddy_invariants import check_free_lists

from kho.abi.kexec_handover import KHO_PAGE_MAGIC
from kho.currentkernel.machine import Machine
from kho.errors import KHOError
from kho.handover.outgoing import KHO
from kho.nextkernel import boot
from kho.nextkernel.memmap import ALLOCATED, PRESERVED

IMAGE = 1 << 20
PS = 4096


@pytest.fixture(params=["memblock", "instructions"])
def booted(request):
    """A next kernel after a first kernel preserved: a folio of order 3 holding a pattern,
    two order-0 folios, a 7-page range (preserve_pages) and a blob."""
    machine = Machine.boot(64 << 20, kernel_image=IMAGE, seed=5)
    memory, alloc = machine.memory, machine.allocator
    kho = KHO(memory, alloc, "instructions")
    folio = alloc.alloc_pages(3)
    memory.fill_pattern(folio, PS << 3, seed=42)
    digest = memory.digest(folio, PS << 3)
    singles = [alloc.alloc_pages(0), alloc.alloc_pages(0)]
    run = alloc.alloc_pages(3)  # 8 pages; preserve the first 7 as a range
    kho.tracker.preserve_folio(folio, 3)
    for phys in singles:
        kho.tracker.preserve_folio(phys, 0)
    kho.tracker.preserve_pages(run, 7)
    blob = kho.add_blob("state", b"\x01\x02\x03")
    handover = kho.finalize()
    nk = boot(memory, handover.boot_dtb(), request.param, kernel_image=IMAGE)
    return dict(nk=nk, memory=memory, folio=folio, digest=digest, singles=singles, run=run, blob=blob)


def errno(call, *args):
    with pytest.raises(KHOError) as err:
        call(*args)
    return err.value.errno_name


def test_restore_folio_returns_the_order_once(booted):
    nk, folio = booted["nk"], booted["folio"]
    assert nk.restore_folio(folio) == 3
    assert booted["memory"].digest(folio, PS << 3) == booted["digest"]
    idx = nk.memmap.index([folio >> 12])[0]
    assert nk.memmap.info[idx]["magic"] == 0 and (nk.memmap.state[idx:idx + 8] == ALLOCATED).all()
    assert errno(nk.restore_folio, folio) == "ENOENT"  # private was cleared


def test_restore_folio_refuses_what_is_not_a_preserved_head(booted):
    nk, folio, memory = booted["nk"], booted["folio"], booted["memory"]
    assert errno(nk.restore_folio, folio + PS) == "EINVAL"  # a tail page of the folio
    assert errno(nk.restore_folio, folio + 8) == "EINVAL"  # not page-aligned
    assert errno(nk.restore_folio, memory.ram_size + PS) == "EINVAL"  # outside RAM
    assert errno(nk.restore_folio, nk.image[0]) == "ENOENT"  # the kernel's own memory
    free = int(nk.allocator.free_lists()[0][0]) << 12
    assert errno(nk.restore_folio, free) == "ENOENT"
    assert nk.memmap.count(PRESERVED) == 8 + 2 + 7 + 1  # nothing was restored


def test_restore_folio_rejects_a_corrupted_order(booted):
    nk, phys = booted["nk"], booted["singles"][0]
    idx = nk.memmap.index([phys >> 12])[0]
    nk.memmap.info[idx] = (11, KHO_PAGE_MAGIC)
    assert errno(nk.restore_folio, phys) == "EINVAL"


def test_restore_pages_uses_the_preserve_split_all_or_nothing(booted):
    nk, run = booted["nk"], booted["run"]
    preserved = nk.memmap.count(PRESERVED)
    assert errno(nk.restore_pages, run, 8) == "EINVAL"  # the split wants one order-3 unit: order 2 was preserved
    assert errno(nk.restore_pages, run + 6 * PS, 2) == "EINVAL"  # wants order 1 at page 6: order 0 there
    assert errno(nk.restore_pages, run + 7 * PS, 1) == "ENOENT"  # page 7 was never preserved
    assert errno(nk.restore_pages, run, 0) == "EINVAL"
    assert errno(nk.restore_pages, run + 100, 1) == "EINVAL"
    assert nk.restore_folio(run + 6 * PS) == 0
    assert errno(nk.restore_pages, run, 7) == "ENOENT"  # its last unit is gone: nothing is restored
    assert nk.memmap.count(PRESERVED) == preserved - 1
    nk.restore_pages(run, 6)  # 4 + 2: the units preserve_pages(run, 7) made, less the last
    idx = nk.memmap.index([run >> 12])[0]
    assert (nk.memmap.state[idx:idx + 7] == ALLOCATED).all()
    assert nk.memmap.count(PRESERVED) == preserved - 7


def test_leaked_units_stay_reserved_until_restored_then_free_pages_returns_them(booted):
    nk = booted["nk"]
    phys, order = nk.leaked()
    assert phys.size == 1 + 2 + 3 + 1  # folio, singles, range split 4+2+1, blob
    nk.restore_folio(booted["folio"])
    for p in booted["singles"]:
        nk.restore_folio(p)
    phys, order = nk.leaked()
    assert sorted(zip(phys.tolist(), order.tolist())) == sorted(
        [(booted["run"], 2), (booted["run"] + 4 * PS, 1), (booted["run"] + 6 * PS, 0), (booted["blob"], 0)])
    report = nk.report()
    assert report["leaked_pages"] == 7 + 1 and report["preserved_pages"] == 8 + 2 + 7 + 1
    before = nk.allocator.nr_free_pages
    nk.allocator.free_pages(booted["folio"], 3)
    for p in booted["singles"]:
        nk.allocator.free_pages(p, 0)
    assert nk.allocator.nr_free_pages == before + 10
    check_free_lists(nk.allocator)
    with pytest.raises(KHOError):
        nk.allocator.free_pages(booted["run"], 2)  # still preserved: not the caller's to free


def test_retrieve_subtree(booted):
    nk, memory = booted["nk"], booted["memory"]
    phys = nk.retrieve_subtree("state")
    assert phys == booted["blob"] and memory.read(phys, 3) == b"\x01\x02\x03"
    assert nk.restore_folio(phys) == 0
    assert errno(nk.retrieve_subtree, "missing") == "ENOENT"
