"""Transitional page tables: counted by building them, written in memory, walked like the MMU."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho.currentkernel.pagealloc import PageAllocator
from kho.errors import KHOError
from kho.kexec import transpgd as T
from kho.memory.physical import Bank, PhysicalMemory

GiB, MiB = 1 << 30, 1 << 20


def test_8gib_page_granular_is_about_16mib():
    plan = T.plan_linear_map([(0, 8 * GiB)], 4096, "page")
    # 4096 last-level tables (one per 2 MiB), 8 level-2, one level-1, the root.
    assert plan.tables_by_level() == {0: 1, 1: 1, 2: 8, 3: 4096}
    assert plan.table_bytes == 4106 * 4096
    assert abs(plan.table_bytes / MiB - 16) < 0.1


def test_8gib_block_mappings_are_a_few_pages():
    assert T.plan_linear_map([(0, 8 * GiB)], 4096, "block").nr_tables == 2
    assert T.plan_linear_map([(0, 8 * GiB)], 4096, "pmd").nr_tables == 10  # one level-2 table a GiB
    assert T.idmap_pages_needed(4096) == 4


def test_unaligned_bank_needs_edge_tables():
    plan = T.plan_linear_map([(2 * GiB + 4096, 2 * GiB - 8192)], 4096, "block")
    leaves = plan.leaves_by_level()
    assert leaves[3] == 2 * 511  # unaligned pages at both edges
    assert plan.tables_by_level()[3] == 2


@pytest.mark.parametrize("page_size, levels", [(4096, 4), (16384, 4), (65536, 3)])
def test_granules(page_size, levels):
    g = T.Granule(page_size)
    assert g.levels == levels
    plan = T.plan_linear_map([(0, 8 * GiB)], page_size, "page")
    entries_per_table = page_size // 8
    assert plan.tables_by_level()[3] == 8 * GiB // page_size // entries_per_table


def test_unknown_linear_map():
    with pytest.raises(KHOError):
        T.plan_linear_map([(0, GiB)], 4096, "huge")


def brute_force_tables(banks, page_size, linear_map):
    """Independent count: enumerate every page's VA and the leaf level the kernel would use."""
    g = T.Granule(page_size)
    memstart = min(s for s, _ in banks) // T.MEMSTART_ALIGN[page_size] * T.MEMSTART_ALIGN[page_size]
    blocks = g.block_levels(linear_map)
    tables = {level: set() for level in range(g.root_level, 4)}
    tables[g.root_level].add(0)
    for start, size in banks:
        for pa in range(start, start + size, page_size):
            lva = pa - memstart
            leaf = 3
            for level in blocks:
                bs = 1 << g.shift(level)
                lo = lva - lva % bs
                if lo >= start - memstart and lo + bs <= start + size - memstart:
                    leaf = level
                    break
            for level in range(g.root_level + 1, leaf + 1):
                tables[level].add(lva >> g.shift(level - 1))
    return {level: len(ids) for level, ids in tables.items()}


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 24)), min_size=1, max_size=3),
       st.sampled_from(["page", "pmd", "block"]))
def test_plan_matches_brute_force(chunks, linear_map):
    # Banks in units of 1 MiB so blocks and edges both occur; disjoint by construction.
    banks, pos = [], 0
    for gap, size in chunks:
        pos += gap * MiB
        banks.append((pos + 4096 * (gap % 3), size * MiB))
        pos += size * MiB + 4096 * 3
    plan = T.plan_linear_map(banks, 4096, linear_map)
    assert plan.tables_by_level() == brute_force_tables(banks, 4096, linear_map)


def build_small(linear_map, banks=((0, 64 * MiB),), page_size=4096):
    memory = PhysicalMemory([Bank(s, z) for s, z in banks], page_size)
    alloc = PageAllocator(memory, seed=1)
    code = alloc.alloc_pages(0)
    trans = T.build(memory, lambda n: alloc.alloc_many(n, 0), linear_map, code)
    return memory, alloc, code, trans


@pytest.mark.parametrize("linear_map", ["page", "pmd", "block"])
@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
def test_every_ram_page_translates_to_itself(linear_map, page_size):
    banks = ((0, 1 << 30), (3 << 30, 64 * MiB)) if linear_map == "block" else ((0, 96 * MiB), (2 << 30, 64 * MiB))
    memory, alloc, code, trans = build_small(linear_map, banks, page_size)
    assert trans.nr_pages == trans.plan.nr_tables + T.Granule(page_size).levels
    pa = np.concatenate([np.arange(b.start, b.end, page_size, dtype=np.uint64) for b in memory.banks])
    pa = pa + np.uint64(123)  # an offset inside each page
    walker = trans.linear_walker()
    assert (walker.translate(trans.linear_va(pa)) == pa).all()
    assert trans.idmap_walker().translate(np.array([code + 5], dtype=np.uint64))[0] == code + 5


def test_unmapped_address_faults():
    memory, alloc, code, trans = build_small("page")
    with pytest.raises(T.TranslationFault):
        trans.linear_walker().translate(trans.linear_va(np.array([128 * MiB], dtype=np.uint64)))
    with pytest.raises(T.TranslationFault):
        trans.idmap_walker().translate(np.array([code + 4096], dtype=np.uint64))
    with pytest.raises(T.TranslationFault):  # a TTBR0 address given to the TTBR1 walk
        trans.linear_walker().translate(np.array([0x1000], dtype=np.uint64))


def test_corrupted_descriptor_faults():
    memory, alloc, code, trans = build_small("page")
    pte = int(trans.plan.tables[3].size)
    assert pte == 32
    # Clear the first entry of the first last-level table: page 0 becomes unmapped.
    first_pte_table = int(trans.linear_pages[-pte])
    memory.write(first_pte_table, bytes(8))
    with pytest.raises(T.TranslationFault, match="level-3"):
        trans.linear_walker().translate(trans.linear_va(np.array([0], dtype=np.uint64)))


def test_descriptors_are_arm64_shaped():
    memory, alloc, code, trans = build_small("block", ((0, 2 << 30),))
    root = np.frombuffer(memory.read(trans.ttbr1, 4096), dtype="<u8")
    assert root[0] & 3 == 3  # table descriptor
    pud = np.frombuffer(memory.read(int(root[0]) & ~0xFFF, 4096), dtype="<u8")
    assert pud[0] & 3 == 1 and pud[1] & 3 == 1  # two 1 GiB blocks
    assert int(pud[1]) & ((1 << 48) - 1) & ~0xFFF == 1 << 30
    d = int(pud[0])
    assert d & T.DESC_AF and d & T.DESC_UXN and d & T.DESC_PXN
