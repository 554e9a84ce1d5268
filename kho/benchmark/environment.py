"""Where a benchmark ran: CPU, cores, RAM, Python / numpy / kho versions and the date.

Recorded in every JSON result so that figures from different machines are never
mistaken for each other.  Reads ``/proc/cpuinfo`` and ``/proc/meminfo`` when present
(Linux) and falls back to :mod:`platform` elsewhere.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys

import numpy as np

from kho.version import __version__


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info() -> dict:
    """The host and versions, as a JSON-ready dict: ``cpu``, ``cores`` (usable by this
    process), ``ram_bytes`` (None when unknown), ``os``, ``python``, ``numpy``, ``kho``,
    ``date`` (UTC, ISO 8601)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "ram_bytes": _ram_bytes(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "kho": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
    }
