"""Round trip of every registered encoding (kho-v1 and kho-v2 join through the registry):
the preserved pages after decode are the pages before; order-keeping encodings give back
the very units."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.encodings import ENCODINGS, get_encoding, load_all
from kho.errors import KHOError
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea

load_all()
NAMES = sorted(ENCODINGS)
#: Encodings that must work for every page size; the kernel ABIs may refuse (EINVAL) what
#: the kernel's layout cannot hold with 16/64 KiB pages.
ANY_PAGE_SIZE = {"ranges", "ranges-packed", "maple", "instructions"}


def pages_of(phys: np.ndarray, order: np.ndarray, page_shift: int) -> np.ndarray:
    """Every page (pfn) the units cover, sorted."""
    pfn = phys.astype(np.int64) >> page_shift
    n = np.left_shift(1, order.astype(np.int64))
    return np.sort(np.repeat(pfn, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)))


@st.composite
def machines(draw):
    """1-3 banks (with or without holes between them), maybe a scratch area, page size 4/16/64 KiB."""
    page_size = draw(st.sampled_from([4096, 4096, 16384, 65536]))
    banks, pos = [], draw(st.integers(0, 4)) * 1024 * page_size
    for node in range(draw(st.integers(1, 3))):
        size = draw(st.integers(1, 3)) * 1024 * page_size
        banks.append(Bank(pos, size, node))
        pos += size + draw(st.sampled_from([0, 0, 512, 2048])) * page_size
    memory = PhysicalMemory(banks, page_size)
    if draw(st.booleans()):
        bank = banks[draw(st.integers(0, len(banks) - 1))]
        memory.set_scratch([ScratchArea(bank.start + bank.size // 2, 64 * page_size, "global")])
    return memory


@st.composite
def preserved_sets(draw):
    memory = draw(machines())
    alloc = PageAllocator(memory, seed=draw(st.integers(0, 2**16)))
    phys, order = [], []
    ps = memory.page_size
    edges = []
    if draw(st.booleans()):
        edges.append(memory.banks[0].start)  # the first page of RAM (page 0 when RAM starts at 0)
    if draw(st.booleans()):
        edges.append(memory.banks[-1].end - ps)  # the top page of RAM
    for p in alloc.claim_pages(np.array(edges, dtype=np.uint64)).tolist():
        phys.append(p)
        order.append(0)
    for o in range(memory.geometry.max_order + 1):
        count = draw(st.integers(0, max(0, 24 >> (o // 2))))
        try:
            got = alloc.alloc_many(count, o)
        except Exception:
            continue
        phys.extend(got.tolist())
        order.extend([o] * got.size)
    if draw(st.booleans()):  # a long run: neighbours that the range encodings merge
        start = draw(st.integers(0, 4096))
        for p in range(start, start + draw(st.integers(2, 300))):
            got = alloc.claim_pages(np.array([memory.banks[0].start + p * ps], dtype=np.uint64))
            phys.extend(got.tolist())
            order.extend([0] * got.size)
    preserve_bits = draw(st.sampled_from(["page", 4096]))
    tracker = Tracker(memory, preserve_bits)
    if phys:
        tracker.preserve_many(np.array(phys, dtype=np.uint64), np.array(order, dtype=np.uint8))
    tracker.finalize()
    return memory, alloc, tracker


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=preserved_sets())
def test_round_trip(name, case):
    memory, alloc, tracker = case
    encoding = get_encoding(name, memory.page_size)
    try:
        encoded = encoding.encode(tracker, alloc)
    except KHOError as err:
        if name in ANY_PAGE_SIZE or memory.page_size == 4096 or err.errno_name != "EINVAL":
            raise
        assume(False)
    assert encoded.compatible == encoding.compatible
    decoded = get_encoding(name, memory.page_size, **encoded.options).decode(memory, encoded.props)
    phys, order = tracker.units_array()
    assert np.array_equal(pages_of(decoded.phys, decoded.order, memory.page_shift), pages_of(phys, order, memory.page_shift))
    assert decoded.exact_orders == encoding.keeps_orders
    if encoding.keeps_orders:
        assert decoded.units() == tracker.units()
    # Metadata lives on pages no preserved unit and no scratch area touches.
    meta = encoded.metadata_pages
    assert not tracker.is_preserved_array(meta).any()
    assert not memory.overlaps_scratch_array(meta, np.full(meta.size, memory.page_size, np.uint64)).any()
    assert np.array_equal(np.unique(meta), meta)
