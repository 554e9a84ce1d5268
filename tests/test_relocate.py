"""Relocation: every page copied by following the list in memory, nothing written outside
the destinations, the kernel's invariants and the transitional tables checked; purgatory."""

import numpy as np
import pytest

from kho.currentkernel.machine import Machine
from kho.errors import KHOError, KHOFormatError
from kho.kexec import entries as ent
from kho.kexec import kimage as K
from kho.kexec import purgatory as P
from kho.kexec import relocate as R
from kho.kexec import transpgd as T

PS = 4096


def loaded(mode, seed=0, sizes=(300 * PS + 7, 900 * PS, 100)):
    machine = Machine.boot(256 << 20, seed=seed)
    memory, alloc = machine.memory, machine.allocator
    rng = np.random.default_rng(seed)
    allowed = K.scratch_pages(memory)
    segs = K.place_segments(memory, [K.SegmentRequest(f"s{i}", rng.bytes(n)) for i, n in enumerate(sizes)], allowed)
    segs += K.place_segments(memory, [K.SegmentRequest("purgatory", P.build(segs))],
                             allowed.subtract(K.destination_ranges(segs, 12)))
    image = K.load(memory, alloc, segs, in_place=mode == "reserved", allowed=allowed)
    trans = None
    if mode == "mmu-on":
        trans = T.build(memory, lambda n: K.alloc_safe_pages(alloc, n, image.destinations, 12), "page", image.control_page)
    return machine, segs, image, trans


@pytest.mark.parametrize("mode", R.RELOCATION_MODES)
def test_relocation_puts_every_segment_in_place(mode):
    machine, segs, image, trans = loaded(mode)
    memory = machine.memory
    if mode != "reserved":  # before the reboot, destinations do not hold the image yet
        assert memory.read(segs[0].mem, segs[0].bufsz) != segs[0].buf
    result = R.relocate(image, mode, trans)
    for s in segs:
        assert memory.read(s.mem, s.memsz) == s.buf + bytes(s.memsz - s.bufsz)
    check = P.verify(memory, segs[-1].mem)
    assert check.ok and check.bytes_hashed == sum(s.memsz for s in segs[:-1])
    if mode == "reserved":
        assert result.pages_copied == 0
    else:
        assert result.pages_copied == image.nr_pages == result.pages_written
        assert result.bytes_copied == image.nr_pages * PS
        assert result.indirection_pages == image.indirection_pages.size
    assert (result.tables_read > 0) == (mode == "mmu-on")


def test_write_outside_destinations_is_detected():
    machine, segs, image, _ = loaded("mmu-off")
    memory = machine.memory
    # Redirect the first segment's DESTINATION entry to free memory outside every segment.
    first = int(image.indirection_pages[0])
    elsewhere = machine.allocator.alloc_many(4, 2)[0]
    memory.write_u64(first, int(elsewhere) | ent.IND_DESTINATION)
    with pytest.raises(KHOError, match="outside the destinations"):
        R.relocate(image, "mmu-off")


def test_source_that_is_another_destination_breaks_the_invariant():
    machine, segs, image, _ = loaded("mmu-off")
    memory = machine.memory
    first = int(image.indirection_pages[0])
    memory.write_u64(first + 8, segs[1].mem | ent.IND_SOURCE)  # first source := a page of segment 1
    with pytest.raises(KHOError, match="invariant"):
        R.relocate(image, "mmu-off")


def test_overwritten_control_page_is_detected():
    machine, segs, image, _ = loaded("mmu-off")
    machine.memory.write(image.control_page, b"\0" * 16)
    with pytest.raises(KHOError, match="relocation code"):
        R.relocate(image, "mmu-off")


def test_corrupted_list_is_a_format_error():
    machine, segs, image, _ = loaded("mmu-off")
    machine.memory.write_u64(int(image.indirection_pages[0]) + 16, 0x1234)
    with pytest.raises(KHOFormatError):
        R.relocate(image, "mmu-off")


def test_mmu_on_faults_when_a_table_misses_a_source():
    machine, segs, image, trans = loaded("mmu-on")
    memory = machine.memory
    src = int(image.source_pages[0])
    # Find and clear the last-level descriptor that maps the first source page.
    plan = trans.plan
    lva = src - plan.memstart
    ids = plan.tables[3]
    row = int(np.searchsorted(ids, lva >> plan.granule.shift(2)))
    table = int(trans.linear_pages[plan.nr_tables - ids.size + row])
    memory.write(table + ((lva >> 12) & 511) * 8, bytes(8))
    with pytest.raises(T.TranslationFault):
        R.relocate(image, "mmu-on", trans)


def test_mode_must_match_the_load():
    machine, segs, image, trans = loaded("mmu-on")
    with pytest.raises(KHOError):
        R.relocate(image, "reserved")
    with pytest.raises(KHOError):
        R.relocate(image, "mmu-on", None)
    with pytest.raises(KHOError):
        R.relocate(image, "mmu-sideways")


def test_purgatory_detects_a_corrupted_segment():
    machine, segs, image, _ = loaded("mmu-off")
    R.relocate(image, "mmu-off")
    machine.memory.write(segs[1].mem + 5, b"\xff")
    check = P.verify(machine.memory, segs[-1].mem)
    assert not check.ok and check.expected != check.actual


def test_purgatory_rejects_bad_header():
    machine, segs, image, _ = loaded("reserved")
    machine.memory.write(segs[-1].mem, b"NOTPURG!")
    with pytest.raises(KHOFormatError):
        P.verify(machine.memory, segs[-1].mem)


def test_purgatory_region_limit():
    segs = [K.Segment(b"", i * PS, PS) for i in range(17)]
    with pytest.raises(KHOError):
        P.build(segs)


def test_written_pages_sees_stored_and_generated_changes():
    machine = Machine.boot(256 << 20)
    memory = machine.memory
    memory.fill_pattern(0x4000000, 64 * PS, seed=7)
    memory.write(0x100000, b"a" * PS)
    before = R._snapshot(memory)
    memory.write(0x4000000 + 10 * PS, b"b" * PS)  # splits the generated run: only that page changes
    memory.fill_pattern(0x5000000, 2 * PS, seed=9)  # new generated content
    memory.write(0x100000, b"a" * PS)  # same bytes, but written
    written = R._written_pages(memory, before).tolist()
    assert written == sorted([0x100000 >> 12, (0x4000000 >> 12) + 10, 0x5000000 >> 12, (0x5000000 >> 12) + 1])
