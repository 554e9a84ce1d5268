"""A sparse map from unsigned 64-bit keys to objects, built like the Linux XArray.

The Linux XArray (lib/xarray.c) is a radix tree of 64-slot nodes: each level consumes
6 bits of the index, and the tree is only as tall as the largest index needs.  An array
whose only entry is at index 0 keeps it in the head pointer with no node at all.  kho
models it to count the kernel memory a preservation tracker uses (``XA_NODE_BYTES`` a
node) and to iterate preserved bitmaps in index order, as the kernel's serializers do.

Complexities: ``load``/``store``/``erase`` O(height) with height <= 11 for 64-bit keys;
iteration O(entries + nodes).
"""

from __future__ import annotations

from typing import Any, Iterator

from kho.errors import KHOError

XA_CHUNK_SHIFT = 6
XA_CHUNK_SIZE = 1 << XA_CHUNK_SHIFT
XA_CHUNK_MASK = XA_CHUNK_SIZE - 1
#: sizeof(struct xa_node) on a 64-bit kernel: header, 64 slot pointers, 3 mark bitmaps.
XA_NODE_BYTES = 576
XA_MAX_INDEX = (1 << 64) - 1


class _Node:
    """One 64-slot node; ``count`` is the number of non-empty slots."""

    __slots__ = ("slots", "count")

    def __init__(self):
        self.slots: list[Any] = [None] * XA_CHUNK_SIZE
        self.count = 0


def _check_index(index: int) -> int:
    if not isinstance(index, int) or index < 0 or index > XA_MAX_INDEX:
        raise KHOError("EINVAL", f"XArray index {index!r} is not an unsigned 64-bit integer")
    return index


class XArray:
    """Sparse ``index -> object`` map; ``None`` is never stored (storing it erases).

    ``height`` is the number of node levels: 0 when the array is empty or holds only
    index 0 (kept in the head, as Linux does), else ``ceil(bits(max index) / 6)``.
    """

    __slots__ = ("_head", "_height", "_count", "_nodes")

    def __init__(self):
        self._head: Any = None  # an entry (height 0) or the root _Node
        self._height = 0
        self._count = 0
        self._nodes = 0

    # -- size and memory --------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    @property
    def height(self) -> int:
        return self._height

    @property
    def nr_nodes(self) -> int:
        """Number of xa_node objects the kernel would have allocated."""
        return self._nodes

    @property
    def kernel_bytes(self) -> int:
        """Modelled kernel memory: ``nr_nodes * XA_NODE_BYTES`` (bytes)."""
        return self._nodes * XA_NODE_BYTES

    def _max_index(self) -> int:
        return (1 << (XA_CHUNK_SHIFT * self._height)) - 1 if self._height else 0

    # -- lookup -----------------------------------------------------------------------
    def load(self, index: int) -> Any:
        """The entry at ``index``, or None.  O(height)."""
        _check_index(index)
        if index > self._max_index():
            return None
        if self._height == 0:
            return self._head
        node = self._head
        shift = XA_CHUNK_SHIFT * (self._height - 1)
        while shift:
            node = node.slots[(index >> shift) & XA_CHUNK_MASK]
            if node is None:
                return None
            shift -= XA_CHUNK_SHIFT
        return node.slots[index & XA_CHUNK_MASK]

    __getitem__ = load

    def __contains__(self, index: int) -> bool:
        return self.load(index) is not None

    # -- update -----------------------------------------------------------------------
    def _grow(self, index: int) -> None:
        """Make the tree tall enough for ``index`` (xas_expand): empty arrays just get
        taller; otherwise each new root takes the old head in slot 0."""
        if self._head is None:
            while index > self._max_index():
                self._height += 1
            return
        while index > self._max_index():
            root = _Node()
            self._nodes += 1
            if self._head is not None:
                root.slots[0] = self._head
                root.count = 1
            self._head = root
            self._height += 1

    def store(self, index: int, entry: Any) -> Any:
        """Store ``entry`` at ``index`` and return the old entry.  O(height)."""
        _check_index(index)
        if entry is None:
            return self.erase(index)
        self._grow(index)
        if self._height == 0:
            old, self._head = self._head, entry
            self._count += old is None
            return old
        if self._head is None:
            self._head = _Node()
            self._nodes += 1
        node = self._head
        shift = XA_CHUNK_SHIFT * (self._height - 1)
        while shift:
            slot = (index >> shift) & XA_CHUNK_MASK
            child = node.slots[slot]
            if child is None:
                child = node.slots[slot] = _Node()
                node.count += 1
                self._nodes += 1
            node = child
            shift -= XA_CHUNK_SHIFT
        slot = index & XA_CHUNK_MASK
        old = node.slots[slot]
        node.slots[slot] = entry
        if old is None:
            node.count += 1
            self._count += 1
        return old

    __setitem__ = store

    def erase(self, index: int) -> Any:
        """Remove the entry at ``index``, free emptied nodes, shrink the tree; return the old entry."""
        _check_index(index)
        if index > self._max_index() or self._head is None:
            return None
        if self._height == 0:
            old, self._head = self._head, None
            self._count -= 1
            return old
        path = []
        node = self._head
        shift = XA_CHUNK_SHIFT * (self._height - 1)
        while True:
            slot = (index >> shift) & XA_CHUNK_MASK
            path.append((node, slot))
            if not shift:
                break
            node = node.slots[slot]
            if node is None:
                return None
            shift -= XA_CHUNK_SHIFT
        leaf, slot = path[-1]
        old = leaf.slots[slot]
        if old is None:
            return None
        self._count -= 1
        for node, slot in reversed(path):
            node.slots[slot] = None
            node.count -= 1
            if node.count:
                break
            self._nodes -= 1
        else:
            self._head, self._height = None, 0
            return old
        self._shrink()
        return old

    def _shrink(self) -> None:
        """Drop root nodes whose only occupant is slot 0, as xas_shrink does."""
        while self._height:
            root = self._head
            if root.count != 1 or root.slots[0] is None:
                return
            self._head = root.slots[0]
            self._height -= 1
            self._nodes -= 1

    # -- iteration --------------------------------------------------------------------
    def items(self, start: int = 0) -> Iterator[tuple[int, Any]]:
        """``(index, entry)`` pairs with ``index >= start``, in index order."""
        _check_index(start)
        if self._head is None:
            return
        if self._height == 0:
            if start == 0:
                yield 0, self._head
            return
        yield from self._walk(self._head, XA_CHUNK_SHIFT * (self._height - 1), 0, start)

    def _walk(self, node: _Node, shift: int, base: int, start: int) -> Iterator[tuple[int, Any]]:
        first = 0
        if start > base:
            first = (start - base) >> shift
            if first > XA_CHUNK_MASK:
                return
        slots = node.slots
        for slot in range(first, XA_CHUNK_SIZE):
            child = slots[slot]
            if child is None:
                continue
            index = base + (slot << shift)
            if shift:
                yield from self._walk(child, shift - XA_CHUNK_SHIFT, index, start)
            elif index >= start:
                yield index, child

    def __iter__(self) -> Iterator[int]:
        return (index for index, _ in self.items())

    def keys(self) -> Iterator[int]:
        return iter(self)

    def values(self) -> Iterator[Any]:
        return (entry for _, entry in self.items())

    def find(self, start: int = 0) -> tuple[int, Any] | None:
        """The first ``(index, entry)`` with ``index >= start``, or None (xa_find)."""
        return next(self.items(start), None)

    def __repr__(self) -> str:
        return f"XArray(entries={self._count}, height={self._height}, nodes={self._nodes})"
