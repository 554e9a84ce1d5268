"""Preservation-map encodings: the kernel's kho-v1 and kho-v2 and the competing ones.

:func:`load_all` imports every encoding module so that each registers itself; see
:mod:`kho.encodings.base` for the interface.
"""

from __future__ import annotations

import importlib
import pkgutil

from kho.encodings.base import (
    ENCODINGS,
    DecodedMap,
    EncodedMap,
    Encoding,
    encoding_for_compatible,
    get_encoding,
    register,
)

__all__ = ["ENCODINGS", "DecodedMap", "EncodedMap", "Encoding", "encoding_for_compatible", "get_encoding", "load_all", "register"]

_loaded = False


def load_all() -> dict:
    """Import every module of this package once, registering its encodings; the registry."""
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True
    return ENCODINGS
