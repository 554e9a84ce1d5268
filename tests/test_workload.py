"""The KHO self-test-like workload: create, hand over, restore and verify, detect corruption."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho.abi.kexec_handover import KHO_VMALLOC_DTYPE
from kho.currentkernel.machine import Machine
from kho.encodings import get_encoding
from kho.errors import KHOError
from kho.handover.outgoing import KHO
from kho.memory.geometry import greedy_split
from kho.simulation import workload as W

MIB = 1 << 20


class Restorer:
    """A minimal next kernel: the units the map hands over, restorable once each."""

    def __init__(self, handover):
        self.memory = handover.memory
        self.fdt = handover.kho_fdt()
        decoded = get_encoding(handover.encoding, self.memory.page_size, **handover.options).decode(self.memory, self.fdt.props)
        self.units = dict(zip(decoded.phys.tolist(), decoded.order.tolist()))
        self.restored = {}

    def retrieve_subtree(self, name):
        return self.fdt.retrieve_subtree(name)

    def restore_folio(self, phys):
        if phys not in self.units:
            raise KHOError("ENOENT", f"nothing preserved at {phys:#x}")
        order = self.units.pop(phys)
        self.restored[phys] = order
        return order

    def restore_pages(self, phys, n):
        for pfn, order in greedy_split(phys >> 12, n, 10):
            if self.units.get(pfn << 12) != order:
                raise KHOError("EINVAL", "split mismatch")
        for pfn, _ in greedy_split(phys >> 12, n, 10):
            self.restore_folio(pfn << 12)


def handed_over(size=16 * MIB, pattern="selftest", seed=1, abi="kho-v2"):
    machine = Machine.boot(512 * MIB, seed=seed)
    kho = KHO(machine.memory, machine.allocator, abi)
    work = W.create(kho, machine.allocator, size, pattern, seed)
    return machine, kho, work, kho.finalize()


@pytest.mark.parametrize("abi", ["kho-v1", "kho-v2"])
def test_round_trip_restores_everything(abi):
    machine, kho, work, handover = handed_over(abi=abi)
    assert work.preserved_pages == kho.tracker.nr_pages
    assert work.nr_folios > 1 and len(set(work.folio_order.tolist())) > 1
    next_kernel = Restorer(handover)
    report = W.verify(next_kernel, machine.memory, work)
    assert report.ok, report.failures
    assert report.folios == work.nr_folios and report.folio_bytes == work.folio_bytes
    assert report.vmalloc_pages == work.table.total_pages + work.data.total_pages
    assert next_kernel.units == {}, "every preserved unit is restored (nothing leaked)"


def test_sub_fdt_is_the_kernel_self_test_shape():
    machine, kho, work, handover = handed_over()
    from kho.devicetree.flat import parse_fdt, prop_bytes

    blob = machine.memory.read(work.blob_phys, work.blob_size)
    tree = parse_fdt(blob)
    assert prop_bytes(tree.get_property("compatible")) == b"kho-test-v1\0"
    assert prop_bytes(tree.get_property("magic")) == (0x4B484F21).to_bytes(4, "little")
    assert int.from_bytes(prop_bytes(tree.get_property("nr_folios", "/data")), "little") == work.nr_folios
    desc = np.frombuffer(prop_bytes(tree.get_property("folios_info", "/data")), dtype=KHO_VMALLOC_DTYPE)[0]
    assert desc["total_pages"] == work.table.total_pages and desc["first"] == work.table.chunks[0]


@pytest.mark.parametrize("target", ["folio", "vmalloc", "table"])
def test_corruption_is_detected(target):
    machine, kho, work, handover = handed_over()
    memory = machine.memory
    if target == "folio":
        phys = int(work.folio_phys[len(work.folio_phys) // 2])
        memory.write(phys + 100, b"\x5a")
    elif target == "vmalloc":
        memory.write(work.data.blocks[0] + 7, b"\x00\x01")
    else:  # the first record's digest in the folio table
        memory.write(work.table.blocks[0] + 8, b"\xff" * 4)
    report = W.verify(Restorer(handover), memory, work)
    assert not report.ok
    assert any("mismatch" in f for f in report.failures)


def test_missing_subtree_is_a_failure_not_an_exception():
    machine, kho, work, handover = handed_over()
    restorer = Restorer(handover)
    restorer.fdt.remove_subtree(W.KHO_TEST_FDT)
    report = W.verify(restorer, machine.memory)
    assert not report.ok and "kho_test" in report.failures[0]


def test_chunk_list_spans_several_pages():
    machine, kho, work, handover = handed_over(size=40 * MIB, pattern="random")
    assert work.table.total_pages == 57  # 9,600 records of 24 bytes
    assert work.data.total_pages == 640 and len(work.data.chunks) == 2  # 640 pages > 511 a chunk
    assert W.verify(Restorer(handover), machine.memory, work).ok


def test_release_gives_pages_back():
    machine, kho, work, handover = handed_over()
    restorer = Restorer(handover)
    report = W.verify(restorer, machine.memory, work)
    free = machine.allocator.nr_free_pages
    assert W.release(machine.allocator, report) == work.preserved_pages
    assert machine.allocator.nr_free_pages == free + work.preserved_pages


def test_selftest_draw_is_all_or_nothing():
    machine = Machine.boot(512 * MIB, seed=2)
    alloc = machine.allocator
    free = alloc.nr_free_pages
    with pytest.raises(KHOError):
        W.selftest_folios(alloc, free + 1, np.random.default_rng(0))
    assert alloc.nr_free_pages == free
    phys, order = W.selftest_folios(alloc, 5000, np.random.default_rng(0))
    assert int(np.sum(np.left_shift(1, order.astype(np.int64)))) == 5000
    assert (phys % (4096 << order.astype(np.uint64)) == 0).all()


@pytest.mark.parametrize("size, pattern, errno", [(4096, "selftest", "EINVAL"), (MIB, "zigzag", "EINVAL"),
                                                  (1 << 30, "selftest", "ENOMEM")])
def test_bad_workloads(size, pattern, errno):
    machine = Machine.boot(512 * MIB)
    with pytest.raises(KHOError) as info:
        W.create(KHO(machine.memory, machine.allocator), machine.allocator, size, pattern)
    assert info.value.errno_name == errno


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(W.WORKLOAD_PATTERNS), st.integers(2, 2048), st.integers(0, 1000))
def test_every_pattern_round_trips(pattern, pages, seed):
    machine, kho, work, handover = handed_over(pages * 4096, pattern, seed)
    restorer = Restorer(handover)
    assert W.verify(restorer, machine.memory, work).ok
    assert restorer.units == {}
