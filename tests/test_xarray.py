import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kho.currentkernel.xarray import XA_NODE_BYTES, XArray
from kho.errors import KHOError


def test_empty():
    xa = XArray()
    assert len(xa) == 0 and xa.load(0) is None and xa.load(2**64 - 1) is None
    assert list(xa.items()) == [] and xa.find() is None and xa.nr_nodes == 0


def test_index_zero_lives_in_head_like_linux():
    xa = XArray()
    xa.store(0, "a")
    assert xa.nr_nodes == 0 and xa.height == 0 and xa[0] == "a"
    xa.store(1, "b")
    assert xa.height == 1 and xa.nr_nodes == 1
    xa.erase(1)
    assert xa.height == 0 and xa.nr_nodes == 0 and xa[0] == "a"


def test_height_grows_six_bits_a_level():
    xa = XArray()
    xa.store(63, 1)
    assert xa.height == 1
    xa.store(64, 1)
    assert xa.height == 2
    xa.store(2**64 - 1, 1)
    assert xa.height == 11
    assert xa.kernel_bytes == xa.nr_nodes * XA_NODE_BYTES


def test_node_count_of_sparse_keys():
    xa = XArray()
    xa.store(1 << 12, "x")  # needs 3 levels: root, one node a level below
    assert xa.height == 3 and xa.nr_nodes == 3
    xa.store((1 << 12) + 1, "y")  # same leaf node
    assert xa.nr_nodes == 3
    xa.store(2 << 12, "z")  # shares the root only
    assert xa.nr_nodes == 5


def test_find_and_items_start():
    xa = XArray()
    for k in (5, 70, 4096, 2**40):
        xa[k] = k
    assert xa.find(6) == (70, 70)
    assert xa.find(4097) == (2**40, 2**40)
    assert xa.find(2**40 + 1) is None
    assert [k for k, _ in xa.items(71)] == [4096, 2**40]


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, "3"])
def test_bad_index(bad):
    with pytest.raises(KHOError) as info:
        XArray().load(bad)
    assert info.value.errno_name == "EINVAL"


def test_store_none_erases():
    xa = XArray()
    xa[9] = "v"
    assert xa.store(9, None) == "v" and len(xa) == 0 and xa.nr_nodes == 0


keys = st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1))


class XArrayVsDict(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.xa, self.model = XArray(), {}

    @rule(k=keys, v=st.integers())
    def store(self, k, v):
        assert self.xa.store(k, v) == self.model.get(k)
        self.model[k] = v

    @rule(k=keys)
    def erase(self, k):
        assert self.xa.erase(k) == self.model.pop(k, None)

    @rule(k=keys)
    def load(self, k):
        assert self.xa.load(k) == self.model.get(k)

    @rule(k=keys)
    def find(self, k):
        later = sorted(i for i in self.model if i >= k)
        expect = (later[0], self.model[later[0]]) if later else None
        assert self.xa.find(k) == expect

    @invariant()
    def same_items(self):
        assert list(self.xa.items()) == sorted(self.model.items())
        assert len(self.xa) == len(self.model)
        if not self.model or max(self.model) == 0:
            assert self.xa.nr_nodes == 0
        else:
            assert self.xa.height == -(-max(self.model).bit_length() // 6)
            assert self.xa.nr_nodes >= self.xa.height


TestXArrayVsDict = XArrayVsDict.TestCase
TestXArrayVsDict.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


@given(st.sets(st.integers(0, 2**20), max_size=200))
@settings(deadline=None)
def test_node_count_matches_distinct_prefixes(indices):
    xa = XArray()
    for i in indices:
        xa[i] = True
    if not indices or max(indices) == 0:
        assert xa.nr_nodes == 0
        return
    h = xa.height
    expected = sum(len({i >> (6 * (level + 1)) for i in indices}) for level in range(h))
    assert xa.nr_nodes == expected
