"""Deterministic page contents generated from ``(seed, pfn)``.

Large data regions (a workload's preserved folios) need not be stored byte by byte:
their contents are a pure function of a seed and the page frame number, so a 64 GiB
machine holding 16 GiB of "data" fits in a little host memory, and any program can
regenerate the bytes (spec/image-format.md documents the function).

The function: the page's 64-bit little-endian word ``w`` (``0 <= w < page_size/8``)
of page ``pfn`` is ``splitmix64_mix(seed * 0x9E3779B97F4A7C15 + pfn * (page_size/8) + w)``
modulo 2**64, where ``splitmix64_mix`` is the finalizer of Steele et al.'s SplitMix64:
``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``.
Cost: O(bytes) vectorized numpy work, a few hundred MB/s.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def pattern_words(seed: int, first_pfn: int, nr_pages: int, page_size: int) -> np.ndarray:
    """The uint64 words of ``nr_pages`` pages from ``first_pfn`` (shape ``(nr_pages * page_size // 8,)``)."""
    words_per_page = page_size // 8
    base = (seed * _GOLDEN + first_pfn * words_per_page) & MASK64
    z = np.arange(nr_pages * words_per_page, dtype=np.uint64)
    z += np.uint64(base)
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def pattern_bytes(seed: int, first_pfn: int, nr_pages: int, page_size: int) -> bytes:
    """The bytes of ``nr_pages`` generated pages (little-endian words)."""
    return pattern_words(seed, first_pfn, nr_pages, page_size).astype("<u8", copy=False).tobytes()
