"""kexec image: segment rules and placement, source pages under the kernel's invariant,
the entry list in memory and its walker."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho.currentkernel.machine import Machine
from kho.currentkernel.pagealloc import PageAllocator
from kho.errors import KHOError, KHOFormatError
from kho.kexec import entries as ent
from kho.kexec import kimage as K
from kho.memory.intervals import IntervalSet
from kho.memory.physical import PhysicalMemory

PS = 4096


scratch_ranges = K.scratch_pages


@pytest.fixture
def machine():
    return Machine.boot(256 << 20, seed=3)


# -- entry list layout --------------------------------------------------------------------
@pytest.mark.parametrize("n, pages", [(0, 0), (1, 1), (511, 1), (512, 2), (1022, 2), (1023, 3)])
def test_indirection_page_count(n, pages):
    assert ent.nr_indirection_pages(n, PS) == pages


def test_layout_full_page_puts_done_in_link_slot():
    entries = np.arange(1, 512, dtype=np.uint64) << np.uint64(12) | np.uint64(ent.IND_SOURCE)
    head, slots = ent.layout_pages(entries, np.array([0x5000], dtype=np.uint64), PS)
    assert head == 0x5000 | ent.IND_INDIRECTION
    assert slots.shape == (1, 512)
    assert slots[0, 511] == ent.IND_DONE
    assert (slots[0, :511] == entries).all()


def test_layout_links_pages():
    entries = np.full(600, 0x9000 | ent.IND_SOURCE, dtype=np.uint64)
    entries[0] = 0x1000 | ent.IND_DESTINATION
    head, slots = ent.layout_pages(entries, np.array([0x5000, 0x7000], dtype=np.uint64), PS)
    assert slots[0, 511] == 0x7000 | ent.IND_INDIRECTION
    assert slots[1, 600 - 511] == ent.IND_DONE
    assert (slots[1, 600 - 511 + 1:] == 0).all()


def test_empty_list_head_is_done():
    head, slots = ent.layout_pages(np.empty(0, np.uint64), np.empty(0, np.uint64), PS)
    assert head == ent.IND_DONE and slots.shape[0] == 0


def _write(memory, entries, pages):
    return ent.write_list(memory, np.array(entries, dtype=np.uint64), np.array(pages, dtype=np.uint64))


def test_walk_follows_destinations_across_pages():
    memory = PhysicalMemory.single_bank(64 << 20)
    entries = [0x100000 | ent.IND_DESTINATION] + [(0x200000 + i * PS) | ent.IND_SOURCE for i in range(700)]
    entries += [0x800000 | ent.IND_DESTINATION, 0x900000 | ent.IND_SOURCE]
    head = _write(memory, entries, [0x10000, 0x20000])
    walk = ent.walk_list(memory, head)
    assert walk.nr_copies == 701
    assert (walk.src[:700] == 0x200000 + PS * np.arange(700)).all()
    assert (walk.dst[:700] == 0x100000 + PS * np.arange(700)).all()
    assert walk.dst[700] == 0x800000 and walk.src[700] == 0x900000
    assert list(walk.indirection) == [0x10000, 0x20000]


def test_walk_rejects_cycle():
    memory = PhysicalMemory.single_bank(16 << 20)
    page = np.zeros(512, dtype=np.uint64)
    page[0] = 0x1000 | ent.IND_DESTINATION
    page[1] = 0x10000 | ent.IND_INDIRECTION  # links back to itself
    memory.write(0x10000, page.tobytes())
    with pytest.raises(KHOFormatError, match="cycle"):
        ent.walk_list(memory, 0x10000 | ent.IND_INDIRECTION)


@pytest.mark.parametrize("bad, match", [
    ([0x3000 | ent.IND_SOURCE], "SOURCE before any DESTINATION"),
    ([0x1000 | ent.IND_DESTINATION, 0x3000 | ent.IND_SOURCE | ent.IND_DESTINATION], "invalid entry"),
    ([0x1000 | ent.IND_DESTINATION, 0], "invalid entry 0x0"),
    ([(1 << 40) | ent.IND_DESTINATION], "outside RAM"),
])
def test_walk_rejects_malformed(bad, match):
    memory = PhysicalMemory.single_bank(16 << 20)
    page = np.zeros(512, dtype=np.uint64)
    page[:len(bad)] = bad
    page[len(bad)] = ent.IND_DONE
    memory.write(0x10000, page.tobytes())
    with pytest.raises(KHOFormatError, match=match) as info:
        ent.walk_list(memory, 0x10000 | ent.IND_INDIRECTION)
    assert info.value.field == "kimage.entry"


def test_walk_rejects_list_without_done():
    memory = PhysicalMemory.single_bank(16 << 20)
    page = np.full(512, 0x2000 | ent.IND_SOURCE, dtype=np.uint64)
    page[0] = 0x1000 | ent.IND_DESTINATION
    memory.write(0x10000, page.tobytes())
    with pytest.raises(KHOFormatError, match="past the end"):
        ent.walk_list(memory, 0x10000 | ent.IND_INDIRECTION)


def test_walk_rejects_bad_head():
    memory = PhysicalMemory.single_bank(16 << 20)
    with pytest.raises(KHOFormatError):
        ent.walk_list(memory, 0x10000 | ent.IND_SOURCE)


# -- segment rules -------------------------------------------------------------------------
def seg(mem, memsz, buf=b"", name="s"):
    return K.Segment(buf, mem, memsz, name)


@pytest.mark.parametrize("segments, errno", [
    ([seg(i * PS, PS) for i in range(17)], "EINVAL"),
    ([seg(0x1000 + 1, PS)], "EADDRNOTAVAIL"),
    ([seg(0x1000, PS + 1)], "EADDRNOTAVAIL"),
    ([seg(0x1000, -PS)], "EADDRNOTAVAIL"),
    ([seg(1 << 40, PS)], "EADDRNOTAVAIL"),
    ([seg(0x1000, 2 * PS), seg(0x2000, PS)], "EINVAL"),
    ([seg(0x1000, PS, b"x" * (PS + 1))], "EINVAL"),
    ([seg(0, 40 << 20)], "EINVAL"),
    ([seg(0, 20 << 20), seg(20 << 20, 20 << 20)], "EINVAL"),
])
def test_segment_rules(segments, errno):
    memory = PhysicalMemory.single_bank(64 << 20)
    with pytest.raises(KHOError) as info:
        K.check_segments(memory, segments)
    assert info.value.errno_name == errno


def test_segment_rules_checked_in_kernel_order():
    memory = PhysicalMemory.single_bank(64 << 20)
    # Overlapping *and* misaligned: the address check (EADDRNOTAVAIL) comes first.
    with pytest.raises(KHOError) as info:
        K.check_segments(memory, [seg(0x1000, 2 * PS), seg(0x2001, PS)])
    assert info.value.errno_name == "EADDRNOTAVAIL"


def test_segments_must_be_in_scratch_and_off_busy_pages(machine):
    memory = machine.memory
    allowed = scratch_ranges(memory)
    area = memory.scratch[0]
    with pytest.raises(KHOError, match="scratch") as info:
        K.check_segments(memory, [seg(area.addr - PS, 2 * PS)], allowed=allowed)
    assert info.value.errno_name == "EADDRNOTAVAIL"
    busy = IntervalSet.of([(area.addr + PS) >> 12], [(area.addr + 2 * PS) >> 12])
    with pytest.raises(KHOError, match="preserved") as info:
        K.check_segments(memory, [seg(area.addr, 2 * PS)], allowed=allowed, busy=busy)
    assert info.value.errno_name == "EADDRNOTAVAIL"
    K.check_segments(memory, [seg(area.addr + 2 * PS, 2 * PS)], allowed=allowed, busy=busy)


def test_place_segments_aligned_in_scratch_avoiding_busy(machine):
    memory = machine.memory
    allowed = scratch_ranges(memory)
    first = memory.scratch[0]
    busy = IntervalSet.of([first.addr >> 12], [(first.addr + PS) >> 12])
    segs = K.place_segments(memory, [K.SegmentRequest("kernel", b"k" * 5000, align=2 << 20),
                                     K.SegmentRequest("initrd", b"i" * 10)], allowed, busy)
    assert segs[0].mem % (2 << 20) == 0 and segs[0].memsz == 2 * PS
    K.check_segments(memory, segs, allowed=allowed, busy=busy)
    assert segs[1].mem != first.addr


def test_segment_may_not_span_adjacent_scratch_areas(machine):
    memory = machine.memory
    left, right = memory.scratch[0], memory.scratch[1]
    assert left.end == right.addr, "this machine's areas touch"
    with pytest.raises(KHOError) as info:
        K.check_segments(memory, [seg(left.end - PS, 2 * PS)], allowed=scratch_ranges(memory))
    assert info.value.errno_name == "EADDRNOTAVAIL"


def test_image_larger_than_scratch_is_eaddrnotavail(machine):
    memory = machine.memory
    too_big = max(a.size for a in memory.scratch) + PS
    with pytest.raises(KHOError) as info:
        K.place_segments(memory, [K.SegmentRequest("initrd", b"", memsz=too_big)], scratch_ranges(memory))
    assert info.value.errno_name == "EADDRNOTAVAIL"


# -- load ------------------------------------------------------------------------------------
def place(machine, sizes):
    rng = np.random.default_rng(len(sizes))
    reqs = [K.SegmentRequest(f"s{i}", rng.bytes(n)) for i, n in enumerate(sizes)]
    return K.place_segments(machine.memory, reqs, scratch_ranges(machine.memory))


def test_load_writes_sources_and_list(machine):
    segs = place(machine, [3 * PS + 5, 700 * PS])
    free_before = machine.allocator.nr_free_pages
    image = K.load(machine.memory, machine.allocator, segs, allowed=scratch_ranges(machine.memory))
    walk = image.walk()
    assert walk.nr_copies == image.nr_pages == 4 + 700
    assert walk.indirection.size == ent.nr_indirection_pages(704 + 2, PS) == 2
    assert machine.allocator.nr_free_pages == free_before - image.pages_used()
    memory = machine.memory
    for s in segs:
        idx = np.flatnonzero((walk.dst >= s.mem) & (walk.dst < s.end))
        data = b"".join(memory.read(int(walk.src[i]), PS) for i in idx)
        assert data == s.buf + bytes(s.memsz - s.bufsz)
    image.unload(machine.allocator)
    assert machine.allocator.nr_free_pages == free_before


def test_load_in_place_writes_destinations(machine):
    segs = place(machine, [PS + 1])
    image = K.load(machine.memory, machine.allocator, segs, in_place=True)
    assert image.head == ent.IND_DONE and image.source_pages.size == 0
    assert machine.memory.read(segs[0].mem, segs[0].memsz) == segs[0].buf + bytes(PS - 1)


def test_sources_keep_the_kernel_invariant_when_allocator_hands_out_destinations():
    """An allocator that may return scratch pages (like a next kernel's buddy): any source page
    that is a destination must be its own; indirection and control pages never are."""
    machine = Machine.boot(256 << 20, seed=1)
    memory = machine.memory
    area = memory.scratch[0]
    # Leave only the scratch area and a little else free, so destinations are handed out.
    alloc = PageAllocator(memory, [(0, area.addr)], seed=2, use_scratch=True)
    alloc.reserve(area.end, memory.ram_size - area.end - (1 << 20))
    segs = [K.Segment(bytes(range(256)) * 16 * 200, area.addr, 200 * PS, "kernel")]
    image = K.load(memory, alloc, segs)
    walk = image.walk()
    dests = image.destinations
    own = dests.contains((walk.src >> np.uint64(12)).astype(np.int64))
    assert own.any(), "the test should exercise own-destination sources"
    assert (walk.src[own] == walk.dst[own]).all()
    assert not dests.contains((walk.indirection >> np.uint64(12)).astype(np.int64)).any()
    assert not dests.contains(np.array([image.control_page >> 12])).any()


def test_load_is_all_or_nothing_on_enomem():
    machine = Machine.boot(256 << 20, seed=1)
    alloc = machine.allocator
    alloc.alloc_many(alloc.nr_free_pages - 10, 0)
    segs = place(machine, [100 * PS])
    stored = machine.memory.nr_stored_pages
    with pytest.raises(KHOError) as info:
        K.load(machine.memory, alloc, segs)
    assert info.value.errno_name == "ENOMEM"
    assert alloc.nr_free_pages == 10
    assert machine.memory.nr_stored_pages == stored


def test_no_segments_is_einval(machine):
    with pytest.raises(KHOError):
        K.load(machine.memory, machine.allocator, [])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 40 * PS), min_size=1, max_size=6), st.integers(0, 2**16))
def test_walk_reproduces_every_segment(sizes, seed):
    machine = Machine.boot(256 << 20, seed=seed)
    rng = np.random.default_rng(seed)
    reqs = [K.SegmentRequest(f"s{i}", rng.bytes(n), memsz=n + int(rng.integers(0, 3)) * PS) for i, n in enumerate(sizes)]
    segs = K.place_segments(machine.memory, reqs, scratch_ranges(machine.memory))
    image = K.load(machine.memory, machine.allocator, segs)
    walk = image.walk()
    expected_dst = np.concatenate([np.arange(s.mem, s.end, PS, dtype=np.uint64) for s in segs])
    assert (walk.dst == expected_dst).all()
    assert list(walk.destinations) == [s.mem for s in segs]
    assert len(set(walk.src.tolist())) == walk.nr_copies
