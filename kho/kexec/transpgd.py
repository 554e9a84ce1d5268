"""arm64 transitional page tables (``trans_pgd``) for MMU-enabled kexec relocation.

At kexec *load* time the kernel copies its linear map (``trans_pgd_create_copy`` from
PAGE_OFFSET to PAGE_END) into freshly allocated pages and builds an identity map of the
page holding the relocation code (``trans_pgd_idmap_page``): nothing can be allocated
at reboot.  The copy has the shape of the kernel's own linear map over the RAM banks:

* ``page``  — page-granular, as with ``rodata_full`` (arm64's default): one last-level
  table per 2 MiB (4 KiB granule);
* ``pmd``   — 2 MiB block mappings (32 MiB with 16 KiB pages, 512 MiB with 64 KiB);
* ``block`` — the largest blocks the kernel uses: 1 GiB (4 KiB granule only) then 2 MiB,
  pages only at unaligned edges.

:func:`plan_linear_map` *builds* the set of tables such a map needs (never a ratio);
:func:`build` allocates them, writes every descriptor into
:class:`~kho.memory.physical.PhysicalMemory`, and returns a :class:`TransPgd` whose
:class:`TableWalker` translates addresses by reading those descriptors back, as the MMU
does during relocation.

Units: ``pa`` physical byte addresses; ``lva`` the low ``VA_BITS`` bits of a linear-map
virtual address (``va = PAGE_OFFSET + lva``, ``lva = pa - memstart``); levels are the
hardware's (0..3, 3 the last; a 4 KiB granule with 48-bit VAs uses 0..3, 64 KiB uses 1..3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from kho.errors import KHOError
from kho.memory import intervals
from kho.memory.geometry import PageGeometry
from kho.memory.physical import PhysicalMemory

#: Virtual address bits of the model's kernel (CONFIG_ARM64_VA_BITS_48).
VA_BITS = 48
#: Start of the linear map for 48-bit VAs.
PAGE_OFFSET = (1 << 64) - (1 << VA_BITS)
#: ARM64_MEMSTART_ALIGN by page size: the linear map's offset ``memstart`` is the first RAM
#: address rounded down to it, so block eligibility depends on physical alignment only.
MEMSTART_ALIGN = {4096: 1 << 30, 16384: 1 << 30, 65536: 1 << 29}

# Descriptor bits (VMSAv8-64 stage 1).
DESC_VALID = 1 << 0
DESC_TABLE = 1 << 1  # table descriptor at levels 0..2, page descriptor at level 3; clear = block
DESC_AP_RDONLY = 1 << 7
DESC_SH_INNER = 3 << 8
DESC_AF = 1 << 10
DESC_PXN = 1 << 53
DESC_UXN = 1 << 54
#: Attributes of the linear-map copy (PAGE_KERNEL made writable; MT_NORMAL is AttrIndx 0).
LINEAR_PROT = DESC_AF | DESC_SH_INNER | DESC_PXN | DESC_UXN
#: Attributes of the relocation code's identity mapping (PAGE_KERNEL_ROX).
IDMAP_PROT = DESC_AF | DESC_SH_INNER | DESC_AP_RDONLY | DESC_UXN
#: One descriptor: a little-endian u64.
DESC_DTYPE = np.dtype("<u8")

LINEAR_MAPS = ("page", "pmd", "block")


class TranslationFault(KHOError):
    """A relocation access the transitional tables do not map (a model or table bug)."""

    def __init__(self, message: str):
        super().__init__("EINVAL", f"translation fault: {message}")


@dataclass(frozen=True)
class Granule:
    """Page-table geometry for one page size with :data:`VA_BITS`-bit virtual addresses."""

    page_size: int = 4096
    va_bits: int = VA_BITS

    def __post_init__(self):
        PageGeometry(self.page_size)  # validates the page size

    @property
    def page_shift(self) -> int:
        return self.page_size.bit_length() - 1

    @property
    def bits_per_level(self) -> int:
        """Index bits a full table resolves (9 for 4 KiB)."""
        return self.page_shift - 3

    @property
    def levels(self) -> int:
        """Translation levels (4 for 4 KiB and 16 KiB, 3 for 64 KiB with 48-bit VAs)."""
        return -(-(self.va_bits - self.page_shift) // self.bits_per_level)

    @property
    def root_level(self) -> int:
        return 4 - self.levels

    def shift(self, level: int) -> int:
        """log2 of the bytes one entry at ``level`` maps."""
        return self.page_shift + self.bits_per_level * (3 - level)

    def entries(self, level: int) -> int:
        """Entries used in a table at ``level`` (the root may be partial)."""
        if level == self.root_level:
            return 1 << (self.va_bits - self.shift(level))
        return 1 << self.bits_per_level

    def block_levels(self, linear_map: str) -> tuple[int, ...]:
        """Levels whose entries may be blocks in ``linear_map`` (level 1 only with 4 KiB pages)."""
        if linear_map not in LINEAR_MAPS:
            raise KHOError("EINVAL", f"unknown linear map {linear_map!r} (one of {', '.join(LINEAR_MAPS)})")
        if linear_map == "page":
            return ()
        if linear_map == "pmd" or self.page_size != 4096:
            return (2,)
        return (1, 2)


@dataclass(frozen=True)
class TablePlan:
    """The tables a linear-map copy needs.

    ``runs``: ``(lva_start, lva_end, level)`` int64 arrays of leaf mappings (level 3 pages,
    2 blocks, 1 blocks).  ``tables[level]``: sorted ids of the tables at that level, a table's
    id being ``lva >> shift(level - 1)`` of what it maps (the root's is 0).
    """

    granule: Granule
    linear_map: str
    memstart: int
    run_start: np.ndarray
    run_end: np.ndarray
    run_level: np.ndarray
    tables: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def nr_tables(self) -> int:
        return sum(int(ids.size) for ids in self.tables.values())

    @property
    def table_bytes(self) -> int:
        return self.nr_tables * self.granule.page_size

    def tables_by_level(self) -> dict[int, int]:
        return {level: int(ids.size) for level, ids in sorted(self.tables.items())}

    def leaves_by_level(self) -> dict[int, int]:
        """Leaf descriptors (pages or blocks) at each level."""
        out: dict[int, int] = {}
        for s, e, level in zip(self.run_start.tolist(), self.run_end.tolist(), self.run_level.tolist()):
            out[level] = out.get(level, 0) + ((e - s) >> self.granule.shift(level))
        return dict(sorted(out.items()))


def _split_runs(start: int, end: int, granule: Granule, blocks: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Leaf runs for ``[start, end)`` (lva, page-aligned): the largest allowed blocks where
    aligned, smaller ones at the edges, as the kernel's alloc_init_pud/pmd do."""
    if start >= end:
        return []
    if not blocks:
        return [(start, end, 3)]
    level, rest = blocks[0], blocks[1:]
    size = 1 << granule.shift(level)
    lo = -(-start // size) * size
    hi = end // size * size
    if lo >= hi:
        return _split_runs(start, end, granule, rest)
    return _split_runs(start, lo, granule, rest) + [(lo, hi, level)] + _split_runs(hi, end, granule, rest)


def plan_linear_map(banks: Sequence[tuple[int, int]], page_size: int = 4096, linear_map: str = "page") -> TablePlan:
    """Build the set of tables of a linear map of ``banks`` (``(start, size)`` bytes).

    Counts by construction: the tables at each level are the distinct parents of the leaf
    and table entries below them.  O(tables) numpy work; no memory is touched.
    """
    granule = Granule(page_size)
    blocks = granule.block_levels(linear_map)
    banks = sorted((int(s), int(z)) for s, z in banks)
    if not banks:
        raise KHOError("EINVAL", "no RAM banks to map")
    memstart = banks[0][0] // MEMSTART_ALIGN[page_size] * MEMSTART_ALIGN[page_size]
    if banks[-1][0] + banks[-1][1] - memstart > 1 << (VA_BITS - 1):
        raise KHOError("EINVAL", f"RAM spans more than the {VA_BITS - 1}-bit linear map")
    runs = []
    for start, size in banks:
        runs.extend(_split_runs(start - memstart, start + size - memstart, granule, blocks))
    run_start = np.array([r[0] for r in runs], dtype=np.int64)
    run_end = np.array([r[1] for r in runs], dtype=np.int64)
    run_level = np.array([r[2] for r in runs], dtype=np.int64)
    tables = {granule.root_level: np.zeros(1, dtype=np.int64)}
    for level in range(granule.root_level + 1, 4):
        below = run_level >= level
        span = granule.shift(level - 1)
        ids = intervals.points(*intervals.normalize(run_start[below] >> span, ((run_end[below] - 1) >> span) + 1))
        tables[level] = ids
    return TablePlan(granule, linear_map, memstart, run_start, run_end, run_level, tables)


def _write_tables(memory: PhysicalMemory, plan: TablePlan, phys: dict[int, np.ndarray]) -> None:
    """Write every table of ``plan`` at ``phys[level]`` (one page per table id, same order)."""
    g = plan.granule
    oa_mask = np.uint64(((1 << 48) - 1) & ~(g.page_size - 1))
    memstart = np.uint64(plan.memstart)
    for level, ids in plan.tables.items():
        n_entries = g.entries(level)
        leaf = plan.run_level == level
        leaf_start, leaf_end = plan.run_start[leaf], plan.run_end[leaf]
        child_ids = plan.tables.get(level + 1)
        child_phys = phys.get(level + 1)
        chunk = max(1, (1 << 20) // n_entries)
        for lo in range(0, ids.size, chunk):
            rows = ids[lo:lo + chunk]
            base = rows << g.shift(level - 1) if level != g.root_level else np.zeros(1, np.int64)
            lva = base[:, None] + (np.arange(n_entries, dtype=np.int64) << g.shift(level))[None, :]
            desc = np.zeros(lva.shape, dtype=np.uint64)
            if leaf_start.size:
                i = np.searchsorted(leaf_start, lva, side="right") - 1
                mapped = (i >= 0) & (lva < leaf_end[np.maximum(i, 0)])
                kind = DESC_VALID | (DESC_TABLE if level == 3 else 0) | LINEAR_PROT
                desc[mapped] = ((lva[mapped].astype(np.uint64) + memstart) & oa_mask) | np.uint64(kind)
            if child_ids is not None and child_ids.size:
                key = lva >> g.shift(level)
                j = np.minimum(np.searchsorted(child_ids, key), child_ids.size - 1)
                has = child_ids[j] == key
                desc[has] = child_phys[j[has]] | np.uint64(DESC_VALID | DESC_TABLE)
            for p, row in zip(phys[level][lo:lo + chunk].tolist(), desc):
                memory.write(p, row.astype(DESC_DTYPE).tobytes())


def _write_idmap(memory: PhysicalMemory, granule: Granule, pages: np.ndarray, code_pa: int) -> None:
    """One table per level mapping the page at ``code_pa`` to itself (TTBR0)."""
    levels = list(range(granule.root_level, 4))
    for k, level in enumerate(levels):
        table = np.zeros(granule.page_size // DESC_DTYPE.itemsize, dtype=DESC_DTYPE)
        index = (code_pa >> granule.shift(level)) & (granule.entries(level) - 1)
        if level == 3:
            table[index] = (code_pa & ~(granule.page_size - 1)) | DESC_VALID | DESC_TABLE | IDMAP_PROT
        else:
            table[index] = int(pages[k + 1]) | DESC_VALID | DESC_TABLE
        memory.write(int(pages[k]), table.tobytes())


@dataclass(frozen=True)
class TransPgd:
    """Transitional tables written in memory: the linear-map copy (root ``ttbr1``) and the
    relocation code's identity map (root ``ttbr0``)."""

    memory: PhysicalMemory
    plan: TablePlan
    ttbr1: int
    ttbr0: int
    linear_pages: np.ndarray
    idmap_pages: np.ndarray

    @property
    def pages(self) -> np.ndarray:
        return np.r_[self.linear_pages, self.idmap_pages]

    @property
    def nr_pages(self) -> int:
        return int(self.linear_pages.size + self.idmap_pages.size)

    @property
    def bytes(self) -> int:
        return self.nr_pages * self.memory.page_size

    def linear_va(self, pa: np.ndarray) -> np.ndarray:
        """The linear-map virtual address of ``pa`` (uint64)."""
        return (np.asarray(pa, dtype=np.uint64) - np.uint64(self.plan.memstart)) + np.uint64(PAGE_OFFSET)

    def linear_walker(self) -> "TableWalker":
        return TableWalker(self.memory, self.plan.granule, self.ttbr1, upper=True)

    def idmap_walker(self) -> "TableWalker":
        return TableWalker(self.memory, self.plan.granule, self.ttbr0, upper=False)


def idmap_pages_needed(page_size: int = 4096) -> int:
    """Tables of the identity map of one page: one per translation level."""
    return Granule(page_size).levels


def build(memory: PhysicalMemory, alloc: Callable[[int], np.ndarray], linear_map: str, code_pa: int) -> TransPgd:
    """Plan, allocate (``alloc(count) -> phys array``) and write the transitional tables for
    ``memory``'s banks, plus the identity map of the page at ``code_pa``.  O(tables)."""
    plan = plan_linear_map([(b.start, b.size) for b in memory.banks], memory.page_size, linear_map)
    granule = plan.granule
    n_idmap = granule.levels
    pages = np.asarray(alloc(plan.nr_tables + n_idmap), dtype=np.uint64)
    if pages.size != plan.nr_tables + n_idmap:
        raise KHOError("ENOMEM", "not enough pages for the transitional tables")
    linear, idmap = pages[:plan.nr_tables], pages[plan.nr_tables:]
    phys, pos = {}, 0
    for level, ids in plan.tables.items():
        phys[level] = linear[pos:pos + ids.size]
        pos += ids.size
    _write_tables(memory, plan, phys)
    _write_idmap(memory, granule, idmap, code_pa)
    return TransPgd(memory, plan, int(phys[granule.root_level][0]), int(idmap[0]), linear, idmap)


class TableWalker:
    """Translate virtual addresses by reading descriptors from memory, like the MMU.

    ``upper``: a TTBR1 walk (addresses with the top ``64 - VA_BITS`` bits set) or TTBR0
    (top bits clear).  Each table page is read once and cached.  O(addresses × levels).
    """

    def __init__(self, memory: PhysicalMemory, granule: Granule, root: int, *, upper: bool):
        self.memory, self.granule, self.root, self.upper = memory, granule, root, upper
        self._tables: dict[int, np.ndarray] = {}
        self.tables_read = 0

    def _table(self, phys: int) -> np.ndarray:
        table = self._tables.get(phys)
        if table is None:
            if not self.memory.in_ram(phys, self.granule.page_size):
                raise TranslationFault(f"table at {phys:#x} is outside RAM")
            table = np.frombuffer(self.memory.read(phys, self.granule.page_size), dtype=DESC_DTYPE)
            self._tables[phys] = table
            self.tables_read += 1
        return table

    def translate(self, va: np.ndarray) -> np.ndarray:
        """Physical addresses of ``va`` (uint64 array); TranslationFault if any is unmapped."""
        g = self.granule
        va = np.asarray(va, dtype=np.uint64).reshape(-1)
        top = va >> np.uint64(g.va_bits)
        want = np.uint64((1 << (64 - g.va_bits)) - 1) if self.upper else np.uint64(0)
        if (top != want).any():
            bad = int(va[np.argmax(top != want)])
            raise TranslationFault(f"{bad:#x} is outside the {'TTBR1' if self.upper else 'TTBR0'} range")
        lva = va & np.uint64((1 << g.va_bits) - 1)
        oa_mask = np.uint64(((1 << 48) - 1) & ~(g.page_size - 1))
        out = np.zeros(va.size, dtype=np.uint64)
        table = np.full(va.size, self.root, dtype=np.uint64)
        active = np.arange(va.size)
        for level in range(g.root_level, 4):
            if not active.size:
                break
            shift = g.shift(level)
            index = ((lva[active] >> np.uint64(shift)) & np.uint64(g.entries(level) - 1)).astype(np.int64)
            desc = np.empty(active.size, dtype=np.uint64)
            tphys = table[active]
            for t in np.unique(tphys).tolist():
                sel = tphys == t
                desc[sel] = self._table(int(t))[index[sel]]
            invalid = (desc & np.uint64(DESC_VALID)) == 0
            if invalid.any():
                bad = int(va[active[np.argmax(invalid)]])
                raise TranslationFault(f"{bad:#x} has no valid level-{level} descriptor")
            is_table = (desc & np.uint64(DESC_TABLE)) != 0
            if level == 3:
                out[active] = (desc & oa_mask) | (lva[active] & np.uint64(g.page_size - 1))
                active = active[:0]
                if not is_table.all():
                    raise TranslationFault("reserved descriptor type at level 3")
                break
            leaf = ~is_table
            if leaf.any():
                if level not in (1, 2):
                    raise TranslationFault(f"block descriptor at level {level}")
                size = np.uint64(1 << shift)
                out[active[leaf]] = (desc[leaf] & oa_mask & ~(size - np.uint64(1))) | (lva[active[leaf]] & (size - np.uint64(1)))
            table[active[is_table]] = desc[is_table] & oa_mask
            active = active[is_table]
        return out
