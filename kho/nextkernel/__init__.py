"""The next kernel after a KHO kexec: memblock, the memory map, the buddy free lists
rebuilt around preserved memory, and the restore API.

* :func:`boot` — boot on the memory a handover left (``path="memblock"`` or
  ``"instructions"``), returning a :class:`NextKernel`;
* :class:`NextKernel` — ``restore_folio``, ``restore_pages``, ``retrieve_subtree``,
  ``leaked``, ``report``, and ``allocator``, a :class:`BuddyAllocator` usable as the
  allocator of a new :class:`kho.handover.outgoing.KHO` (chained kexecs);
* :class:`Memblock` — the early allocator's region lists and merge rules.
"""

from kho.nextkernel.boot import PATHS, NextKernel, boot
from kho.nextkernel.buddy import BuddyAllocator
from kho.nextkernel.memblock import Memblock, MemblockFlag
from kho.nextkernel.restore import IncomingKHO

__all__ = ["PATHS", "BuddyAllocator", "IncomingKHO", "Memblock", "MemblockFlag", "NextKernel", "boot"]
