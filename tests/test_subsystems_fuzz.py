"""Hypothesis mutations of the sub-node fuzz seeds (tests/fuzz/subnodes.py): bit flips, pointer
and count rewrites and truncation; every target must decode or refuse with KHOFormatError, in time."""

import sys
from functools import cache
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz.corpus import seeds
from fuzz.samples import ARENA
from fuzz.subnodes import SUBNODE_SEEDS
from fuzz.targets import TARGETS, time_limit

WORDS = st.sampled_from([0, 1, 7, 0xFFFFFFFF, 2**64 - 1, 1 << 40, ARENA, ARENA + 4096, ARENA + 8, 12 << 20])


@cache
def subnode_seeds(name: str) -> tuple[bytes, ...]:
    return tuple(seeds(name))


def test_every_subnode_target_is_registered_and_takes_its_seeds():
    for name in SUBNODE_SEEDS:
        inputs = subnode_seeds(name)
        assert inputs and name in TARGETS
        for data in inputs:
            assert len(data) <= TARGETS[name].max_len
            TARGETS[name].run(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from(sorted(SUBNODE_SEEDS)), data=st.data())
def test_mutated_subnodes_decode_or_are_refused(target, data):
    raw = bytearray(data.draw(st.sampled_from(range(len(subnode_seeds(target)))).map(lambda i: subnode_seeds(target)[i])))
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "word", "cut"]))
        if kind == "flip" and raw:
            bit = data.draw(st.integers(0, len(raw) * 8 - 1))
            raw[bit // 8] ^= 1 << (bit % 8)
        elif kind == "word" and len(raw) >= 8:
            at = data.draw(st.integers(0, len(raw) - 8)) & ~7
            raw[at:at + 8] = data.draw(WORDS).to_bytes(8, "little")
        elif kind == "cut":
            del raw[data.draw(st.integers(0, len(raw))):]
    with time_limit(20):
        TARGETS[target].run(bytes(raw))
