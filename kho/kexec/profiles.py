"""Platform timing profiles: the built-in ``stingray`` and user profiles from a file.

``stingray`` is fitted (:func:`kho.kexec.timing.fit_profile`) to the published reboots of
a Broadcom Stingray (arm64) — DESIGN.md §4:

* "arm64: MMU enabled kexec relocation" (Linux 5.16) cover letter: 47 MB kernel +
  initramfs, MMU off: shutdown 0.022131328 s, relocation 0.440510736 s, startup
  0.294706768 s; MMU on: 0.032066576 s, 0.022158152 s, 0.296055880 s (2.16x faster);
  memory bandwidth with caches on: 2,857 MB/s;
* "arm64: allow to reserve memory for normal kexec kernel" v2 cover letter (2019): 13 MB
  Image + 24 MB initramfs, MMU off: shutdown 0.03 s, relocation 0.35 s, startup 0.29 s.

"MB" there is read as MiB (the sizes ``ls -h`` prints), consistently for sizes and the
bandwidth.  Those reboots are taken as without purgatory hashing: their startup does not
grow with the image (0.29 s for 37 MB and 47 MB), which SHA-256 with the D-cache off
would make it do.

A user profile is a TOML or JSON file (or ``KEY=VALUE`` overrides) with any of the
parameters of :data:`kho.kexec.timing.PARAMETERS` — rates like ``"2857M/s"`` or bytes/s,
times like ``0.29`` / ``"290ms"`` — and optionally measured reboots to fit::

    name = "myboard"
    cached_copy = "2857M/s"
    [[measurement]]
    mode = "mmu-off"
    image = "47M"
    relocation = 0.44
    shutdown = 0.022      # optional
    startup = 0.29        # optional
"""

from __future__ import annotations

import json
import os
import re

import tomllib

from kho.errors import KHOError
from kho.kexec.timing import PARAMETERS, FitReport, Measurement, fit_profile
from kho.sizes import parse_size

MIB = 1 << 20

#: The published Stingray reboots (see the module docstring for sources).
STINGRAY_MEASUREMENTS = (
    Measurement("47 MB, MMU off", "mmu-off", 47 * MIB, 0.440510736, 0.022131328, 0.294706768),
    Measurement("47 MB, MMU on", "mmu-on", 47 * MIB, 0.022158152, 0.032066576, 0.296055880),
    Measurement("37 MB (13 MB Image + 24 MB initramfs), MMU off", "mmu-off", 37 * MIB, 0.35, 0.03, 0.29),
)
#: The memory bandwidth measured on Stingray with caches on (bytes/s).
STINGRAY_MEMORY_BANDWIDTH = 2857 * MIB
STINGRAY_NOTES = (
    "fitted to the Stingray reboots published with 'arm64: MMU enabled kexec relocation' (47 MB) and "
    "'arm64: allow to reserve memory for normal kexec kernel' (37 MB); MB read as MiB",
    "published reboots taken as without purgatory hashing (their startup does not grow with the image)",
)

BUILTIN = {"stingray": (STINGRAY_MEASUREMENTS, {"cached_copy": float(STINGRAY_MEMORY_BANDWIDTH)}, STINGRAY_NOTES)}

_RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*/\s*s\s*")
_TIME = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|ms|us|µs|ns)?\s*")
_SCALE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SCALE |= {unit.lower(): factor for unit, factor in _SCALE.items()}  # suffixes in either case
_TIME_SCALE = {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _parse_quantity(value, pattern: re.Pattern, scale: dict, what: str, examples: str) -> float:
    """A plain number (int, float or decimal text such as ``1e8``), or text matching
    ``pattern`` whose groups are a number and a unit key of ``scale``; KHOError(EINVAL) else."""
    if isinstance(value, bool):
        raise KHOError("EINVAL", f"invalid {what} {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    match = pattern.fullmatch(str(value))
    if not match:
        raise KHOError("EINVAL", f"invalid {what} {value!r} (examples: {examples})")
    return float(match.group(1)) * scale[match.group(2)]


def parse_rate(value) -> float:
    """Bytes per second from a number (``1e8``) or a string like ``2857M/s``, ``2.8GiB/s`` (binary suffixes)."""
    rate = _parse_quantity(value, _RATE, _SCALE, "rate", "2857M/s, 1.5GiB/s, 106000000")
    if not rate > 0 or rate == float("inf"):
        raise KHOError("EINVAL", f"a rate must be positive and finite, not {value!r}")
    return rate


def parse_time(value) -> float:
    """Seconds from a number or a string like ``0.29``, ``290ms``, ``22us``."""
    seconds = _parse_quantity(value, _TIME, _TIME_SCALE, "time", "0.29, 290ms, 22us")
    if not (seconds >= 0 and seconds != float("inf")):
        raise KHOError("EINVAL", f"a time must be finite and >= 0, not {value!r}")
    return seconds


def parse_parameter(key: str, value) -> float:
    """One profile parameter: a rate (bytes/s) or a time (s) by :data:`PARAMETERS`."""
    if key not in PARAMETERS:
        raise KHOError("EINVAL", f"unknown profile parameter {key!r} (known: {', '.join(PARAMETERS)})")
    return parse_rate(value) if PARAMETERS[key][0] == "rate" else parse_time(value)


def _size(value) -> int:
    if isinstance(value, bool):
        raise KHOError("EINVAL", f"invalid size {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return parse_size(value)
    raise KHOError("EINVAL", f"invalid size {value!r}")


def _measurement(i: int, entry) -> Measurement:
    if not isinstance(entry, dict):
        raise KHOError("EINVAL", f"measurement {i + 1} is not a table/object")
    extra = set(entry) - {"label", "mode", "image", "relocation", "shutdown", "startup"}
    if extra:
        raise KHOError("EINVAL", f"measurement {i + 1}: unknown keys {sorted(extra)}")
    for key in ("mode", "image", "relocation"):
        if key not in entry:
            raise KHOError("EINVAL", f"measurement {i + 1}: {key} is required")
    opt = {k: parse_time(entry[k]) for k in ("shutdown", "startup") if k in entry}
    return Measurement(str(entry.get("label", f"measurement {i + 1}")), str(entry["mode"]), _size(entry["image"]),
                       parse_time(entry["relocation"]), opt.get("shutdown"), opt.get("startup"))


def profile_from_mapping(data, default_name: str, overrides: dict[str, str] | None = None) -> FitReport:
    """Fit a profile described by a parsed TOML/JSON mapping (see the module docstring)."""
    if not isinstance(data, dict):
        raise KHOError("EINVAL", "a profile must be a table/object")
    extra = set(data) - set(PARAMETERS) - {"name", "measurement", "measurements", "notes"}
    if extra:
        raise KHOError("EINVAL", f"unknown profile keys {sorted(extra)} (known: name, measurement, {', '.join(PARAMETERS)})")
    raw = data.get("measurement", data.get("measurements", []))
    if not isinstance(raw, list):
        raise KHOError("EINVAL", "measurement must be a list of tables/objects")
    measurements = [_measurement(i, m) for i, m in enumerate(raw)]
    given = {k: parse_parameter(k, v) for k, v in data.items() if k in PARAMETERS}
    given.update({k: parse_parameter(k, v) for k, v in (overrides or {}).items()})
    notes = data.get("notes", ())
    notes = (notes,) if isinstance(notes, str) else tuple(str(n) for n in notes)
    return fit_profile(str(data.get("name", default_name)), measurements, given, notes)


def load_profile(spec: str, overrides: dict[str, str] | None = None) -> FitReport:
    """The built-in profile ``spec`` or the profile file at path ``spec`` (``.toml`` or JSON),
    with ``overrides`` (parameter -> text) applied; fitted, with its report.

    KHOError(EINVAL) for an unknown name or a malformed file, OSError when unreadable."""
    if spec in BUILTIN:
        measurements, given, notes = BUILTIN[spec]
        given = dict(given)
        given.update({k: parse_parameter(k, v) for k, v in (overrides or {}).items()})
        return fit_profile(spec, list(measurements), given, notes)
    if not os.path.isfile(spec):
        raise KHOError("EINVAL", f"no built-in profile or file named {spec!r} (built-in: {', '.join(BUILTIN)})")
    with open(spec, "rb") as f:
        raw = f.read()
    name = os.path.splitext(os.path.basename(spec))[0]
    try:
        text = raw.decode("utf-8")
        data = json.loads(text) if spec.endswith(".json") or text.lstrip().startswith("{") else tomllib.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise KHOError("EINVAL", f"{spec}: not a valid TOML or JSON profile: {err}") from None
    return profile_from_mapping(data, name, overrides)
