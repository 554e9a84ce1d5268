"""The interface every preservation-map encoding implements, and the registry by name.

An encoding turns the current kernel's :class:`~kho.currentkernel.tracker.Tracker` into bytes the
next kernel can read: pages written into :class:`~kho.memory.physical.PhysicalMemory` (chunks,
radix nodes, packed ranges, maple nodes, an instruction stream) and/or properties of
the KHO FDT's root node, and reads them back.

Contract:

* ``encode(tracker, allocator)`` writes into ``tracker.memory``, taking every metadata
  page from ``allocator`` (so metadata never lands in scratch or on preserved memory),
  and returns an :class:`EncodedMap`: the root FDT properties to set (``compatible`` is
  set by the caller from :attr:`Encoding.compatible`) and the metadata pages written.
* ``decode(memory, props, *, strict=True)`` reads them back from the root FDT properties
  and memory and returns a :class:`DecodedMap`.  Malformed data raises
  :class:`~kho.errors.KHOFormatError`, never another exception.
* ``strict=True`` (the default) checks everything kho guarantees about a map it wrote:
  units inside RAM, naturally aligned, at most MAX_PAGE_ORDER, disjoint and outside the
  scratch areas; metadata outside scratch and outside preserved memory; the layout the
  writer produces.  ``strict=False`` is the *kernel-compatible* mode: it accepts what a
  real kernel's reader accepts (overlapping or repeated units, units in scratch, orders
  above MAX_PAGE_ORDER, the layout variations a kernel may write) for reading maps a real
  kernel wrote.  Both modes stay safe for the host: pointers are followed only inside
  RAM, cycles and shared nodes are refused, every count is bounded by its page and all
  work and memory by the input's size.  spec/hardening.md lists every difference.
* Encodings that keep folio orders decode to exactly the units preserved.  Those that
  do not (``ranges``) decode to the greedy split of their merged ranges, with
  ``exact_orders = False``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import numpy as np

from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory


@dataclass
class EncodedMap:
    """What :meth:`Encoding.encode` wrote.

    ``props``: root FDT properties (name -> raw bytes) other than ``compatible``.
    ``metadata_pages``: phys (bytes, uint64, ascending) of every page written.
    ``options``: the encoding's options, to be recorded in a handover image.
    """

    encoding: str
    compatible: str
    props: dict[str, bytes]
    metadata_pages: np.ndarray
    page_size: int
    options: dict = field(default_factory=dict)

    @property
    def metadata_bytes(self) -> int:
        """Bytes of metadata pages (whole pages)."""
        return int(self.metadata_pages.size) * self.page_size

    @property
    def fdt_bytes(self) -> int:
        """Bytes of property values the encoding put in the FDT."""
        return sum(len(v) for v in self.props.values())

    @property
    def total_bytes(self) -> int:
        return self.metadata_bytes + self.fdt_bytes


@dataclass
class DecodedMap:
    """What :meth:`Encoding.decode` read back.

    ``phys`` (uint64, ascending) and ``order`` (uint8) are the preserved units;
    ``exact_orders`` is False when the encoding lost folio orders and the units are the
    greedy split of merged ranges.  ``metadata_pages`` lists the pages the decoder read.
    A kernel-compatible (``strict=False``) decode may return overlapping or repeated units
    (``phys`` then ascends non-strictly) and orders above MAX_PAGE_ORDER.
    """

    phys: np.ndarray
    order: np.ndarray
    exact_orders: bool
    metadata_pages: np.ndarray

    def __len__(self) -> int:
        return int(self.phys.size)

    def nr_pages(self) -> int:
        return int(np.sum(np.left_shift(1, self.order.astype(np.int64))))

    def units(self) -> list[tuple[int, int]]:
        return list(zip(self.phys.tolist(), self.order.tolist()))


class Encoding(ABC):
    """One way of writing a preservation map.  Subclasses register with :func:`register`."""

    #: Registry name (``kho-v1``, ``kho-v2``, ``ranges``, ...).
    name: ClassVar[str]
    #: The KHO FDT root ``compatible`` this encoding writes and accepts.
    compatible: ClassVar[str]
    #: Whether decoding yields the exact units (folio orders) that were preserved.
    keeps_orders: ClassVar[bool]

    def __init__(self, page_size: int = 4096, **options):
        self.page_size = page_size
        if options:
            raise KHOError("EINVAL", f"encoding {self.name} takes no options {sorted(options)}")

    def options(self) -> dict:
        """The options to record with an image (JSON/msgpack-friendly)."""
        return {}

    @abstractmethod
    def encode(self, tracker: Tracker, allocator: PageAllocator) -> EncodedMap:
        """Write the tracker's units into memory and/or FDT properties."""

    @abstractmethod
    def decode(self, memory: PhysicalMemory, props: Mapping[str, bytes], *, strict: bool = True) -> DecodedMap:
        """Read the map back; KHOFormatError on malformed data.  ``strict=False`` decodes as
        leniently as the Linux reader does (see the module docstring)."""


#: name -> Encoding subclass
ENCODINGS: dict[str, type[Encoding]] = {}
_ENCODING_MODULES_LOADED = False


def register(cls: type[Encoding]) -> type[Encoding]:
    """Class decorator adding an encoding to :data:`ENCODINGS`."""
    ENCODINGS[cls.name] = cls
    return cls


def load_all() -> dict[str, type[Encoding]]:
    """Import every module of the encodings package once, registering its encodings; the
    registry.  O(modules) the first time, O(1) after."""
    global _ENCODING_MODULES_LOADED
    if not _ENCODING_MODULES_LOADED:
        package = __name__.rsplit(".", 1)[0]
        for info in pkgutil.iter_modules([os.path.dirname(__file__)]):
            importlib.import_module(f"{package}.{info.name}")
        _ENCODING_MODULES_LOADED = True
    return ENCODINGS


def get_encoding(name: str, page_size: int = 4096, **options) -> Encoding:
    """An encoding instance by registry name; KHOError(EINVAL) for an unknown name."""
    load_all()
    try:
        cls = ENCODINGS[name]
    except KeyError:
        raise KHOError("EINVAL", f"unknown encoding {name!r} (one of {', '.join(sorted(ENCODINGS))})") from None
    return cls(page_size, **options)


def encoding_for_compatible(compatible: str) -> type[Encoding]:
    """The encoding class whose root ``compatible`` is ``compatible``; KHOFormatError if none."""
    load_all()
    for cls in ENCODINGS.values():
        if cls.compatible == compatible:
            return cls
    raise KHOFormatError("fdt.compatible", f"no encoding writes compatible {compatible!r}")


def known_compatibles() -> tuple[str, ...]:
    """Every root ``compatible`` some registered encoding reads, in registry order."""
    return tuple(dict.fromkeys(cls.compatible for cls in load_all().values()))
