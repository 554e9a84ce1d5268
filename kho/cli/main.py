"""Entry point of the ``kho`` console script.

Subcommands live in modules ``kho/cli/cmd_*.py``, each defining ``register(subparsers)``
that adds its parser and sets ``func`` to a callable ``func(args) -> int``.

Exit status: 0 success, 2 usage error (argparse), 3 invalid input data or a refused
operation (one line ``kho: ...`` on stderr, never a traceback; a ``MemoryError`` that
escapes is reported as ``kho: ENOMEM: ...``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from kho.errors import KHOError
from kho.version import __version__

EXIT_OK, EXIT_USAGE, EXIT_INVALID = 0, 2, 3


class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error: ``kho CMD: error: ... (kho CMD --help)``, exit 2.
    Sub-command parsers are of this class too (argparse makes them of their parent's class)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kho",
        description="Model Linux Kexec HandOver: preservation maps, their encodings, an arm64 kexec reboot and the next kernel.",
    )
    parser.add_argument("--version", action="version", version=f"kho {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules([os.path.dirname(__file__)]), key=lambda i: i.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"{__package__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args) or EXIT_OK
    except KHOError as err:
        print(f"kho: {err}", file=sys.stderr)
        return EXIT_INVALID
    except MemoryError as err:
        print(f"kho: ENOMEM: the host ran out of memory{': ' if str(err) else ''}{err}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as err:
        print(f"kho: {err.filename or ''}{': ' if err.filename else ''}{err.strerror or err}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("kho: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
