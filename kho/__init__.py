"""kho: a model of Linux Kexec HandOver (KHO)."""

from .errors import KHOError, KHOFormatError
from .memory import Bank, PhysicalMemory, ScratchArea
from .pagealloc import PageAllocator
from .pages import PageGeometry
from .tracker import Tracker
from .xarray import XArray

__version__ = "0.1.0"

__all__ = [
    "Bank", "KHOError", "KHOFormatError", "PageAllocator", "PageGeometry", "PhysicalMemory",
    "ScratchArea", "Tracker", "XArray", "__version__",
]
