"""The running kernel's KHO subsystem: preserve memory, register sub-trees, hand over.

Two models, chosen by the kernel version (``kernel=``, :mod:`kho.abi.versions`):

* **Linux 7.1 and later (stateless)**: a :class:`~kho.currentkernel.radix_tracker.RadixTracker`
  is tracker and map at once; the root FDT page is allocated and preserved when KHO starts
  (an order-0 unit at its own address) and kept live: every :meth:`KHO.add_subtree` /
  :meth:`KHO.remove_subtree` rewrites it as libfdt does (:meth:`~kho.devicetree.khofdt.KHOFdt.page_image`).
  :meth:`KHO.finalize` only does what kexec load does for KHO (``kho_fill_kimage``): place
  the scratch-area array as a segment at the top of the first scratch area that holds it,
  64 KiB aligned, and say where everything is.  It may be called again; nothing freezes.
* **Linux 6.16 .. 7.0, and kho's encoding comparisons** (an ``encoding`` given without a
  ``kernel``): a :class:`~kho.currentkernel.tracker.Tracker` of per-order bitmaps;
  :meth:`KHO.finalize` freezes it, has the encoding write the map (metadata pages from the
  allocator), builds the root FDT and writes it and the scratch-area array into freshly
  allocated pages.  The FDT is not preserved, as in 6.16: the next kernel reads it (like
  the map's pages) before anything can overwrite it.  The root FDT must fit in one page for
  the kernel ABIs; for kho's other encodings (whose root properties may be large) it may
  take up to a MAX_PAGE_ORDER block.

Either way :meth:`KHO.finalize` returns a :class:`Handover`: where everything is, for kexec
(``boot_dtb()``) and for a handover image (``pages_to_keep()``).  ``add_blob`` allocates a
zeroed block of ``2**order`` pages like ``kho_alloc_preserve`` (E2BIG above MAX_PAGE_ORDER),
preserves it and adds a sub-tree pointing at it with the blob's size in ``blob-size``.

The allocator is anything with :class:`~kho.currentkernel.pagealloc.PageAllocator`'s
``alloc_pages(order)`` and ``free_pages(phys, order)``: the first kernel's page allocator
or, for a chained kexec, the next kernel's buddy allocator.

Every failing call changes nothing: pages taken are freed and writes discarded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kho.abi.kexec_handover import KHO_FDT_MEMORY_MAP_PROP_NAME
from kho.abi.versions import DEFAULT_KERNEL, KernelVersion, kernel_version
from kho.currentkernel.radix_tracker import RadixTracker
from kho.currentkernel.tracker import Tracker
from kho.devicetree import KERNEL_COMPATIBLES, ChosenKHO, KHOFdt, build_boot_dtb
from kho.devicetree.layout import pack_u64
from kho.encodings import EncodedMap, get_encoding
from kho.errors import KHOError
from kho.handover.scratch_array import kernel_order, pack_scratch_array, write_scratch_array
from kho.handover.x86_boot_params import build_params_segment, params_segment_size
from kho.memory.physical import PhysicalMemory


def order_for(size: int, page_size: int) -> int:
    """The smallest order whose block (``page_size << order`` bytes) holds ``size`` bytes (get_order)."""
    pages = max(1, -(-size // page_size))
    return (pages - 1).bit_length()


#: The architectures whose handoff kho models.
ARCH_ARM64, ARCH_X86_64 = "arm64", "x86_64"
ARCHES = (ARCH_ARM64, ARCH_X86_64)


@dataclass(frozen=True)
class Handover(ChosenKHO):
    """A finalized handover: where the next kernel finds everything (bytes, physical addresses).

    The :class:`~kho.devicetree.chosen.ChosenKHO` fields: ``fdt_size`` is the FDT's
    allocation (one page for the kernel ABIs), ``scratch_size`` the array's length (16 bytes
    per area).  ``encoded`` is what the encoding wrote.
    """

    memory: PhysicalMemory
    encoding: str
    options: dict
    encoded: EncodedMap
    subtrees: dict[str, int] = field(default_factory=dict)
    #: The next kernel's architecture: arm64 (a boot DTB's /chosen) or x86_64 (setup_data).
    arch: str = ARCH_ARM64

    def params_segment(self, phys: int) -> bytes:
        """x86_64: the kexec params segment (zero page + SETUP_KEXEC_KHO node) for destination ``phys``."""
        return build_params_segment(self.memory, phys, self)

    def params_spot(self) -> int:
        """x86_64: where kexec would load the params segment: the lowest page-aligned fit in the
        scratch areas (kernel order, as ``kexec_locate_mem_hole`` walks them) off every page
        the next kernel must read (scratch holds no preserved unit).  EADDRNOTAVAIL when none fits.
        O(areas + kept pages)."""
        ps, need = self.memory.page_size, -(-params_segment_size() // self.memory.page_size)
        keep = self.pages_to_keep()
        for area in kernel_order(self.memory.scratch):
            page = area.addr
            while page + need * ps <= area.end:
                span = np.arange(page, page + need * ps, ps, dtype=np.uint64)
                if not np.isin(span, keep).any():
                    return page
                page += ps
        raise KHOError("EADDRNOTAVAIL", "no scratch area has room for the x86 params segment")

    def boot_dtb(self) -> bytes:
        """A boot DTB whose ``/chosen`` points at the KHO FDT and the scratch array."""
        return build_boot_dtb(self.fdt_phys, self.fdt_size, self.scratch_phys, self.scratch_size)

    def kho_fdt(self) -> KHOFdt:
        """The KHO FDT read back from memory (validated as the next kernel would)."""
        return KHOFdt.from_dtb(self.memory.read(self.fdt_phys, self.fdt_size), self.encoded.compatible,
                               page_size=self.memory.page_size)

    def pages_to_keep(self) -> np.ndarray:
        """Sorted phys (uint64) of every page the next kernel must read besides preserved
        memory: the FDT's pages, the scratch array's pages and the map's metadata pages."""
        ps = self.memory.page_size
        fdt_pages = np.arange(self.fdt_phys, self.fdt_phys + self.fdt_size, ps, dtype=np.uint64)
        scratch_pages = np.arange(self.scratch_phys // ps * ps, self.scratch_phys + self.scratch_size, ps, dtype=np.uint64)
        return np.unique(np.concatenate([fdt_pages, scratch_pages, self.encoded.metadata_pages.astype(np.uint64)]))


class RecordingAllocator:
    """The allocator an encoding writes its map with during :meth:`KHO.finalize`: forwards
    ``alloc_pages`` / ``free_pages`` and remembers the contents every block it hands out had
    (kept only when not all zeros), so a failed finalize puts them back (:meth:`restore`)
    instead of leaving the map's half-written pages or zeros.  O(bytes allocated)."""

    def __init__(self, allocator, memory: PhysicalMemory):
        self.allocator = allocator
        self.memory = memory
        self._before: list[tuple[int, int, bytes | None]] = []  # (phys, bytes, old contents or None for zeros)

    def alloc_pages(self, order: int) -> int:
        phys = self.allocator.alloc_pages(order)
        size = self.memory.page_size << order
        data = self.memory.read(phys, size)
        self._before.append((phys, size, None if data.count(0) == size else data))
        return phys

    def free_pages(self, phys: int, order: int) -> None:
        self.allocator.free_pages(phys, order)

    def restore(self) -> None:
        """Give every block handed out its contents from before (latest first).  O(bytes)."""
        for phys, size, data in reversed(self._before):
            self.memory.discard(phys, size)
            if data is not None:
                self.memory.write(phys, data)
        self._before.clear()


#: Alignment of the scratch-array kexec segment (``kho_fill_kimage``: "makes it easier to map").
SCRATCH_ARRAY_ALIGN = 64 << 10


class KHO:
    """The current kernel's KHO: a tracker, sub-trees, and :meth:`finalize`.

    ``kernel``: the version modelled (``"6.16"`` .. ``"7.3"``, see :mod:`kho.abi.versions`);
    ``encoding``: a registered encoding name (kho-v1 .. kho-v4, maple, ranges, ...), by
    default the one ``kernel`` writes, with ``encoding_options`` (e.g. ``bitmap_bytes=512``
    for kho-v1).  Neither given: the default kernel (:data:`~kho.abi.versions.DEFAULT_KERNEL`).
    An encoding given without a kernel: kho's encode-at-finalize model with a 6.16 tracker.
    The stateless (live) model runs when the kernel is 7.1 or later and the encoding is the
    one it writes.  ``preserve_bits`` (6.16-style tracker) and ``strict`` configure the tracker.
    """

    def __init__(self, memory: PhysicalMemory, allocator, encoding: str | None = None, *, kernel: str | None = None,
                 arch: str = ARCH_ARM64, preserve_bits: int | str | None = None, strict: bool = True, **encoding_options):
        if arch not in ARCHES:
            raise KHOError("EINVAL", f"unknown architecture {arch!r} (one of {', '.join(ARCHES)})")
        self.memory = memory
        self.allocator = allocator
        self.arch = arch
        self.kernel: KernelVersion | None = (kernel_version(DEFAULT_KERNEL if kernel is None else kernel)
                                             if kernel is not None or encoding is None else None)
        if encoding is None:
            encoding = self.kernel.compatible
        writes_it = self.kernel is not None and encoding == self.kernel.compatible
        if writes_it and self.kernel.radix_depth_fix is not None:
            encoding_options.setdefault("depth_fix", self.kernel.radix_depth_fix)
        if writes_it and self.kernel.preserve_bits is not None:
            encoding_options.setdefault("bitmap_bytes", self.kernel.bitmap_bytes(memory.page_size))
            preserve_bits = self.kernel.preserve_bits if preserve_bits is None else preserve_bits
        self.encoding = get_encoding(encoding, memory.page_size, **encoding_options)
        self.live = writes_it and self.kernel.stateless
        self._subtrees: list[tuple[str, int, int | None]] = []  # in the order added
        self._blobs: dict[str, tuple[int, int]] = {}  # name -> (phys, order) of add_blob blocks
        self.handover: Handover | None = None
        if self.encoding.compatible in KERNEL_COMPATIBLES:
            self.fdt_max_size = memory.page_size
        else:
            self.fdt_max_size = memory.page_size << memory.geometry.max_order
        if not self.live:
            self.tracker = Tracker(memory, "page" if preserve_bits is None else preserve_bits, strict=strict)
            self._fdt = self._new_fdt({KHO_FDT_MEMORY_MAP_PROP_NAME: pack_u64(0)})  # names and size as sub-trees come
            return
        # kho_init: the radix root, then the FDT page (kho_alloc_preserve), then the FDT in it.
        self.tracker = RadixTracker(memory, allocator, strict=strict, depth_fix=self.encoding.depth_fix)
        try:
            self.fdt_phys = allocator.alloc_pages(0)
        except KHOError:
            allocator.free_pages(self.tracker.root_phys, 0)
            raise
        try:
            self.tracker.preserve_folio(self.fdt_phys, 0)
        except KHOError:
            allocator.free_pages(self.fdt_phys, 0)
            allocator.free_pages(self.tracker.root_phys, 0)
            raise
        self._fdt = self._new_fdt({KHO_FDT_MEMORY_MAP_PROP_NAME: pack_u64(self.tracker.root_phys)})
        self._write_live_fdt()

    def _write_live_fdt(self) -> None:
        """Write the live FDT's page as libfdt leaves it.  O(page)."""
        self.memory.write(self.fdt_phys, self._fdt.page_image())

    # -- sub-trees ---------------------------------------------------------------------------
    def _new_fdt(self, props: dict[str, bytes]) -> KHOFdt:
        return KHOFdt(self.encoding.compatible, props, page_size=self.memory.page_size, max_size=self.fdt_max_size)

    def _check_open(self) -> None:
        if self.handover is not None and not self.live:
            raise KHOError("EBUSY", "KHO is finalized; the handover can no longer change")

    def add_subtree(self, name: str, phys: int, size: int | None = None) -> None:
        """Record sub-tree ``name`` pointing at ``phys`` (whose pages the caller preserves).
        EEXIST for a name in use, E2BIG when the FDT would outgrow its page, EBUSY after finalize."""
        self._check_open()
        self._fdt.add_subtree(name, phys, size)
        self._subtrees.append((name, phys, size))
        if self.live:
            self._write_live_fdt()

    def remove_subtree(self, name: str) -> None:
        """Drop sub-tree ``name`` (ENOENT if absent); a blob from :meth:`add_blob` is unpreserved and freed."""
        self._check_open()
        self._fdt.remove_subtree(name)
        self._subtrees = [s for s in self._subtrees if s[0] != name]
        if self.live:
            self._write_live_fdt()
        blob = self._blobs.pop(name, None)
        if blob is not None:
            phys, order = blob
            self.tracker.unpreserve_folio(phys, order)
            self.allocator.free_pages(phys, order)

    def add_blob(self, name: str, data: bytes) -> int:
        """Allocate a zeroed block for ``data``, write it, preserve it and add sub-tree ``name``
        pointing at it (with ``blob-size``).  Returns the block's phys.  EINVAL for no data,
        E2BIG above a MAX_PAGE_ORDER block, EEXIST for a name in use."""
        self._check_open()
        data = bytes(data)
        if not data:
            raise KHOError("EINVAL", "a blob needs at least one byte")
        order = order_for(len(data), self.memory.page_size)
        if order > self.memory.geometry.max_order:
            raise KHOError("E2BIG", f"a {len(data)}-byte blob needs order {order}, above MAX_PAGE_ORDER")
        if name in self._fdt.subtrees():
            raise KHOError("EEXIST", f"sub-tree {name!r} already exists")
        phys = self.allocator.alloc_pages(order)
        size = self.memory.page_size << order
        try:
            self.tracker.preserve_folio(phys, order)
            try:
                self.add_subtree(name, phys, len(data))
            except KHOError:
                self.tracker.unpreserve_folio(phys, order)
                raise
        except KHOError:
            self.allocator.free_pages(phys, order)
            raise
        self.memory.write(phys, data + bytes(size - len(data)))
        self._blobs[name] = (phys, order)
        return phys

    # -- finalize ----------------------------------------------------------------------------
    def finalize(self) -> Handover:
        """Hand over: the stateless model places the scratch array (see the module
        docstring); the finalize model freezes the tracker, encodes the map, writes the FDT
        and the scratch array.

        EBUSY when the finalize model is already finalized; EINVAL without scratch areas;
        ENOMEM / E2BIG / EADDRNOTAVAIL leave everything as it was (the tracker open again,
        no page kept, every page the encoding took holding its previous contents again).
        """
        self._check_open()
        if not self.memory.scratch:
            raise KHOError("EINVAL", "the machine has no scratch areas to hand over")
        if self.live:
            return self._load_live()
        ps = self.memory.page_size
        taken: list[tuple[int, int]] = []  # (phys, order) allocated here
        self.tracker.finalize()
        encoded = None
        recording = RecordingAllocator(self.allocator, self.memory)
        try:
            encoded = self.encoding.encode(self.tracker, recording)
            fdt = self._new_fdt(encoded.props)
            for name, phys, size in self._subtrees:
                fdt.add_subtree(name, phys, size)
            blob = fdt.to_dtb()
            fdt_order = order_for(len(blob), ps)
            fdt_phys = self.allocator.alloc_pages(fdt_order)
            taken.append((fdt_phys, fdt_order))
            scratch = pack_scratch_array(self.memory.scratch)
            scratch_order = order_for(len(scratch), ps)
            scratch_phys = self.allocator.alloc_pages(scratch_order)
            taken.append((scratch_phys, scratch_order))
        except KHOError:
            for phys, order in taken:
                self.allocator.free_pages(phys, order)
            if encoded is not None:
                for phys in encoded.metadata_pages.tolist():
                    self.allocator.free_pages(phys, 0)
            recording.restore()
            self.tracker.finalized = False
            raise
        fdt_size = ps << fdt_order
        self.memory.write(fdt_phys, blob + bytes(fdt_size - len(blob)))
        scratch_size = write_scratch_array(self.memory, scratch_phys, self.memory.scratch)
        self.handover = Handover(fdt_phys, fdt_size, scratch_phys, scratch_size, memory=self.memory, encoding=self.encoding.name,
                                 options=self.encoding.options(), encoded=encoded, subtrees=fdt.subtrees(),
                                 arch=self.arch)
        return self.handover

    def _load_live(self) -> Handover:
        """``kho_fill_kimage``: the scratch array as a segment placed top-down, 64 KiB
        aligned, in the first scratch area (kernel order) with room off every preserved
        page; the FDT handed over as one page.  EADDRNOTAVAIL when no area has room.
        O(areas * units in them)."""
        data = pack_scratch_array(self.memory.scratch)
        phys = self._scratch_array_spot(len(data))
        self.memory.write(phys, data)
        encoded = self.encoding.encode(self.tracker, self.allocator)
        self.handover = Handover(self.fdt_phys, self.memory.page_size, phys, len(data), memory=self.memory,
                                 encoding=self.encoding.name, options=self.encoding.options(), encoded=encoded,
                                 subtrees=self._fdt.subtrees(), arch=self.arch)
        return self.handover

    def _scratch_array_spot(self, size: int) -> int:
        for area in kernel_order(self.memory.scratch):
            top = (area.end - size) // SCRATCH_ARRAY_ALIGN * SCRATCH_ARRAY_ALIGN
            while top >= area.addr:
                if not self.tracker.is_preserved_array(np.arange(top, top + size, self.memory.page_size,
                                                                 dtype=np.uint64)).any():
                    return top
                top -= SCRATCH_ARRAY_ALIGN
        raise KHOError("EADDRNOTAVAIL", f"no scratch area has room for the {size}-byte scratch array")
