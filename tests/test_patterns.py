import numpy as np
import pytest

from kho.currentkernel.machine import Machine
from kho.currentkernel.tracker import Tracker
from kho.errors import KHOError
from kho.simulation.preserved_sets import PATTERNS, generate


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_patterns_preserve_the_share_asked_without_overlap(name):
    machine = Machine.boot(2 << 30, seed=5)
    phys, orders = generate(name, machine.allocator, 256 << 20, seed=7)
    assert phys.dtype == np.uint64 and orders.dtype == np.uint8
    assert int(np.sum(np.left_shift(1, orders.astype(np.int64)))) == (256 << 20) >> 12
    assert (np.diff(phys.astype(np.int64)) > 0).all()
    tracker = Tracker(machine.memory)
    tracker.preserve_many(phys, orders)  # strict: no overlap, no scratch, inside RAM
    assert tracker.nr_pages == 65536
    again, _ = generate(name, Machine.boot(2 << 30, seed=5).allocator, 256 << 20, seed=7)
    assert (again == phys).all()


def test_pattern_shapes():
    m = Machine.boot(1 << 30, seed=1)
    _, orders = generate("huge", m.allocator, 128 << 20)
    big = np.left_shift(1, orders.astype(np.int64))[orders >= 9].sum()
    assert big >= 0.85 * ((128 << 20) >> 12)
    _, orders = generate("mixed", Machine.boot(1 << 30).allocator, 128 << 20)
    assert len(set(orders.tolist())) >= 8
    phys, _ = generate("strided", Machine.boot(1 << 30).allocator, 64 << 20)
    gaps = np.diff(phys.astype(np.int64)) >> 12
    assert np.median(gaps) == 16


def test_pattern_errors():
    m = Machine.boot(1 << 30)
    with pytest.raises(KHOError):
        generate("nope", m.allocator, 1 << 20)
    with pytest.raises(KHOError) as info:
        generate("random", m.allocator, 2 << 30)
    assert info.value.errno_name == "ENOMEM"
    with pytest.raises(KHOError):
        generate("random", m.allocator, 100)


@pytest.mark.parametrize("seed", range(12))
def test_runs_stay_inside_allocated_blocks(seed):
    """Regression: when the drawn lengths fell short of the total, the last run grew past its
    4 MiB block into memory the allocator had not handed out."""
    machine = Machine.boot(1 << 30, seed=seed)
    phys, orders = generate("runs", machine.allocator, 100 << 20, seed=seed)
    pages = np.concatenate([p + np.arange(1 << int(o), dtype=np.uint64) * np.uint64(4096) for p, o in zip(phys, orders)])
    assert machine.allocator.claim_pages(pages).size == 0  # every page was allocated already
