"""Output helpers shared by the image-reading subcommands (``units``, ``dump``)."""

from __future__ import annotations

import os
import sys
from typing import Iterable


def emit(chunks: Iterable[str]) -> None:
    """Write text chunks to stdout; a reader that goes away (``| head``) ends the output quietly."""
    try:
        for chunk in chunks:
            sys.stdout.write(chunk)
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
