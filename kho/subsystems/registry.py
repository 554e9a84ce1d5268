"""The sub-node readers by KHO sub-node name, for whoever walks a KHO root FDT.

A 7.3 kernel's sub-nodes carry no compatible in the root FDT: the name says what the blob
is (the blob itself then carries its own version: ``luo-v5``, ``memblock-v1``,
``kho-test-v1``, ``version`` 1).  :func:`read_subnode` decodes a known one and returns None
for a name it does not know.  O(the reader's cost).
"""

from __future__ import annotations

from collections.abc import Callable

from kho.abi.kexec_metadata import KHO_METADATA_NODE_NAME
from kho.abi.luo import LUO_KHO_ENTRY_NAME
from kho.abi.memblock import MEMBLOCK_KHO_FDT
from kho.abi.test_kho import KHO_TEST_FDT
from kho.subsystems.kexec_metadata import read_kexec_metadata
from kho.subsystems.kho_test import read_kho_test
from kho.subsystems.luo import read_luo
from kho.subsystems.memblock import read_memblock

#: ``reader(memory, phys, size, *, strict)`` of each sub-node name a 7.3 kernel writes.
SUBNODE_READERS: dict[str, Callable] = {
    KHO_METADATA_NODE_NAME: read_kexec_metadata,
    MEMBLOCK_KHO_FDT: read_memblock,
    KHO_TEST_FDT: read_kho_test,
    LUO_KHO_ENTRY_NAME: read_luo,
}


def read_subnode(memory, name: str, phys: int, size: int, *, strict: bool = True):
    """The decoded blob of sub-node ``name`` (``preserved-data`` ``phys``, ``blob-size``
    ``size``), or None when ``name`` is not one kho knows.  Malformed blobs raise
    KHOFormatError as their reader does."""
    reader = SUBNODE_READERS.get(name)
    return None if reader is None else reader(memory, phys, size, strict=strict)
