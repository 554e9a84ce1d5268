"""Assembling a modelled machine: RAM, the running kernel's own memory, scratch areas,
and a page allocator for the running kernel."""

from __future__ import annotations

from dataclasses import dataclass

from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.scratch import DEFAULT_KERNEL_IMAGE, KernelRegion, ScratchSpec, kernel_regions, place_scratch
from kho.memory.physical import PhysicalMemory


@dataclass
class Machine:
    """A booted first kernel: its memory, own regions, scratch areas and allocator."""

    memory: PhysicalMemory
    kernel_regions: list[KernelRegion]
    allocator: PageAllocator

    @classmethod
    def boot(cls, ram_size: int, page_size: int = 4096, kho_scratch: str = "200%", seed: int = 0,
             kernel_image: int = DEFAULT_KERNEL_IMAGE, banks=None) -> "Machine":
        """A machine with ``ram_size`` bytes in one bank at 0 (or the given ``banks``), whose
        first kernel reserved its image and memory map and placed the scratch areas."""
        memory = PhysicalMemory(banks, page_size) if banks else PhysicalMemory.single_bank(ram_size, page_size)
        regions = kernel_regions(memory, kernel_image)
        place_scratch(memory, ScratchSpec.parse(kho_scratch), regions)
        allocator = PageAllocator(memory, [(r.phys, r.size) for r in regions], seed=seed)
        return cls(memory, regions, allocator)
