"""A workload like the kernel's KHO self-test (``lib/test_kho.c``), to preserve and verify.

The running kernel allocates folios of random orders, fills them with random data and
checksums them, keeps a table of them (``phys | order`` per folio, as the self-test does,
plus the model's per-folio digest) in a *vmalloc-like area* — scattered order-0 pages
preserved page by page and described by the kernel's ``struct kho_vmalloc`` and
``kho_vmalloc_chunk`` pages (:mod:`kho.subsystems.vmalloc`) — plus a second vmalloc area of
random data, and describes all of it in a sub-FDT handed over as the blob ``kho_test``.
This is kho's own richer format under the self-test's names, the 6.16-era workload;
:mod:`kho.subsystems.kho_test` writes exactly what Linux 7.3's ``lib/test_kho.c`` writes.

After the reboot, :func:`verify` uses only what was handed over: it retrieves the
sub-FDT, restores the vmalloc areas and every folio through the next kernel's restore
API, and recomputes every checksum.

Layouts: the kernel's in :mod:`kho.abi` (``struct kho_vmalloc``, the self-test's names);
kho's own here, :data:`FOLIO_INFO_DTYPE` (a table record).  Digests are BLAKE2b-128
(:meth:`kho.memory.physical.PhysicalMemory.digest`); data is generated content
(:meth:`~kho.memory.physical.PhysicalMemory.fill_pattern`), so large workloads cost little host memory.

Units: ``phys`` bytes, ``order`` log2 pages, sizes in bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import fdt as fdtlib
import numpy as np

from kho.abi.test_kho import KHO_TEST_COMPAT, KHO_TEST_FDT, KHO_TEST_MAGIC
from kho.devicetree.flat import new_tree, parse_fdt, prop_bytes, to_dtb
from kho.errors import KHOError, KHOFormatError
from kho.memory.physical import PhysicalMemory
from kho.simulation.preserved_sets import PATTERNS, generate
from kho.subsystems.vmalloc import VmallocArea, preserve_vmalloc, read_vmalloc

#: One record of the folio table: the self-test's ``phys | order`` word and the folio's digest.
FOLIO_INFO_DTYPE = np.dtype([("phys_order", "<u8"), ("digest", "u1", 16)])
#: Bytes of a digest.
DIGEST_BYTES = 16
#: Share of the workload's bytes put in the vmalloc data area (the rest is folios).
VMALLOC_SHARE = 1 / 16


#: The default folio draw: the self-test's (see :func:`selftest_folios`).
SELFTEST = "selftest"
#: Every ``pattern`` :func:`create` accepts.
WORKLOAD_PATTERNS = (SELFTEST, *sorted(PATTERNS))


def selftest_folios(allocator, pages: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Folios as ``kho_test_generate_data`` draws them: a uniformly random order in
    0..MAX_PAGE_ORDER each, until ``pages`` pages; a folio that would overshoot takes the
    largest order below ``get_order`` of what is left.  Allocated largest orders first (so
    small folios do not fragment the big ones away), all or nothing.  Returns ``(phys,
    order)`` sorted by address.  O(folios) draws, one ``alloc_many`` per order."""
    max_order = allocator.memory.geometry.max_order
    orders, left = [], pages
    draws = rng.integers(0, max_order + 1, size=max(16, 2 * pages * (max_order + 1) // ((1 << (max_order + 1)) - 1) + 16))
    i = 0
    while left:
        order = int(draws[i]) if i < draws.size else int(rng.integers(0, max_order + 1))
        i += 1
        if (1 << order) > left:
            order = max(0, (left - 1).bit_length() - 1)
        orders.append(order)
        left -= 1 << order
    orders = np.array(orders, dtype=np.uint8)
    parts_p, parts_o = [], []
    try:
        for order in range(max_order, -1, -1):
            n = int(np.count_nonzero(orders == order))
            if n:
                parts_p.append(np.asarray(allocator.alloc_many(n, order), dtype=np.uint64))
                parts_o.append(np.full(n, order, dtype=np.uint8))
    except KHOError:
        for phys, order in zip(parts_p, parts_o):
            for p, o in zip(phys.tolist(), order.tolist()):
                allocator.free_pages(p, o)
        raise
    phys, order = np.concatenate(parts_p), np.concatenate(parts_o)
    sort = np.argsort(phys, kind="stable")
    return phys[sort], order[sort]


def _u32(value: int) -> bytes:
    return int(value).to_bytes(4, "little")


def _digest_pages(memory: PhysicalMemory, pages: np.ndarray) -> bytes:
    """Digest of the pages at ``pages`` read in that (virtual) order."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for phys in pages.tolist():
        h.update(memory.read(phys, memory.page_size))
    return h.digest()


def _vmalloc(memory: PhysicalMemory, allocator, tracker, nr_pages: int, data: bytes | None, seed: int | None,
             rng: np.random.Generator) -> VmallocArea:
    """Allocate (scattered: virtual order is not physical order), fill (``data`` or
    generated content of ``seed``) and preserve a vmalloc area of order-0 pages."""
    ps = memory.page_size
    pages = np.asarray(allocator.alloc_many(nr_pages, 0), dtype=np.uint64)
    rng.shuffle(pages)
    for i, phys in enumerate(pages.tolist()):
        if data is not None:
            memory.write(phys, data[i * ps:(i + 1) * ps].ljust(ps, b"\0"))
        else:
            memory.fill_pattern(phys, ps, seed + i)
    try:
        return preserve_vmalloc(memory, allocator, tracker, pages)
    except KHOError:
        for phys in pages.tolist():
            allocator.free_pages(phys, 0)
        raise


@dataclass
class Workload:
    """What a workload created (for cross-checking; :func:`verify` does not rely on it).

    ``folio_phys`` / ``folio_order``: the folios; ``table`` / ``data``: the vmalloc areas
    (:class:`~kho.subsystems.vmalloc.VmallocArea`);
    ``blob_phys``: the sub-FDT's block; sizes in bytes.
    """

    seed: int
    pattern: str
    folio_phys: np.ndarray
    folio_order: np.ndarray
    table: VmallocArea
    data: VmallocArea
    blob_phys: int
    blob_size: int
    csum: bytes
    data_csum: bytes
    page_size: int = 4096

    @property
    def nr_folios(self) -> int:
        return int(self.folio_phys.size)

    @property
    def folio_bytes(self) -> int:
        return int(np.sum(np.left_shift(np.int64(self.page_size), self.folio_order.astype(np.int64))))

    @property
    def preserved_pages(self) -> int:
        """Pages preserved by the workload (folios, both areas and their chunks, the blob block)."""
        blob_pages = 1 << max(0, (-(-self.blob_size // self.page_size) - 1).bit_length())
        return (self.folio_bytes // self.page_size + self.table.total_pages + len(self.table.chunks)
                + self.data.total_pages + len(self.data.chunks) + blob_pages)


def create(kho, allocator, size: int, pattern: str = SELFTEST, seed: int = 0) -> Workload:
    """Allocate, fill, checksum and preserve about ``size`` bytes through ``kho`` (a
    :class:`kho.handover.outgoing.KHO`), and add the sub-FDT blob :data:`KHO_TEST_FDT`.

    ``pattern`` is :data:`SELFTEST` (random orders, :func:`selftest_folios`) or one of
    :data:`kho.simulation.preserved_sets.PATTERNS`.  EINVAL for a size under two pages or an unknown pattern;
    ENOMEM when memory runs out.  O(folios + pages) plus reading every byte once for the digests.
    """
    memory = kho.memory
    ps, shift = memory.page_size, memory.page_shift
    if pattern not in WORKLOAD_PATTERNS:
        raise KHOError("EINVAL", f"unknown pattern {pattern!r} (one of {', '.join(WORKLOAD_PATTERNS)})")
    pages = size >> shift
    if pages < 2:
        raise KHOError("EINVAL", f"a workload of {size} bytes is less than two pages")
    if pages > allocator.nr_free_pages:
        raise KHOError("ENOMEM", f"cannot preserve {size} bytes: only {allocator.nr_free_pages * ps} bytes are free")
    rng = np.random.default_rng(seed)
    data_pages = max(1, int(pages * VMALLOC_SHARE))
    if pattern == SELFTEST:
        phys, orders = selftest_folios(allocator, pages - data_pages, rng)
    else:
        phys, orders = generate(pattern, allocator, (pages - data_pages) << shift, seed)
    seeds = rng.integers(1, 2**62, size=phys.size)
    digests = np.zeros((phys.size, DIGEST_BYTES), dtype=np.uint8)
    csum = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for i, (p, o, s) in enumerate(zip(phys.tolist(), orders.tolist(), seeds.tolist())):
        memory.fill_pattern(p, ps << o, s)
        d = memory.digest(p, ps << o)
        digests[i] = np.frombuffer(d, dtype=np.uint8)
        csum.update(d)
    kho.tracker.preserve_many(phys, orders)
    records = np.zeros(phys.size, dtype=FOLIO_INFO_DTYPE)
    records["phys_order"] = phys | orders.astype(np.uint64)
    records["digest"] = digests
    table_bytes = records.tobytes()
    table = _vmalloc(memory, allocator, kho.tracker, max(1, -(-len(table_bytes) // ps)), table_bytes, None, rng)
    data = _vmalloc(memory, allocator, kho.tracker, data_pages, None, int(rng.integers(1, 2**62)), rng)
    data_csum = _digest_pages(memory, np.array(data.blocks, dtype=np.uint64))
    tree = new_tree()
    tree.add_item(fdtlib.PropBytes("compatible", data=list(KHO_TEST_COMPAT.encode() + b"\0")))
    tree.add_item(fdtlib.PropBytes("magic", data=list(_u32(KHO_TEST_MAGIC))))
    node = fdtlib.Node("data")
    for name, value in (("nr_folios", _u32(phys.size)), ("folios_info", table.descriptor()), ("csum", csum.digest()),
                        ("vmalloc", data.descriptor()), ("vmalloc_csum", data_csum)):
        node.append(fdtlib.PropBytes(name, data=list(value)))
    tree.add_item(node)
    blob = to_dtb(tree)
    blob_phys = kho.add_blob(KHO_TEST_FDT, blob)
    return Workload(seed, pattern, phys, orders, table, data, blob_phys, len(blob), csum.digest(), data_csum, ps)


@dataclass
class VerifyReport:
    """What :func:`verify` checked: folios and bytes whose digests matched, vmalloc pages
    restored, and every failure (empty when everything survived)."""

    folios: int = 0
    folio_bytes: int = 0
    vmalloc_pages: int = 0
    restored_units: list[tuple[int, int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"ok": self.ok, "folios": self.folios, "folio_bytes": self.folio_bytes,
                "vmalloc_pages": self.vmalloc_pages, "restored_units": len(self.restored_units),
                "failures": list(self.failures)}


def _restore_vmalloc(kernel, memory: PhysicalMemory, raw: bytes | None, what: str, report: VerifyReport) -> np.ndarray | None:
    """Restore a vmalloc area from its ``struct kho_vmalloc`` bytes, read as the kernel's
    ``kho_restore_vmalloc`` reads it; its page addresses in virtual order."""
    if raw is None:
        report.failures.append(f"{what}: kho_vmalloc property missing")
        return None
    try:
        area = read_vmalloc(memory, raw, strict=False, field=what)
    except KHOFormatError as err:
        report.failures.append(f"{what}: {err}")
        return None
    for chunk in area.chunks:
        kernel.restore_folio(chunk)
        report.restored_units.append((chunk, 0))
    for phys in area.blocks:
        kernel.restore_pages(phys, 1 << area.order)
        report.restored_units.append((phys, area.order))
    report.vmalloc_pages += area.total_pages
    return np.array(area.blocks, dtype=np.uint64)


def verify(kernel, memory: PhysicalMemory, expected: Workload | None = None) -> VerifyReport:
    """Restore and check everything the workload handed over, from the next ``kernel``
    (anything with ``retrieve_subtree(name)``, ``restore_folio(phys) -> order`` and
    ``restore_pages(phys, nr_pages)``).

    Restore failures (KHOError) and digest mismatches are recorded in the report, not
    raised.  ``expected`` (the :class:`Workload` created before the reboot) is cross-checked
    when given.  O(bytes preserved).
    """
    report = VerifyReport()
    ps = memory.page_size
    try:
        blob_phys = kernel.retrieve_subtree(KHO_TEST_FDT)
        blob_order = kernel.restore_folio(blob_phys)
        report.restored_units.append((blob_phys, blob_order))
        tree = parse_fdt(memory.read(blob_phys, ps << blob_order), KHO_TEST_FDT)
    except KHOError as err:
        report.failures.append(f"{KHO_TEST_FDT}: {err}")
        return report
    compat = prop_bytes(tree.get_property("compatible"))
    magic = prop_bytes(tree.get_property("magic"))
    if compat != KHO_TEST_COMPAT.encode() + b"\0" or magic != _u32(KHO_TEST_MAGIC):
        report.failures.append(f"{KHO_TEST_FDT}: compatible or magic mismatch")
        return report
    if not tree.exist_node("data"):
        report.failures.append(f"{KHO_TEST_FDT}: no /data node")
        return report

    def prop(name):
        return prop_bytes(tree.get_property(name, "/data"))

    nr_raw, csum = prop("nr_folios"), prop("csum")
    if nr_raw is None or len(nr_raw) != 4 or csum is None or len(csum) != DIGEST_BYTES:
        report.failures.append(f"{KHO_TEST_FDT}: nr_folios or csum missing or malformed")
        return report
    nr_folios = int.from_bytes(nr_raw, "little")
    try:
        table_pages = _restore_vmalloc(kernel, memory, prop("folios_info"), "folios_info", report)
        data_pages = _restore_vmalloc(kernel, memory, prop("vmalloc"), "vmalloc", report)
    except KHOError as err:
        report.failures.append(f"vmalloc restore: {err}")
        return report
    if data_pages is not None and _digest_pages(memory, data_pages) != prop("vmalloc_csum"):
        report.failures.append("vmalloc: data digest mismatch")
    if table_pages is None:
        return report
    table = b"".join(memory.read(p, ps) for p in table_pages.tolist())
    if len(table) < nr_folios * FOLIO_INFO_DTYPE.itemsize:
        report.failures.append(f"folios_info: {len(table)} bytes cannot hold {nr_folios} records")
        return report
    records = np.frombuffer(table, dtype=FOLIO_INFO_DTYPE, count=nr_folios)
    running = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for word, want in zip(records["phys_order"].tolist(), records["digest"]):
        phys, order = word & ~(ps - 1), word & (ps - 1)
        try:
            got = kernel.restore_folio(phys)
        except KHOError as err:
            report.failures.append(f"folio {phys:#x}: {err}")
            continue
        report.restored_units.append((phys, got))
        if got != order:
            report.failures.append(f"folio {phys:#x}: restored with order {got}, preserved with {order}")
            continue
        digest = memory.digest(phys, ps << order)
        running.update(digest)
        if digest != bytes(want):
            report.failures.append(f"folio {phys:#x} order {order}: digest mismatch")
            continue
        report.folios += 1
        report.folio_bytes += ps << order
    if running.digest() != csum:
        report.failures.append("csum over all folios does not match")
    if expected is not None and (nr_folios != expected.nr_folios or report.folio_bytes != expected.folio_bytes
                                 or csum != expected.csum):
        report.failures.append(f"handed over {nr_folios} folios, the workload created {expected.nr_folios}")
    return report


def release(allocator, report: VerifyReport) -> int:
    """Give every unit ``verify`` restored back to ``allocator`` (restored memory belongs to
    the caller); the number of pages freed."""
    freed = 0
    for phys, order in report.restored_units:
        allocator.free_pages(phys, order)
        freed += 1 << order
    return freed
