"""Argument types shared by subcommands: sizes, page sizes, seeds (non-negative).  A RAM
size the host cannot model is refused by the page allocator (ENOMEM, exit 3) before
anything is allocated."""

from __future__ import annotations

import argparse
import sys

from kho.errors import KHOError
from kho.sizes import parse_size


def size_arg(text: str) -> int:
    """argparse type: a size with K/M/G/T (or KiB/MiB/...) suffix, in bytes."""
    try:
        return parse_size(text)
    except KHOError as err:
        raise argparse.ArgumentTypeError(err.message) from None


def seed_arg(text: str) -> int:
    """argparse type: a random seed, an integer from 0 to 2**64 - 1."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"seed {text} must be between 0 and 2**64 - 1")
    return value


def page_size_arg(text: str) -> int:
    """argparse type: 4096, 16384 or 65536 (suffixes allowed: 4K, 16K, 64K)."""
    value = size_arg(text)
    if value not in (4096, 16384, 65536):
        raise argparse.ArgumentTypeError(f"page size must be 4K, 16K or 64K, not {text}")
    return value


def add_machine_options(parser: argparse.ArgumentParser, ram_default: str | None = None) -> None:
    """--ram, --page-size, --kho-scratch, --seed: the modelled machine."""
    parser.add_argument("--ram", type=size_arg, required=ram_default is None, default=None if ram_default is None else parse_size(ram_default),
                        help="RAM size, one bank at 0 (e.g. 64G)" + (f"; default {ram_default}" if ram_default else ""))
    parser.add_argument("--page-size", type=page_size_arg, default=4096, help="page size: 4K (default), 16K or 64K")
    parser.add_argument("--kho-scratch", default="200%", metavar="SPEC",
                        help="kho_scratch= value: N%% of kernel-reserved memory or lowmem,global,pernode (default 200%%)")
    parser.add_argument("--seed", type=seed_arg, default=0, help="random seed (default 0)")


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    """--quiet (alias --no-progress): no progress display on stderr."""
    parser.add_argument("--quiet", "-q", "--no-progress", dest="quiet", action="store_true",
                        help="no progress display on stderr (it shows only when stderr is a terminal, never with --json)")


def show_progress(args) -> bool:
    """Whether a command shows its progress display: stderr is a terminal, no --quiet, no --json."""
    return sys.stderr.isatty() and not getattr(args, "quiet", False) and not getattr(args, "json", False)
