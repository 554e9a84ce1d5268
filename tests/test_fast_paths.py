"""The fast paths of issue 16 give exactly what the general code gives.

* ``Memblock.reserve_noinit_many`` on sorted, disjoint ranges (one adjacent-merge pass)
  against the same ranges shuffled (the general normalize / subtract / merge path);
* the memblock boot path's free-page mask from the reserved regions against memory minus
  ``for_each_free_mem_range`` rounded in;
* ``Tracker.preserve_many`` of ascending units (bank and scratch checks by binary search)
  against the same units shuffled.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from kho.currentkernel.machine import Machine
from kho.handover.outgoing import KHO
from kho.nextkernel.boot import boot
from kho.nextkernel.memblock import Memblock

boot_module = sys.modules["kho.nextkernel.boot"]


def _ranges(rng: np.random.Generator, count: int, page: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint byte ranges, about half of them touching the one before."""
    gaps = rng.integers(0, 2, count) * rng.integers(1, 4, count)
    sizes = rng.integers(1, 4, count)
    base = np.cumsum(gaps + np.concatenate([[1], sizes[:-1]])).astype(np.uint64) * np.uint64(page)
    return base, sizes.astype(np.uint64) * np.uint64(page)


@pytest.mark.parametrize("seed", range(6))
def test_sorted_reserve_noinit_matches_general_path(seed):
    rng = np.random.default_rng(seed)
    page = 4096
    base, size = _ranges(rng, 400, page)
    fast, general = Memblock(page), Memblock(page)
    earlier = [max(0, int(base[i]) + int(rng.integers(-2, 3)) * page) for i in rng.choice(base.size, 3, replace=False)]
    for mb in (fast, general):  # a few earlier reservations, some touching or overlapping units
        for phys in earlier:
            mb.reserve(phys, page)
    shuffle = rng.permutation(base.size)
    fast.reserve_noinit_many(base, size)
    general.reserve_noinit_many(base[shuffle], size[shuffle])
    assert np.array_equal(fast.reserved.regions, general.reserved.regions)
    assert fast.reserve_calls == general.reserve_calls


@pytest.mark.parametrize("seed", range(4))
def test_sorted_reserve_noinit_beside_earlier_reservations(seed):
    """Earlier reservations in the gaps between units, some touching a unit: the fast path
    applies (different flags never merge) and gives the general path's regions."""
    rng = np.random.default_rng(seed)
    page = 4096
    base, size = _ranges(rng, 300, page)
    end = base + size
    gap = np.flatnonzero(base[1:] > end[:-1])
    earlier = [int(end[i]) for i in rng.choice(gap, 4, replace=False)] + [int(end[-1]) + 3 * page]
    fast, general = Memblock(page), Memblock(page)
    for mb in (fast, general):
        for phys in earlier:
            mb.reserve(phys, page)
    assert fast._reserve_noinit_sorted(base, end)
    general.reserve_noinit_many(base[::-1], size[::-1])
    assert np.array_equal(fast.reserved.regions, general.reserved.regions)


def test_sorted_reserve_noinit_on_empty_memblock():
    base = np.array([0, 4096, 12288], dtype=np.uint64)
    size = np.full(3, 4096, dtype=np.uint64)
    fast, general = Memblock(), Memblock()
    fast.reserve_noinit_many(base, size)
    general.reserve_noinit_many(base[::-1], size)
    assert np.array_equal(fast.reserved.regions, general.reserved.regions)
    assert len(fast.reserved) == 2


@pytest.mark.parametrize("seed", [1, 2])
def test_free_mask_of_reserved_matches_free_ranges(seed):
    machine = Machine.boot(1 << 30, seed=seed)
    kho = KHO(machine.memory, machine.allocator, "kho-v2")
    rng = np.random.default_rng(seed)
    pages = machine.allocator.alloc_many(3000, 0)
    kho.tracker.preserve_many(pages[rng.permutation(pages.size)[:2000]], 0)
    handover = kho.finalize()
    nk = boot(machine.memory, handover.boot_dtb(), "memblock", encoding_options=handover.options)
    page = np.uint64(machine.memory.page_size)
    mask = boot_module._free_mask_of_reserved(machine.memory, nk.memblock, nk.memmap)
    start, end, _ = nk.memblock.free_ranges()
    expected = nk.memmap.ranges_mask((start + page - np.uint64(1)) // page, end // page)
    assert mask is not None and np.array_equal(mask, expected)


def test_sorted_batch_checks_match_unsorted():
    """preserve_many of ascending units (checked with a few binary searches) refuses and
    accepts exactly what the same units shuffled (checked one by one) do."""
    from kho.currentkernel.tracker import Tracker
    from kho.errors import KHOError

    machine = Machine.boot(1 << 30, seed=3)
    memory = machine.memory
    area = memory.scratch[-1]
    page = memory.page_size
    ok = machine.allocator.alloc_many(500, 0)
    rng = np.random.default_rng(3)
    for bad in ([area.addr], [area.end - page], [memory.banks[-1].end]):
        batch = np.sort(np.concatenate([ok[:200], np.array(bad, dtype=np.uint64)]))
        messages = []
        for phys in (batch, batch[rng.permutation(batch.size)]):
            with pytest.raises(KHOError) as err:
                Tracker(memory).preserve_many(phys, 0)
            messages.append((err.value.errno_name, str(err.value)))
        assert messages[0] == messages[1]
        assert messages[0][0] == "EINVAL" and ("scratch" in messages[0][1] or "outside RAM" in messages[0][1])
    sorted_tracker, shuffled_tracker = Tracker(memory), Tracker(memory)
    sorted_tracker.preserve_many(ok, 0)
    shuffled_tracker.preserve_many(ok[rng.permutation(ok.size)], 0)
    assert all(np.array_equal(a, b) for a, b in zip(sorted_tracker.units_array(), shuffled_tracker.units_array()))
    assert sorted_tracker.nr_pages == shuffled_tracker.nr_pages == ok.size


@pytest.mark.parametrize("seed", range(4))
def test_page_private_matches_a_dense_array(seed):
    """MemMap.info (stamped heads plus other words) reads and writes as the dense
    KHO_PAGE_INFO_DTYPE array it replaces."""
    from kho.abi.kexec_handover import KHO_PAGE_INFO_DTYPE, KHO_PAGE_MAGIC
    from kho.nextkernel.memmap import PagePrivate

    rng = np.random.default_rng(seed)
    n = 50
    sparse, dense = PagePrivate(n), np.zeros(n, KHO_PAGE_INFO_DTYPE)
    for _ in range(200):
        op = rng.integers(4)
        if op == 0:
            idx = np.unique(rng.integers(0, n, rng.integers(1, 8)))
            order = rng.integers(0, 12, idx.size)
            if rng.random() < 0.5:
                idx, order = idx[::-1], order[::-1]
            sparse.stamp(idx, order)
            dense[idx] = [(int(o), KHO_PAGE_MAGIC) for o in order]
        elif op == 1:
            i = int(rng.integers(n))
            sparse[i] = dense[i] = 0
        elif op == 2:
            i = int(rng.integers(n))
            sparse[i] = dense[i] = (int(rng.integers(20)), KHO_PAGE_MAGIC if rng.random() < 0.5 else 7)
        else:
            i, idx = int(rng.integers(n)), rng.integers(0, n, 5)
            assert sparse[i] == dense[i]
            assert np.array_equal(sparse["magic"][idx], dense["magic"][idx])
            assert np.array_equal(sparse[idx], dense[idx])
        assert np.array_equal(np.asarray(sparse), dense)


def test_stream_walk_in_small_chunks_matches(monkeypatch):
    """The instruction walker expands the bitmap words a chunk at a time: any chunk size
    gives the same units (two orders, so both the uniform and the per-word order paths)."""
    import kho.encodings.instructions as instructions

    machine = Machine.boot(1 << 30, seed=2)
    kho = KHO(machine.memory, machine.allocator, "instructions")
    kho.tracker.preserve_many(machine.allocator.alloc_many(20000, 0), 0)
    kho.tracker.preserve_many(machine.allocator.alloc_many(300, 3), 3)
    handover = kho.finalize()
    whole = instructions.walk(machine.memory, handover.encoded.props)
    for few, words in ((64, 3), (0, 3), (0, 1 << 20)):  # record by record, and with per-word tables
        monkeypatch.setattr(instructions, "FEW_BITMAPS", few)
        monkeypatch.setattr(instructions, "WALK_WORDS", words)
        chunked = instructions.walk(machine.memory, handover.encoded.props)
        assert np.array_equal(whole.unit_phys, chunked.unit_phys) and np.array_equal(whole.unit_order, chunked.unit_order)
    assert set(np.unique(whole.unit_order).tolist()) == {0, 3}


@pytest.mark.parametrize("window", [1 << 12, 1 << 15, 1 << 23])
def test_ascending_bitmaps_match_the_general_packing(monkeypatch, window):
    """packed_bitmaps of ascending units (window by window) gives the bitmaps the general
    packing gives for the same units in another order."""
    from kho.currentkernel import batches

    monkeypatch.setattr(batches, "WINDOW_BITS", window)
    rng = np.random.default_rng(window)
    pfn = np.unique(rng.integers(0, 1 << 20, 30000)) << 2  # order-2 aligned
    phys = pfn.astype(np.uint64) << np.uint64(12)
    orders = np.full(phys.size, 2, dtype=np.uint8)

    def flat(batch):
        parts = list(batches.packed_bitmaps(batch, orders, 12, 12, 1 << 28))
        return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])

    (ia, pa), (ib, pb) = flat(phys), flat(phys[rng.permutation(phys.size)])
    assert np.array_equal(ia, ib) and np.array_equal(pa, pb)


@pytest.mark.parametrize("tracker_kind", ["tracker", "radix"])
def test_sorted_batch_overlap_refused_like_unsorted(tracker_kind):
    """An ascending batch of one order (its cover checked and marked from the packed bits)
    that meets a preserved unit is refused with the unsorted batch's EEXIST, and changes
    nothing; without the overlap it preserves the same units."""
    from kho.currentkernel.radix_tracker import RadixTracker
    from kho.currentkernel.tracker import Tracker
    from kho.errors import KHOError

    machine = Machine.boot(1 << 30, seed=4)
    memory = machine.memory
    make = (lambda: Tracker(memory)) if tracker_kind == "tracker" else (lambda: RadixTracker(memory, machine.allocator))
    big = machine.allocator.alloc_many(1, 3)
    pages = machine.allocator.alloc_many(3000, 0)
    inside = int(big[0]) + 5 * memory.page_size
    batch = np.sort(np.concatenate([pages, np.array([inside], dtype=np.uint64)]))
    rng = np.random.default_rng(4)
    messages, states = [], []
    for phys in (batch, batch[rng.permutation(batch.size)]):
        tracker = make()
        tracker.preserve_folio(int(big[0]), 3)
        with pytest.raises(KHOError) as err:
            tracker.preserve_many(phys, 0)
        messages.append(str(err.value))
        states.append((tracker.units(), tracker.nr_pages, tracker.is_preserved_array(pages).any()))
        tracker.preserve_many(pages, 0)
        assert tracker.is_preserved_array(pages).all() and len(tracker) == pages.size + 1
    assert messages[0] == messages[1] and "already preserved" in messages[0]
    assert states[0] == states[1] == ([(int(big[0]), 3)], 8, False)


def test_stream_popcount_matches_the_byte_table():
    import kho.encodings.instructions as instructions

    words = np.random.default_rng(5).integers(0, 1 << 63, 10000, dtype=np.uint64)
    assert instructions._popcount(words) == int(instructions._POPCOUNT8[words.view(np.uint8)].sum())
