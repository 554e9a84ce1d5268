"""Extracting a handover into files for ``dtc``, ``fdtdump``, ``fdtget`` and ``hexdump``.

Into a directory, from a dump's handover or a debugfs directory:

* ``fdt.dtb``: the KHO FDT (``totalsize`` bytes; from debugfs, the bytes the file held, cut
  short when the kernel truncated it);
* ``sub_fdts/<node>.dtb`` or ``sub_fdts/<node>.bin``: each sub-node's blob (``.dtb`` when it
  is an FDT), named after the node as debugfs names it (characters outside the devicetree
  name set become ``_``);
* ``scratch.bin``: the ``struct kho_scratch`` array as handed over (dumps with a handoff) or
  rebuilt from debugfs ``scratch_phys``/``scratch_len``;
* ``units.txt``: the preserved units, one ``0xPHYS ORDER`` line each, by address (dumps).

Every file is written atomically (:func:`~kho.files.write_atomic`: a temporary file beside
it, fsynced, renamed), whole; host memory: the blobs.
"""

from __future__ import annotations

import os
import re

import numpy as np

from kho.abi.kexec_handover import KHO_SCRATCH_DTYPE
from kho.dumps.debugfs import DebugfsHandover
from kho.dumps.find import DumpHandover, SubNode
from kho.errors import KHOError
from kho.files import write_atomic

#: Characters kept in a file name made from a node name.
_UNSAFE = re.compile(r"[^0-9A-Za-z,._+-]")
FDT_FILE = "fdt.dtb"
SCRATCH_FILE = "scratch.bin"
UNITS_FILE = "units.txt"
SUB_FDTS_DIR = "sub_fdts"


def file_name(node: SubNode) -> str:
    """The file a sub-node's blob goes to: ``sub_fdts/`` and its name made safe, ``.dtb`` for an
    FDT else ``.bin``."""
    stem = _UNSAFE.sub("_", node.name).lstrip(".") or "_"
    return f"{SUB_FDTS_DIR}/{stem}.{'dtb' if node.format == 'fdt' else 'bin'}"


def extract(source: DumpHandover | DebugfsHandover, memory, out_dir: str | os.PathLike) -> list[str]:
    """Write the files (see the module docstring) into ``out_dir`` (created if needed);
    ``memory``: the dump's memory (None for debugfs).  Returns the paths written, in order.
    KHOError(EEXIST) when two sub-nodes would share a file name."""
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, SUB_FDTS_DIR), exist_ok=True)
    files: dict[str, bytes] = {}
    if isinstance(source, DebugfsHandover):
        files[FDT_FILE] = source.fdt_bytes
        if source.scratch:
            files[SCRATCH_FILE] = np.array([(a.addr, a.size) for a in source.scratch], KHO_SCRATCH_DTYPE).tobytes()
    else:
        files[FDT_FILE] = memory.read(source.fdt_phys, source.fdt_size)
        if source.handoff is not None and memory.in_ram(source.handoff.scratch_addr, source.handoff.scratch_size):
            files[SCRATCH_FILE] = memory.read(source.handoff.scratch_addr, source.handoff.scratch_size)
        files[UNITS_FILE] = "".join(f"{p:#x} {o}\n" for p, o in source.units()).encode("ascii")
    for node in source.subnodes:
        if node.data is None:
            continue
        name = file_name(node)
        if name in files:
            raise KHOError("EEXIST", f"sub-node {node.name!r} would overwrite {name} in {out_dir}")
        files[name] = node.data
    written = []
    for name, data in files.items():
        path = os.path.join(out_dir, name)
        write_atomic(path, data)
        written.append(path)
    return written
