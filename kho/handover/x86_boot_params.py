"""The x86_64 handoff: ``boot_params`` (the zero page) and its ``setup_data`` chain.

On x86_64 the next kernel learns where the KHO FDT and the scratch array are from a
``setup_data`` node of type ``SETUP_KEXEC_KHO`` carrying a ``struct kho_data`` (layouts:
:mod:`kho.abi.setup_data`).  kexec_file_load's bzImage loader builds one *params* segment:
the 4096-byte ``boot_params`` (its e820 table listing RAM, ``hdr.setup_data`` = phys of
the first node), then the nodes, each 16-byte aligned; the next kernel walks the chain
from ``boot_params`` (passed in ``rsi``).

:func:`build_params_segment` lays out the segment for a destination; :func:`read_handoff`
is the next kernel's side: it walks the chain (at most :data:`MAX_SETUP_DATA` nodes,
cycle-checked, every node inside RAM) and returns the KHO pointers, or None when there is
no KHO node.  Cost: O(nodes) reads of 16 + 32 bytes.
"""

from __future__ import annotations

import numpy as np

from kho.abi.setup_data import (
    BOOT_FLAG,
    BOOT_PARAMS_DTYPE,
    E820_MAX_ENTRIES_ZEROPAGE,
    E820_TYPE_RAM,
    KHO_DATA_DTYPE,
    SETUP_DATA_DTYPE,
    SETUP_HEADER_MAGIC,
    SETUP_KEXEC_KHO,
)
from kho.devicetree.chosen import ChosenKHO
from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory

#: Most ``setup_data`` nodes followed before the chain is taken as looping.
MAX_SETUP_DATA = 64
#: Alignment of each node in the params segment (bytes).
SETUP_DATA_ALIGN = 16


def _node_offset() -> int:
    """Where the first node starts in the params segment: right after ``boot_params``."""
    return -(-BOOT_PARAMS_DTYPE.itemsize // SETUP_DATA_ALIGN) * SETUP_DATA_ALIGN


def params_segment_size() -> int:
    """Bytes of the params segment: ``boot_params`` and one ``SETUP_KEXEC_KHO`` node.  O(1)."""
    return _node_offset() + SETUP_DATA_DTYPE.itemsize + KHO_DATA_DTYPE.itemsize


def build_params_segment(memory: PhysicalMemory, phys: int, chosen: ChosenKHO) -> bytes:
    """The params segment for destination ``phys``: ``boot_params`` (boot flag, "HdrS", e820
    RAM entries from ``memory``'s banks, ``hdr.setup_data``) then the ``SETUP_KEXEC_KHO``
    node with ``kho_data`` = ``chosen``.  EINVAL for more banks than the zero page's e820
    table holds.  O(banks)."""
    if len(memory.banks) > E820_MAX_ENTRIES_ZEROPAGE:
        raise KHOError("EINVAL", f"{len(memory.banks)} RAM banks do not fit the zero page's "
                                 f"{E820_MAX_ENTRIES_ZEROPAGE} e820 entries")
    params = np.zeros(1, BOOT_PARAMS_DTYPE)
    params["e820_entries"] = len(memory.banks)
    for i, bank in enumerate(memory.banks):
        params["e820_table"][0, i] = (bank.start, bank.size, E820_TYPE_RAM)
    params["hdr"]["boot_flag"] = BOOT_FLAG
    params["hdr"]["header"] = SETUP_HEADER_MAGIC
    node = phys + _node_offset()
    params["hdr"]["setup_data"] = node
    head = np.zeros(1, SETUP_DATA_DTYPE)
    head["type"], head["len"] = SETUP_KEXEC_KHO, KHO_DATA_DTYPE.itemsize
    data = np.zeros(1, KHO_DATA_DTYPE)
    data[0] = (chosen.fdt_phys, chosen.fdt_size, chosen.scratch_phys, chosen.scratch_size)
    pad = bytes(_node_offset() - BOOT_PARAMS_DTYPE.itemsize)
    return params.tobytes() + pad + head.tobytes() + data.tobytes()


def read_handoff(memory: PhysicalMemory, phys: int) -> ChosenKHO | None:
    """The KHO pointers of the ``boot_params`` at ``phys``, or None when its chain has no
    ``SETUP_KEXEC_KHO`` node.  KHOFormatError (field ``boot_params...``) for a zero page
    outside RAM, a chain that loops, runs past :data:`MAX_SETUP_DATA` nodes or leaves RAM,
    and a KHO node whose payload is not a whole ``kho_data``.  O(nodes)."""
    if not memory.in_ram(phys, BOOT_PARAMS_DTYPE.itemsize):
        raise KHOFormatError("boot_params", "the zero page is outside RAM", phys)
    params = np.frombuffer(memory.read(phys, BOOT_PARAMS_DTYPE.itemsize), BOOT_PARAMS_DTYPE)[0]
    node, seen, where = int(params["hdr"]["setup_data"]), set(), phys
    while node:
        if node in seen or len(seen) >= MAX_SETUP_DATA:
            raise KHOFormatError("boot_params.setup_data.next", f"the chain loops or passes {MAX_SETUP_DATA} nodes", where)
        seen.add(node)
        if not memory.in_ram(node, SETUP_DATA_DTYPE.itemsize):
            raise KHOFormatError("boot_params.setup_data.next", f"node {node:#x} is outside RAM", where)
        head = np.frombuffer(memory.read(node, SETUP_DATA_DTYPE.itemsize), SETUP_DATA_DTYPE)[0]
        if int(head["type"]) == SETUP_KEXEC_KHO:
            payload = node + SETUP_DATA_DTYPE.itemsize
            if int(head["len"]) != KHO_DATA_DTYPE.itemsize or not memory.in_ram(payload, KHO_DATA_DTYPE.itemsize):
                raise KHOFormatError("boot_params.setup_data.len", f"a {int(head['len'])}-byte SETUP_KEXEC_KHO payload, "
                                                                    f"not a {KHO_DATA_DTYPE.itemsize}-byte kho_data", node)
            data = np.frombuffer(memory.read(payload, KHO_DATA_DTYPE.itemsize), KHO_DATA_DTYPE)[0]
            return ChosenKHO(int(data["fdt_addr"]), int(data["fdt_size"]), int(data["scratch_addr"]),
                             int(data["scratch_size"]))
        where, node = node, int(head["next"])
    return None
