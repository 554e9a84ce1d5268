"""Sizes for people: parsing (the CLI's and the kernel's ``memparse`` rules) and the one
formatter every command and report prints bytes with (:func:`format_size`, binary units).
JSON output keeps exact byte counts."""

from __future__ import annotations

import re

from kho.errors import KHOError

_BINARY_SUFFIX = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_USER_SIZE = re.compile(r"\s*(0[xX][0-9a-fA-F]+|\d+)\s*([kKmMgGtTpPeE]?)(i?[bB])?\s*")


def parse_size(text: str) -> int:
    """Bytes in a size such as ``4096``, ``0x1000``, ``64M``, ``16GiB``, ``1T``, ``512KB``.

    Suffixes K/M/G/T/P/E (optionally followed by ``iB`` or ``B``) are binary, as the
    kernel's and most tools' are.  Raises KHOError(EINVAL) on anything else.
    """
    match = _USER_SIZE.fullmatch(text)
    if not match:
        raise KHOError("EINVAL", f"invalid size {text!r} (examples: 4096, 0x1000, 64M, 16GiB)")
    number, suffix, _ = match.groups()
    return int(number, 0) << _BINARY_SUFFIX[suffix.upper()]


#: Binary units, largest first, as format_size prints them.
_UNITS = (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10))


def format_size(n: int | float | None, digits: int = 1) -> str:
    """``n`` bytes in the largest binary unit it reaches: exact and without decimals when it
    is a whole number of that unit (``64 GiB``, ``512 KiB``, ``47 MiB``), else with ``digits``
    decimals (``48.3 MiB``); below 1 KiB in bytes (``512 B``); ``-`` for None.  O(1)."""
    if n is None:
        return "-"
    sign, n = ("-", -n) if n < 0 else ("", n)
    for unit, shift in _UNITS:
        if n >= 1 << shift:
            if n == int(n) and int(n) % (1 << shift) == 0:
                return f"{sign}{int(n) >> shift:,} {unit}"
            return f"{sign}{n / (1 << shift):,.{digits}f} {unit}"
    return f"{sign}{n:,.0f} B" if n != int(n) else f"{sign}{int(n):,} B"


def kernel_strtoull_base0(text: str) -> tuple[int, int]:
    """The kernel's ``simple_strtoull(s, &end, 0)``: value and characters consumed.

    Base 16 after ``0x``/``0X``, base 8 after a leading ``0``, else base 10; consumes
    the longest prefix of valid digits (0 characters when there is none).
    """
    i, base = 0, 10
    if text[:2].lower() == "0x" and len(text) > 2 and text[2] in "0123456789abcdefABCDEF":
        i, base = 2, 16
    elif text[:1] == "0":
        base = 8
    start = i
    digits = "0123456789abcdef"[:base]
    while i < len(text) and text[i].lower() in digits:
        i += 1
    if i == start:
        return 0, 0
    return int(text[start:i], base), i


def memparse(text: str) -> tuple[int, int]:
    """The kernel's ``memparse``: a number in base 0 with an optional K/M/G/T/P/E suffix.

    Returns ``(bytes, characters consumed)``; 0 characters consumed means no number.
    """
    value, used = kernel_strtoull_base0(text)
    if used and used < len(text) and text[used].upper() in "KMGTPE":
        value <<= _BINARY_SUFFIX[text[used].upper()]
        used += 1
    return value, used
