"""The kernel's ``csum_partial`` (the Internet checksum's 32-bit running sum, ``__wsum``).

``lib/test_kho.c`` chains ``csum = csum_partial(folio, size, csum)`` over its folios from
0 and stores the final 32-bit value, so the stored number depends on the architecture's
implementation:

- ``x86_64`` (``arch/x86/lib/csum-partial_64.c``): a 64-bit end-around-carry sum of the
  data's u64 words (the tail zero-padded) started from ``sum``, folded to 32 bits with an
  end-around carry.  Every step keeps the value congruent modulo ``2**32 - 1`` and never
  turns a nonzero sum into 0, so the result is 0 when ``sum`` and the data are all zero
  and otherwise the representative in ``1 .. 2**32 - 1`` of ``sum + (the data's u32
  words)`` modulo ``2**32 - 1``: no fold to 16 bits.
- ``generic`` (``lib/checksum.c``, which arm64 uses with its own ``do_csum``): ``do_csum``
  folds the data's sum to 16 bits (0 for all-zero data, else the representative in
  ``1 .. 0xffff`` modulo ``0xffff``), then adds it to ``sum`` with a 32-bit end-around carry.

Both read little-endian words from a buffer assumed aligned (folios are).  O(len) with
numpy, in slices of :data:`SLICE_BYTES`.
"""

from __future__ import annotations

import numpy as np

from kho.errors import KHOError

#: The implementations modelled.
CSUM_ARCHES = ("x86_64", "generic")
#: The implementation each architecture's kernel runs (arm64 builds ``lib/checksum.c``).
CSUM_OF_ARCH = {"x86_64": "x86_64", "arm64": "generic"}
#: Bytes summed per numpy step (the u64 accumulator cannot overflow below 2**32 words).
SLICE_BYTES = 64 << 20
_M32 = 0xFFFFFFFF
_M16 = 0xFFFF


def _word_sum(data) -> tuple[int, bool]:
    """The sum of ``data``'s little-endian u32 words (tail zero-padded) and whether any byte is nonzero."""
    view = memoryview(data).cast("B")
    total, nonzero = 0, False
    for start in range(0, len(view), SLICE_BYTES):
        part = bytes(view[start:start + SLICE_BYTES])
        part += bytes(-len(part) % 4)
        words = np.frombuffer(part, dtype="<u4")
        total += int(words.sum(dtype=np.uint64))
        nonzero = nonzero or bool(words.any())
    return total, nonzero


def csum_partial(data, wsum: int = 0, arch: str = "x86_64") -> int:
    """``csum_partial(data, len(data), wsum)`` of ``arch`` (see the module docstring)."""
    if arch not in CSUM_ARCHES:
        raise KHOError("EINVAL", f"unknown csum_partial implementation {arch!r} (one of {', '.join(CSUM_ARCHES)})")
    if not 0 <= wsum <= _M32:
        raise KHOError("EINVAL", f"a __wsum is 32 bits, not {wsum:#x}")
    total, nonzero = _word_sum(data)
    if arch == "x86_64":
        total += wsum
        if not total:
            return 0
        return total % _M32 or _M32
    folded = (total % _M16 or _M16) if nonzero else 0
    result = folded + wsum
    return (result & _M32) + (result >> 32)


def csum_memory(memory, phys: int, size: int, wsum: int = 0, arch: str = "x86_64") -> int:
    """:func:`csum_partial` of ``size`` bytes of ``memory`` at ``phys``, read in slices.  O(size)."""
    for start in range(0, size, SLICE_BYTES):
        wsum = csum_partial(memory.read(phys + start, min(SLICE_BYTES, size - start)), wsum, arch)
    return wsum
