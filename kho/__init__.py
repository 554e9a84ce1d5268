"""kho: a model of Linux Kexec HandOver (KHO)."""

from kho.currentkernel.pagealloc import PageAllocator
from kho.currentkernel.tracker import Tracker
from kho.currentkernel.xarray import XArray
from kho.errors import KHOError, KHOFormatError
from kho.memory.geometry import PageGeometry
from kho.memory.physical import Bank, PhysicalMemory, ScratchArea

__version__ = "0.1.0"

__all__ = [
    "Bank", "KHOError", "KHOFormatError", "PageAllocator", "PageGeometry", "PhysicalMemory",
    "ScratchArea", "Tracker", "XArray", "__version__",
]
