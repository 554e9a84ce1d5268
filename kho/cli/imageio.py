"""What the handover-reading subcommands (``units``, ``dump``, ``boot``, ``check``, ``extract``)
share: opening what the user gave (a kho image, a memory dump, an ELF core, a debugfs
directory, or the running kernel with ``--live``) with the same options, and output."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable

from kho.cli.options import page_size_arg
from kho.dumps import DebugfsHandover, Dump, open_dump
from kho.dumps.live import KCORE_ENV, open_live
from kho.dumps.open import parse_ranges
from kho.errors import KHOError
from kho.nextkernel.dumpboot import scratch_areas


def emit(chunks: Iterable[str]) -> None:
    """Write text chunks to stdout; a reader that goes away (``| head``) ends the output quietly."""
    try:
        for chunk in chunks:
            sys.stdout.write(chunk)
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def address_arg(text: str) -> int:
    """argparse type: a physical address (``0x...`` or decimal)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address") from None


def ranges_arg(text: str) -> list[tuple[int, int]]:
    """argparse type: ``(start, size)`` ranges in bytes (see :func:`~kho.dumps.open.parse_ranges`)."""
    try:
        return parse_ranges(text)
    except KHOError as err:
        raise argparse.ArgumentTypeError(err.message) from None


def add_scratch_option(p: argparse.ArgumentParser, what: str) -> None:
    """``--scratch RANGES``: a dump's scratch areas in the kernel's order, as
    :class:`~kho.memory.physical.ScratchArea` s; ``what``: what the command does with them."""
    p.add_argument("--scratch", type=lambda text: scratch_areas(ranges_arg(text)), metavar="RANGES",
                   help="the scratch areas as ADDR+SIZE (or START-END), comma-separated, in the kernel's order "
                        f"(lowmem, global, node0, ...): {what}")


def add_path_options(p: argparse.ArgumentParser) -> None:
    """PATH (a dump, an ELF core, a kho image, a debugfs directory) or ``--live`` (the running
    kernel), one of them, and the options of opening it: ``--no-drgn``, ``--fdt``, ``--base``,
    ``--ram``, ``--page-size``."""
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("path", metavar="PATH", nargs="?",
                       help="a kho image (.kho), a raw or zstd-compressed raw memory dump, an ELF core "
                            "(QEMU dump-guest-memory, kdump vmcore) or a debugfs kho/out or kho/in directory")
    where.add_argument("--live", action="store_true",
                       help=f"the running kernel's handover: memory through /proc/kcore (root, a kernel with KHO; "
                            f"${KCORE_ENV} names another kcore-like ELF file), the KHO FDT and scratch array from "
                            f"the kernel's variables through drgn when it is installed")
    p.add_argument("--no-drgn", dest="drgn", action="store_false",
                   help="with --live: do not use drgn, scan RAM for the KHO FDT")
    p.add_argument("--fdt", type=address_arg, metavar="ADDR", help="the KHO FDT's physical address, when several decode")
    p.add_argument("--base", type=address_arg, metavar="ADDR", help="physical address of a raw dump's first byte (default 0)")
    p.add_argument("--ram", type=ranges_arg, metavar="RANGES",
                   help="RAM as START-END (inclusive, as /proc/iomem) or START+SIZE, comma-separated "
                        "(default: what the dump covers)")
    p.add_argument("--page-size", type=page_size_arg, default=None,
                   help="the dumped kernel's page size (default: what the dump says — a kdump-compressed "
                        "vmcore's block size, an ELF core's VMCOREINFO — else 4K)")


def open_path(args) -> Dump | DebugfsHandover:
    """What the user gave, opened by content (:func:`kho.dumps.open_dump`): ``args.path``
    with ``--base``, ``--ram`` and ``--page-size``, or the running kernel with ``--live``
    (:func:`~kho.dumps.live.open_live`; argparse takes one of them)."""
    if args.live:
        if args.base is not None:
            raise KHOError("EINVAL", "--live reads physical addresses from /proc/kcore (no --base)")
        return open_live(ram=args.ram, page_size=args.page_size, use_drgn=args.drgn)
    return open_dump(args.path, base=args.base, ram=args.ram, page_size=args.page_size)


def open_memory_dump(args, command: str) -> Dump:
    """:func:`open_path` for a command that needs memory: a debugfs directory (blobs only)
    is refused with KHOError(EINVAL) naming ``kho extract``."""
    source = open_path(args)
    if isinstance(source, DebugfsHandover):
        raise KHOError("EINVAL", f"{args.path}: a debugfs directory holds the FDT and blobs, no memory map to {command} "
                                 "(kho extract reads it)")
    return source
