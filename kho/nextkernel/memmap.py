"""The next kernel's memory map: what it keeps per page (``struct page``) that KHO uses.

Two arrays indexed by page over all RAM banks (bank after bank, holes skipped):

* ``info`` — ``page->private`` as KHO writes it on the head page of every preserved
  unit: :data:`KHO_PAGE_INFO_DTYPE` ``{u32 order; u32 magic}`` (``union kho_page_info``,
  little-endian: the order is the low 32 bits of ``private``), magic 'KHOP'.  Only the
  heads ever hold a non-zero word, so it is a :class:`PagePrivate`: indexed like the
  dense array, stored per stamped head (6 bytes a unit instead of 8 bytes a page).
* ``state`` — who owns the page: free (in the buddy free lists), allocated (handed
  out by the allocator, or restored from KHO and now the caller's), reserved (memblock
  reservations: the kernel's own memory, the scratch array), preserved (a KHO unit not
  restored yet).

Units: pfns, orders; 1 byte of host memory per page plus 6 per preserved unit.
"""

from __future__ import annotations

import numpy as np

from kho.abi.kexec_handover import KHO_PAGE_INFO_DTYPE, KHO_PAGE_MAGIC
from kho.errors import KHOError
from kho.memory import intervals
from kho.memory.physical import PhysicalMemory

#: Page states (values of :attr:`MemMap.state`); :meth:`MemMap.set_free` relies on FREE being 0.
FREE, ALLOCATED, RESERVED, PRESERVED = 0, 1, 2, 3


def _stamps() -> np.ndarray:
    """The ``private`` word (u64) KHO stamps on a head page, for every order 0..255."""
    words = np.zeros(256, dtype=KHO_PAGE_INFO_DTYPE)
    words["order"], words["magic"] = np.arange(256), KHO_PAGE_MAGIC
    return words.view(np.uint64)


class _PrivateField:
    """``info["order"]`` / ``info["magic"]`` of a :class:`PagePrivate`: readable by index."""

    def __init__(self, private: "PagePrivate", name: str):
        self._private, self._name = private, name

    def __getitem__(self, idx):
        return self._private[idx][self._name]


class PagePrivate:
    """``page->private`` of ``nr_pages`` pages, zero but at the heads KHO stamped.

    Indexed like a dense :data:`KHO_PAGE_INFO_DTYPE` array for what the next kernel does
    with it: read one word (``info[idx]``, a record) or many (``info[idx_array]``,
    ``info["magic"][idx_array]``), write one (``info[idx] = 0`` or a record), and
    :meth:`stamp` many heads at once; ``np.asarray(info)`` is the dense array.  Kept as
    the stamped heads (sorted page indexes, their orders, whether cleared since) plus a
    dict of any other word written: lookups are binary searches, O(log units).
    """

    _STAMPS = _stamps()

    def __init__(self, nr_pages: int):
        self.nr_pages = nr_pages
        self._index_dtype = np.uint32 if nr_pages < 1 << 32 else np.int64
        self._index = np.empty(0, dtype=self._index_dtype)
        self._order = np.empty(0, dtype=np.uint8)
        self._cleared = np.empty(0, dtype=bool)
        self._other: dict[int, int] = {}  # page index -> word, for words that are no stamp of its head

    def __len__(self) -> int:
        return self.nr_pages

    def stamp(self, idx: np.ndarray, order: np.ndarray) -> None:
        """Stamp order + magic on the head pages ``idx`` (distinct).  O(n log n) at worst."""
        idx = np.asarray(idx).astype(self._index_dtype, copy=False)
        order = np.asarray(order, dtype=np.uint8)
        cleared = np.zeros(idx.size, dtype=bool)
        if self._index.size or self._other:  # rare: merge, the new stamps winning
            for i in np.flatnonzero(np.isin(idx, np.fromiter(self._other, np.int64, len(self._other)))).tolist():
                del self._other[int(idx[i])]
            idx = np.concatenate([self._index, idx])
            order = np.concatenate([self._order, order])
            cleared = np.concatenate([self._cleared, cleared])
        if idx.size > 1 and not (idx[1:] > idx[:-1]).all():
            sort = np.argsort(idx, kind="stable")
            idx, order, cleared = idx[sort], order[sort], cleared[sort]
            last = np.concatenate([idx[1:] != idx[:-1], [True]])
            idx, order, cleared = idx[last], order[last], cleared[last]
        self._index, self._order, self._cleared = idx, order, cleared

    def words(self, idx) -> np.ndarray:
        """The u64 words at page indexes ``idx`` (an array).  O(n log units)."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.shape == self._index.shape and np.array_equal(idx, self._index):  # every stamped head, in order
            out = np.where(self._cleared, np.uint64(0), self._STAMPS[self._order])
            for page, word in self._other.items():
                out[idx == page] = word
            return out
        pos = np.searchsorted(self._index, idx.astype(self._index_dtype))
        pos = np.minimum(pos, max(self._index.size - 1, 0))
        out = np.zeros(idx.shape, dtype=np.uint64)
        if self._index.size:
            hit = (self._index[pos] == idx) & ~self._cleared[pos]
            out[hit] = self._STAMPS[self._order[pos[hit]]]
        for page, word in self._other.items():
            out[idx == page] = word
        return out

    def __getitem__(self, key):
        if isinstance(key, str):
            return _PrivateField(self, key)
        if np.ndim(key) == 0:
            return self.words(np.array([int(key)])).view(KHO_PAGE_INFO_DTYPE)[0]
        return self.words(key).view(KHO_PAGE_INFO_DTYPE)

    def __setitem__(self, idx: int, value) -> None:
        """Write one page's word: 0, or a record / tuple ``(order, magic)``.  O(log units)."""
        idx = int(idx)
        if not 0 <= idx < self.nr_pages:
            raise IndexError(f"page index {idx} is outside the memory map")
        record = np.zeros(1, dtype=KHO_PAGE_INFO_DTYPE)
        record[0] = value
        word = int(record.view(np.uint64)[0])
        self._other.pop(idx, None)
        pos = int(np.searchsorted(self._index, idx))
        if pos < self._index.size and int(self._index[pos]) == idx:
            if word == 0 or word == int(self._STAMPS[self._order[pos]]):
                self._cleared[pos] = word == 0
                return
            self._cleared[pos] = True
        if word:
            self._other[idx] = word

    def __array__(self, dtype=None, copy=None):
        dense = np.zeros(self.nr_pages, dtype=np.uint64)
        dense[self._index[~self._cleared].astype(np.int64)] = self._STAMPS[self._order[~self._cleared]]
        for page, word in self._other.items():
            dense[page] = word
        dense = dense.view(KHO_PAGE_INFO_DTYPE)
        return dense if dtype is None else dense.astype(dtype)


class MemMap:
    """Per-page ``info`` and ``state`` arrays of a machine.  See the module docstring."""

    def __init__(self, memory: PhysicalMemory):
        self.memory = memory
        self.bank_first, self.bank_end = intervals.banks(memory)
        sizes = (self.bank_end - self.bank_first).astype(np.int64)
        self.bank_base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.nr_pages = int(sizes.sum())
        self.info = PagePrivate(self.nr_pages)
        # Written out now, as memmap_init does, not left to first touch.
        self.state = np.full(self.nr_pages, RESERVED, dtype=np.uint8)

    # -- indexing -------------------------------------------------------------------------
    def index(self, pfn) -> np.ndarray:
        """Array index of each pfn; KHOError(EINVAL) if one is outside RAM.  O(n log banks)."""
        pfn = intervals.as_u64(pfn)
        if self.bank_first.size == 1:
            if pfn.size and (pfn.min() < self.bank_first[0] or pfn.max() >= self.bank_end[0]):
                bad = pfn[(pfn < self.bank_first[0]) | (pfn >= self.bank_end[0])][0]
                raise KHOError("EINVAL", f"pfn {int(bad):#x} is outside RAM")
            return (pfn - self.bank_first[0]).view(np.int64)  # below 2**52: the same values
        bank = intervals.locate(self.bank_first, self.bank_end, pfn)
        if (bank < 0).any():
            bad = int(pfn[np.argmax(bank < 0)])
            raise KHOError("EINVAL", f"pfn {bad:#x} is outside RAM")
        return (pfn - self.bank_first[bank]).astype(np.int64) + self.bank_base[bank]

    def index_range(self, pfn: int, nr_pages: int) -> slice:
        """The array slice of pages ``[pfn, pfn + nr_pages)``; EINVAL unless inside one bank."""
        first = int(self.index([pfn])[0])
        bank = int(intervals.locate(self.bank_first, self.bank_end, [pfn])[0])
        if pfn + nr_pages > int(self.bank_end[bank]):
            raise KHOError("EINVAL", f"pages {pfn:#x}+{nr_pages} cross the end of a RAM bank")
        return slice(first, first + nr_pages)

    # -- bulk updates -----------------------------------------------------------------------
    def ranges_mask(self, start_pfn, end_pfn) -> np.ndarray:
        """A bool per page: True inside the pfn ranges.  Ranges must be disjoint (they may
        touch) and inside RAM, each within one bank.  O(pages) numpy work."""
        s, e = intervals.as_u64(start_pfn), intervals.as_u64(end_pfn)
        keep = e > s
        if not keep.all():
            s, e = s[keep], e[keep]
        toggle = np.zeros(self.nr_pages + 1, dtype=np.int8)
        if s.size:
            lo = self.index(s)
            toggle[lo] = 1
            toggle[lo + (e - s).astype(np.int64)] -= 1  # a range ending where another starts nets 0
        return np.cumsum(toggle[:-1], dtype=np.int8).view(bool)

    def mark_preserved(self, pfn, order) -> None:
        """What KHO does to each preserved unit (disjoint ``(pfn, order)``): every page's
        state becomes preserved, the head's ``info`` order + magic.  O(preserved pages)."""
        idx = self.index(pfn)
        order = np.asarray(order, dtype=np.uint8).reshape(-1)
        self.info.stamp(idx, order)
        if not order.size:
            return
        low, high = int(order.min()), int(order.max())  # two reductions: cheaper than a bincount of uint8
        present = [low] if low == high else np.flatnonzero(np.bincount(order)).tolist()
        for o in present:
            heads = idx if low == high else idx[order == o]
            pages = heads if o == 0 else (heads[:, None] + np.arange(1 << o, dtype=np.int64)).reshape(-1)
            self.state[pages] = PRESERVED

    def set_free(self, free: np.ndarray) -> None:
        """State free for every page flagged in the bool mask ``free``.  A multiply, as the
        free state is 0: several times faster than a masked assignment."""
        np.multiply(self.state, ~free, out=self.state)

    def count(self, state: int) -> int:
        """Pages in ``state``."""
        return int(np.count_nonzero(self.state == state))
