"""The kexec entry list: how the running kernel tells the relocation code what to copy where.

The list lives in *indirection pages* of real memory.  Each slot is a little-endian u64
(:data:`ENTRY_DTYPE`): a page-aligned physical address with one flag in its low bits:

* ``IND_DESTINATION`` — the next source pages go to consecutive pages from this address;
* ``IND_SOURCE`` — copy this page to the current destination, then advance it a page;
* ``IND_INDIRECTION`` — continue with the indirection page at this address;
* ``IND_DONE`` — the list ends.

An indirection page has ``page_size // 8`` slots: entries fill the first
``page_size // 8 - 1`` of them and the last is reserved for the link to the next page
(or for ``IND_DONE`` when the last page is exactly full).  ``head`` (kept by the kernel
in ``struct kimage``, outside the pages) is the ``IND_INDIRECTION`` entry of the first
page, or ``IND_DONE`` when the list is empty (segments loaded in place).

Units: every address is a physical address in bytes; ``page_size`` in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kho.errors import KHOFormatError
from kho.memory.physical import PhysicalMemory

#: Flags in the low bits of an entry (include/linux/kexec.h).
IND_DESTINATION = 0x1
IND_INDIRECTION = 0x2
IND_DONE = 0x4
IND_SOURCE = 0x8
#: One slot of an indirection page (``kimage_entry_t``, native-endian u64 on arm64).
ENTRY_DTYPE = np.dtype("<u8")

_FLAG_NAMES = {IND_DESTINATION: "DESTINATION", IND_INDIRECTION: "INDIRECTION", IND_DONE: "DONE", IND_SOURCE: "SOURCE"}


def slots_per_page(page_size: int) -> int:
    """Slots in one indirection page (512 with 4 KiB pages)."""
    return page_size // ENTRY_DTYPE.itemsize


def entries_per_page(page_size: int) -> int:
    """Entries an indirection page holds besides its link slot (511 with 4 KiB pages)."""
    return slots_per_page(page_size) - 1


def nr_indirection_pages(nr_entries: int, page_size: int) -> int:
    """Indirection pages a list of ``nr_entries`` DESTINATION/SOURCE entries needs.

    Zero for an empty list (``head`` is then ``IND_DONE``); otherwise one page per
    ``entries_per_page`` entries, the ``IND_DONE`` taking the link slot of a full last page.
    """
    if nr_entries <= 0:
        return 0
    per = entries_per_page(page_size)
    return (nr_entries + per - 1) // per


def segment_entries(dest: int, sources: np.ndarray) -> np.ndarray:
    """The entries of one segment: ``IND_DESTINATION`` of ``dest`` then one ``IND_SOURCE`` a page."""
    out = np.empty(1 + sources.size, dtype=ENTRY_DTYPE)
    out[0] = dest | IND_DESTINATION
    out[1:] = np.asarray(sources, dtype=np.uint64) | np.uint64(IND_SOURCE)
    return out


def layout_pages(entries: np.ndarray, pages: np.ndarray, page_size: int) -> tuple[int, np.ndarray]:
    """Lay ``entries`` out in indirection pages at ``pages`` (phys, in list order).

    Returns ``(head, slots)`` with ``slots`` of shape ``(len(pages), slots_per_page)``:
    the exact contents of each page.  ``len(pages)`` must equal
    :func:`nr_indirection_pages`.  O(entries).
    """
    entries = np.asarray(entries, dtype=ENTRY_DTYPE)
    pages = np.asarray(pages, dtype=np.uint64)
    n = entries.size
    need = nr_indirection_pages(n, page_size)
    if pages.size != need:
        raise ValueError(f"{n} entries need {need} indirection pages, {pages.size} given")
    slots = slots_per_page(page_size)
    per = slots - 1
    out = np.zeros((need, slots), dtype=ENTRY_DTYPE)
    if not n:
        return IND_DONE, out
    flat = np.zeros(need * per, dtype=ENTRY_DTYPE)
    flat[:n] = entries
    out[:, :per] = flat.reshape(need, per)
    out[:-1, per] = pages[1:] | np.uint64(IND_INDIRECTION)
    last = n - (need - 1) * per  # entries on the last page, 1..per
    out[-1, last] = IND_DONE  # slot ``per`` (the link slot) when the last page is full
    return int(pages[0]) | IND_INDIRECTION, out


def write_list(memory: PhysicalMemory, entries: np.ndarray, pages: np.ndarray) -> int:
    """Write the entry list into the indirection ``pages`` of ``memory``; return ``head``."""
    head, slots = layout_pages(entries, pages, memory.page_size)
    for phys, page in zip(np.asarray(pages, dtype=np.uint64).tolist(), slots):
        memory.write(phys, page.tobytes())
    return head


@dataclass(frozen=True)
class EntryWalk:
    """What the relocation code does when it follows a list.

    ``src`` / ``dst``: phys of each page copy, in list order (uint64 arrays of equal size).
    ``indirection``: phys of the indirection pages read, in order.
    ``destinations``: the values of the ``IND_DESTINATION`` entries, in order.
    """

    src: np.ndarray
    dst: np.ndarray
    indirection: np.ndarray
    destinations: np.ndarray

    @property
    def nr_copies(self) -> int:
        return int(self.src.size)


def walk_list(memory: PhysicalMemory, head: int) -> EntryWalk:
    """Follow the list from ``head`` exactly as the relocation code does, strictly.

    Rejects (KHOFormatError, field ``kimage.entry`` / ``kimage.head``, with the slot's
    physical address): an entry with no flag, several flags or stray low bits; a page
    address outside RAM; a SOURCE before any DESTINATION; an indirection page reached
    twice (a cycle); a list that runs off its last page.  Terminates after at most one
    visit per RAM page.  O(entries) numpy work, O(indirection pages) Python.
    """
    ps = memory.page_size
    low = np.uint64(ps - 1)
    if head == IND_DONE:
        empty = np.empty(0, np.uint64)
        return EntryWalk(empty, empty, empty, empty)
    if head & (ps - 1) != IND_INDIRECTION:
        raise KHOFormatError("kimage.head", f"{head:#x} is neither IND_INDIRECTION of a page nor IND_DONE")
    visited: set[int] = set()
    page = head & ~(ps - 1)
    dest: int | None = None
    src_parts, dst_parts, ind_pages, dest_values = [], [], [], []
    slots = slots_per_page(ps)
    while True:
        if page in visited:
            raise KHOFormatError("kimage.entry", "indirection page reached twice (cycle)", page)
        if not memory.in_ram(page, ps):
            raise KHOFormatError("kimage.entry", "indirection page outside RAM", page)
        visited.add(page)
        ind_pages.append(page)
        words = np.frombuffer(memory.read(page, ps), dtype=ENTRY_DTYPE)
        flags = words & low
        # Position of the first slot that ends this page's run: INDIRECTION, DONE or invalid.
        valid = (flags == IND_DESTINATION) | (flags == IND_SOURCE)
        stop = np.flatnonzero(~valid)
        end = int(stop[0]) if stop.size else slots
        run = words[:end]
        run_flags = flags[:end]
        addrs = run & ~low
        is_dest = run_flags == IND_DESTINATION
        if end:
            bad = ~memory.in_ram_array(addrs, np.full(end, ps, dtype=np.uint64))
            if bad.any():
                i = int(np.argmax(bad))
                raise KHOFormatError("kimage.entry", f"{_FLAG_NAMES[int(run_flags[i])]} page {int(addrs[i]):#x} outside RAM",
                                     page + i * ENTRY_DTYPE.itemsize)
            # Destination in force at each slot: the last DESTINATION at or before it.
            dest_pos = np.flatnonzero(is_dest)
            src_pos = np.flatnonzero(~is_dest)
            if src_pos.size:
                k = np.searchsorted(dest_pos, src_pos, side="right") - 1
                if dest is None and (k < 0).any():
                    i = int(src_pos[int(np.argmax(k < 0))])
                    raise KHOFormatError("kimage.entry", "SOURCE before any DESTINATION", page + i * ENTRY_DTYPE.itemsize)
                # Base destination of each source and how many sources precede it since that base.
                carried = np.uint64(dest if dest is not None else 0)
                base = (np.where(k >= 0, addrs[dest_pos[np.maximum(k, 0)]], carried) if dest_pos.size
                        else np.full(src_pos.size, carried, dtype=np.uint64))
                group = np.where(k >= 0, k, -1)
                first_in_group = np.r_[True, group[1:] != group[:-1]]
                idx = np.arange(src_pos.size)
                start_idx = np.maximum.accumulate(np.where(first_in_group, idx, 0))
                offset = (idx - start_idx).astype(np.uint64)
                dst_parts.append(base + offset * np.uint64(ps))
                src_parts.append(addrs[src_pos])
                last_dst = int(dst_parts[-1][-1])
            dest_values.append(addrs[is_dest])
            # The destination carried into the next page: after the last entry of this run.
            if src_pos.size and (not dest_pos.size or src_pos[-1] > dest_pos[-1]):
                dest = last_dst + ps
            elif dest_pos.size:
                dest = int(addrs[dest_pos[-1]])
        if end == slots:
            raise KHOFormatError("kimage.entry", "list runs past the end of an indirection page", page + (slots - 1) * ENTRY_DTYPE.itemsize)
        entry = int(words[end])
        flag = entry & (ps - 1)
        where = page + end * ENTRY_DTYPE.itemsize
        if flag == IND_DONE and entry == IND_DONE:
            break
        if flag == IND_INDIRECTION:
            page = entry & ~(ps - 1)
            continue
        raise KHOFormatError("kimage.entry", f"invalid entry {entry:#x}", where)
    return EntryWalk(_cat(src_parts), _cat(dst_parts), np.array(ind_pages, dtype=np.uint64), _cat(dest_values))


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.uint64) if parts else np.empty(0, np.uint64)
