import numpy as np
import pytest

from kho.currentkernel.pagealloc import PageAllocator
from kho.errors import KHOError
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea


def machine():
    m = PhysicalMemory([Bank(0, 4 << 20), Bank(8 << 20, 4 << 20)])
    m.set_scratch([ScratchArea(2 << 20, 1 << 20)])
    return m


def test_first_fit_skips_reserved_and_scratch():
    m = machine()
    a = PageAllocator(m, reserved=[(0, 0x3000)])
    assert a.alloc_pages(0) == 0x3000
    assert a.alloc_pages(2) == 0x4000
    assert a.alloc_pages(0) == 0x8000
    blocks = [a.alloc_pages(9) for _ in range(2)]
    for b in blocks:
        assert not m.overlaps_scratch(b, 2 << 20) and b % (2 << 20) == 0
    assert blocks == [8 << 20, 10 << 20]
    with pytest.raises(KHOError):
        a.alloc_pages(9)


def test_free_and_reuse():
    a = PageAllocator(machine())
    x = a.alloc_pages(3)
    a.free_pages(x, 3)
    assert a.alloc_pages(3) == x
    with pytest.raises(KHOError):
        a.free_pages(x + 0x1000, 0) or a.free_pages(x + 0x1000, 0)
    with pytest.raises(KHOError):
        a.free_pages(x + 0x1000, 3)  # misaligned


def test_alloc_many_is_deterministic_random_and_disjoint():
    def draw(seed):
        return PageAllocator(machine(), seed=seed).alloc_many(500, 1)
    a, b, c = draw(1), draw(1), draw(2)
    assert (a == b).all() and not (a == c).all()
    assert len(np.unique(a)) == 500 and (a % 8192 == 0).all()
    m = machine()
    assert not m.overlaps_scratch_array(a, np.uint64(8192)).any()


def test_alloc_many_all_or_nothing():
    a = PageAllocator(machine())
    free = a.nr_free_pages
    with pytest.raises(KHOError) as info:
        a.alloc_many(free + 1, 0)
    assert info.value.errno_name == "ENOMEM" and a.nr_free_pages == free
    got = a.alloc_many(free, 0)  # the dense path takes everything
    assert got.size == free and a.nr_free_pages == 0
    with pytest.raises(KHOError):
        a.alloc_pages(0)


def test_bad_order():
    with pytest.raises(KHOError):
        PageAllocator(machine()).alloc_pages(11)
