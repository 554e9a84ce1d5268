"""The next kernel's side: what kho_test, memfd and LUO restore, through a minimal next kernel
built from the preserved units, and what they leave behind."""

import pytest
from subsystem_helpers import machine

from kho.errors import KHOError
from kho.memory.geometry import greedy_split
from kho.subsystems.kho_test import read_kho_test, restore_kho_test, write_kho_test
from kho.subsystems.luo import OutgoingLuo, read_luo, restore_luo_files
from kho.subsystems.memfd import preserve_memfd, read_memfd, restore_memfd


class NextKernel:
    """The units a map handed over, each restorable once (``kho_restore_folio`` / ``_pages``)."""

    def __init__(self, memory, units):
        self.shift = memory.page_shift
        self.units = dict(units)

    def restore_folio(self, phys):
        if phys not in self.units:
            raise KHOError("ENOENT", f"nothing preserved at {phys:#x}")
        return self.units.pop(phys)

    def restore_pages(self, phys, nr_pages):
        split = list(greedy_split(phys >> self.shift, nr_pages))
        if any(self.units.get(pfn << self.shift) != order for pfn, order in split):
            raise KHOError("EINVAL", f"{phys:#x}+{nr_pages} pages was not preserved as one range")
        for pfn, _ in split:
            self.units.pop(pfn << self.shift)


@pytest.mark.parametrize("page_size", [4096, 16384])
def test_kho_test_restores_and_verifies(page_size):
    memory, allocator, tracker = machine(page_size, 256 << 20)
    written = write_kho_test(memory, allocator, tracker, 200 * page_size, seed=9)
    kernel = NextKernel(memory, tracker.units())
    assert restore_kho_test(kernel, memory, read_kho_test(memory, written.phys, written.size)) == written.csum
    assert kernel.units == {written.phys: 1}  # the self-test never frees its FDT folio
    with pytest.raises(KHOError) as err:
        restore_kho_test(kernel, memory, written)
    assert err.value.errno_name in ("EINVAL", "ENOENT")


def test_kho_test_checksum_mismatch_is_einval():
    memory, allocator, tracker = machine()
    written = write_kho_test(memory, allocator, tracker, 64 << 10, seed=3)
    memory.write(written.folios[-1][0] + 5, b"\x99")
    with pytest.raises(KHOError) as err:
        restore_kho_test(NextKernel(memory, tracker.units()), memory, written)
    assert err.value.errno_name == "EINVAL" and "checksum" in err.value.message


def test_memfd_restores_its_contents_and_everything_it_preserved():
    memory, allocator, tracker = machine()
    contents = bytes(range(256)) * 50
    phys = preserve_memfd(memory, allocator, tracker, contents, size=5 * 4096)
    kernel = NextKernel(memory, tracker.units())
    assert restore_memfd(kernel, memory, read_memfd(memory, phys)) == contents + bytes(5 * 4096 - len(contents))
    assert kernel.units == {}


def test_luo_files_come_back_by_session_and_token():
    memory, allocator, tracker = machine()
    luo = OutgoingLuo(memory, allocator, tracker, 3)
    luo.create_session("db")
    luo.create_session("empty")
    luo.preserve_memfd("db", 7, b"journal" * 700, seals=1)
    luo.preserve_memfd("db", 8, b"")
    luo.preserve_file("db", 9, "vfio-v1", 0x1234)
    luo.serialize()
    kernel = NextKernel(memory, tracker.units())
    files = restore_luo_files(kernel, memory, read_luo(memory, luo.phys, 32))
    assert files == {("db", 7): b"journal" * 700, ("db", 8): b"", ("db", 9): None}
    assert set(kernel.units) == {luo.phys, luo.flbs_pa}  # left to the caller
