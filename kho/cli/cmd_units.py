"""``kho units IMAGE``: the preserved units of a handover image, one ``0x%x ORDER`` line each, by address."""

from __future__ import annotations

import argparse
from typing import Iterator

import numpy as np

from kho.cli.imageio import emit
from kho.handover.imagefile import load_image

#: Lines formatted per chunk of output.
_BATCH = 1 << 16


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("units", help="list the preserved units of a handover image",
                       description="Decode the preserved-memory map of a handover image and print one "
                                   "'0xPHYS ORDER' line per unit, sorted by address.")
    p.add_argument("image", metavar="IMAGE", help="handover image (.kho)")
    p.add_argument("--lenient", action="store_true",
                   help="decode as leniently as the Linux kernel does (for maps a real kernel wrote: overlapping units, "
                        "units in scratch, orders above MAX_PAGE_ORDER; see spec/hardening.md)")
    p.set_defaults(func=run)


def unit_lines(phys: np.ndarray, order: np.ndarray) -> Iterator[str]:
    """``'0x%x %d\\n'`` lines in chunks of :data:`_BATCH` (one %-format per chunk: O(n), ~0.3 us a line)."""
    for first in range(0, phys.size, _BATCH):
        pairs = np.stack([phys[first:first + _BATCH], order[first:first + _BATCH].astype(np.uint64)], axis=1)
        yield ("%#x %d\n" * pairs.shape[0]) % tuple(pairs.ravel().tolist())


def run(args) -> int:
    decoded = load_image(args.image).decode(strict=not args.lenient)
    emit(unit_lines(decoded.phys, decoded.order))
    return 0
