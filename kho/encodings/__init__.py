"""Preservation-map encodings: the kernel's kho-v1 and kho-v2 and the competing ones.

:func:`load_all` imports every encoding module so that each registers itself; see
:mod:`kho.encodings.base` for the interface and :mod:`kho.encodings.common` for the toolkit
every encoding uses.
"""

from __future__ import annotations

from kho.encodings.base import (
    ENCODINGS,
    DecodedMap,
    EncodedMap,
    Encoding,
    encoding_for_compatible,
    get_encoding,
    known_compatibles,
    load_all,
    register,
)

__all__ = ["ENCODINGS", "DecodedMap", "EncodedMap", "Encoding", "encoding_for_compatible", "get_encoding",
           "known_compatibles", "load_all", "register"]
