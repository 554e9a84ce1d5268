"""Reading real kernels' handovers from memory dumps and debugfs (issue 13).

:func:`open_dump` recognises a raw or zstd-compressed raw physical-memory dump, an ELF core,
a debugfs ``kho/out`` / ``kho/in`` directory or a kho handover image; :meth:`Dump.handover` finds the KHO FDT in
a dump, decodes its map and sub-nodes, and reads the scratch areas from the x86
``setup_data`` or arm64 ``/chosen`` handoff when the dump holds one; :func:`open_live` opens
the running kernel (``/proc/kcore``, and its KHO variables through drgn).
"""

from kho.dumps.debugfs import DebugfsHandover, read_debugfs
from kho.dumps.find import BootParams, DumpHandover, FdtCandidate, Handoff, SubNode, find_handover
from kho.dumps.memory import DumpMemory
from kho.dumps.live import KernelHandover, LiveDump, kernel_handover, open_live
from kho.dumps.open import Dump, ImageDump, open_dump

__all__ = ["BootParams", "DebugfsHandover", "Dump", "DumpHandover", "DumpMemory", "FdtCandidate", "Handoff",
           "ImageDump", "KernelHandover", "LiveDump", "SubNode", "find_handover", "kernel_handover", "open_dump",
           "open_live", "read_debugfs"]
