"""The running kernel's handover: its memory through ``/proc/kcore``, and where KHO keeps
the handover from the kernel's own variables, read with drgn when it is installed.

Memory: ``/proc/kcore`` (or the file ``$KHO_KCORE`` names) is an ELF core whose ``PT_LOAD``
segments of RAM and kernel text carry their physical address in ``p_paddr``
(``fs/proc/kcore.c`` has filled it in since long before KHO, 6.16, existed) and whose
vmalloc, vmemmap and module segments have ``p_paddr`` -1; it is read as any ELF core
(:class:`~kho.dumps.sources.ElfSource`), page by page, never whole.

drgn (optional, ``pip install kho[live]``): :func:`kernel_handover` reads, with the
running kernel's debug info (``vmlinux`` where drgn finds it), the variables of
``kernel/liveupdate/kexec_handover.c`` (``kernel/kexec_handover.c`` before 6.18)
listed in :data:`KHO_VARIABLES`: the outgoing KHO FDT, the FDT this kernel was handed,
the scratch array and whether KHO is enabled.  With them the handover is found without
scanning RAM for FDT headers (a minute on a large machine), the scratch areas are known,
and a kernel with KHO off is told apart from one whose FDT cannot be found.  Without
drgn, or when its debug info is missing, RAM is scanned as in any dump and a note says why.

Units: addresses in bytes (``phys`` physical, ``virt`` kernel virtual).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import numpy as np

from kho.abi.kexec_handover import KHO_SCRATCH_DTYPE
from kho.dumps.find import DumpHandover, Handoff, find_handover
from kho.dumps.open import Dump, open_dump
from kho.dumps.sources import PageScan
from kho.errors import KHOError

#: The running kernel's memory as an ELF core.
KCORE = "/proc/kcore"
#: Environment variable naming another kcore-like file (tests, a copied kcore).
KCORE_ENV = "KHO_KCORE"

#: The kernel variables read through drgn, each a list of member paths tried in order
#: (the first that exists in the kernel's debug info is used):
#:
#: * ``outgoing_fdt``: the KHO FDT this kernel hands over: ``kho_out.fdt`` (6.18 on: a
#:   ``void *`` in the linear map) or ``kho_out.ser.fdt`` (6.16, 6.17: a ``struct page *``);
#: * ``incoming_fdt``: ``kho_in.fdt_phys``, the FDT the previous kernel handed to this one
#:   (0 after a cold boot);
#: * ``scratch`` / ``scratch_count``: ``kho_scratch`` (``struct kho_scratch *``, linear map)
#:   and ``kho_scratch_cnt``, the array handed over with the FDT;
#: * ``enabled``: ``kho_enable`` (``kho=`` on the command line);
#: * ``finalized``: ``kho_out.finalized`` (6.16 .. 7.0, whose map is serialized at finalize).
KHO_VARIABLES = {
    "outgoing_fdt": ("kho_out.fdt", "kho_out.ser.fdt"),
    "incoming_fdt": ("kho_in.fdt_phys",),
    "scratch": ("kho_scratch",),
    "scratch_count": ("kho_scratch_cnt",),
    "enabled": ("kho_enable",),
    "finalized": ("kho_out.finalized",),
}


@dataclass
class KernelHandover:
    """What the running kernel's variables say (:func:`kernel_handover`): physical addresses
    in bytes, None where the variable is absent from the debug info or NULL; ``read_from``
    names each variable read; ``notes`` say what could not be read."""

    outgoing_fdt: int | None = None
    incoming_fdt: int | None = None
    scratch_phys: int | None = None
    scratch_count: int | None = None
    enabled: bool | None = None
    finalized: bool | None = None
    page_size: int | None = None
    read_from: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def fdts(self) -> list[int]:
        """The KHO FDTs the kernel names, outgoing first."""
        return [p for p in (self.outgoing_fdt, self.incoming_fdt) if p]

    def handoff(self) -> Handoff | None:
        """The outgoing FDT with the scratch array, as the kexec that follows would hand them
        over (None when either is unknown).  O(1)."""
        if not self.outgoing_fdt or self.scratch_phys is None or not self.scratch_count:
            return None
        names = ", ".join(self.read_from[k] for k in ("outgoing_fdt", "scratch", "scratch_count"))
        return Handoff(self.outgoing_fdt, self.page_size or 0, self.scratch_phys,
                       self.scratch_count * KHO_SCRATCH_DTYPE.itemsize, f"the running kernel's {names} (drgn)")


def _member(obj, path: str):
    """``obj`` followed along the dotted member ``path`` after its first name."""
    for name in path.split(".")[1:]:
        obj = obj.member_(name)
    return obj


def _to_phys(obj) -> int:
    """The physical address an object holds: an integer as is, a ``struct page *`` by its
    pfn, any other pointer as a linear-map address (drgn's helpers).  0 for NULL."""
    import drgn
    from drgn.helpers.linux.mm import page_to_phys, virt_to_phys

    kind = obj.type_.unaliased_kind()
    if kind != drgn.TypeKind.POINTER:
        return int(obj.value_())
    if not obj.value_():
        return 0
    target = obj.type_.unaliased().type.unaliased()
    if target.kind == drgn.TypeKind.STRUCT and target.tag == "page":
        return int(page_to_phys(obj))
    return int(virt_to_phys(obj))


def kernel_handover(prog) -> KernelHandover:
    """Read :data:`KHO_VARIABLES` from the drgn ``prog`` (a running kernel, or any program
    with the kernel's types and objects).  A variable missing from the debug info, or whose
    memory cannot be read, is left None with a note; nothing raises.  O(1) reads."""
    import drgn

    found = KernelHandover()
    values: dict[str, object] = {}
    for key, paths in KHO_VARIABLES.items():
        for path in paths:
            try:
                obj = _member(prog[path.split(".")[0]], path)
                values[key] = bool(obj.value_()) if key in ("enabled", "finalized") else _to_phys(obj)
            except (LookupError, drgn.ObjectAbsentError):
                continue  # not this kernel's name for it
            except Exception as err:  # noqa: BLE001 - drgn reading a live kernel: a fault, missing types, ...
                found.notes.append(f"{path}: cannot be read through drgn ({type(err).__name__}: {err})")
                break
            found.read_from[key] = path
            break
    found.outgoing_fdt = values.get("outgoing_fdt") or None
    found.incoming_fdt = values.get("incoming_fdt") or None
    found.scratch_phys = values.get("scratch") or None
    found.scratch_count = values.get("scratch_count")
    found.enabled = values.get("enabled")
    found.finalized = values.get("finalized")
    try:
        found.page_size = int(prog["PAGE_SIZE"].value_())
    except Exception:  # noqa: BLE001 - unknown: the caller's page size stands
        found.page_size = None
    if not found.read_from:
        found.notes.append("drgn found none of the KHO variables (no debug info for the running kernel, "
                           "or a kernel without CONFIG_KEXEC_HANDOVER): RAM scanned instead")
    return found


def kernel_program(kcore: str):
    """A drgn program for the running kernel with its default debug info, or None (with the
    reason) when drgn is not installed or cannot attach, or when ``kcore`` is not the running
    kernel's (a copied kcore: the running kernel's variables would not describe it).  Missing
    debug info is not an error here: :func:`kernel_handover` then finds no variable."""
    if kcore != KCORE:
        return None, f"{kcore} is not {KCORE}: the running kernel's variables are not read, RAM is scanned"
    try:
        import drgn
    except ImportError:
        return None, "drgn is not installed (pip install kho[live]): RAM scanned for the KHO FDT"
    try:
        prog = drgn.program_from_kernel()
    except Exception as err:  # noqa: BLE001 - no kcore, not root, a kernel drgn does not know
        return None, f"drgn cannot attach to the running kernel ({type(err).__name__}: {err}): RAM scanned for the KHO FDT"
    try:
        prog.load_default_debug_info()
    except drgn.MissingDebugInfoError as err:
        return prog, f"drgn: {str(err).splitlines()[0]}"
    except Exception as err:  # noqa: BLE001 - as above: the variables are then simply not found
        return prog, f"drgn could not load debug info ({type(err).__name__}: {err})"
    return prog, None


class LiveDump(Dump):
    """The running kernel opened as a dump: its memory from kcore (:class:`Dump` over an
    :class:`~kho.dumps.sources.ElfSource`), and when ``kernel`` (from drgn) names them the
    KHO FDTs and the scratch array, so no scan is needed; ``notes`` say how it was read."""

    def __init__(self, dump: Dump, kernel: KernelHandover | None, notes: list[str]):
        super().__init__(dump.path, dump.source, dump.memory)
        self.kernel = kernel
        self.notes = notes

    def source_json(self) -> dict:
        """As :meth:`Dump.source_json` (``format`` elf), with ``live``: ``kernel`` (what drgn
        read: ``outgoing_fdt``, ``incoming_fdt``, ``scratch_phys``, ``scratch_count``,
        ``enabled``, ``page_size``, ``read_from``; None without drgn) and ``notes``."""
        k = self.kernel
        kernel = None if k is None or not k.read_from else {
            "outgoing_fdt": k.outgoing_fdt, "incoming_fdt": k.incoming_fdt, "scratch_phys": k.scratch_phys,
            "scratch_count": k.scratch_count, "enabled": k.enabled, "page_size": k.page_size,
            "read_from": dict(k.read_from)}
        return {**super().source_json(), "live": {"kernel": kernel, "notes": list(self.notes)}}

    def scan(self) -> PageScan:
        """The FDTs the kernel names (no scan) when drgn read them, else the scanned RAM."""
        if self.kernel is not None and self.kernel.fdts():
            return PageScan(fdt=np.array(self.kernel.fdts(), np.uint64))
        return super().scan()

    def _find(self, fdt: int | None, strict: bool) -> DumpHandover:
        kernel = self.kernel
        handoff = kernel.handoff() if kernel is not None else None
        scan = self.scan()
        try:
            found = find_handover(self.memory, scan.fdt, scan.boot_params, what=f"{self.path} ({self.description})",
                                  fdt=fdt, strict=strict, handoffs=[handoff] if handoff else [])
        except KHOError as err:
            if kernel is None or not kernel.fdts():
                raise
            named = ", ".join(f"{p:#x}" for p in kernel.fdts())
            why = ("; KHO is not finalized (this kernel serializes its map at finalize: "
                   "echo 1 > /sys/kernel/debug/kho/out/finalize)" if kernel.finalized is False else "")
            raise KHOError(err.errno_name, f"--live: the FDT the running kernel's variables name ({named}, "
                                           f"{kernel.read_from.get('outgoing_fdt', 'kho_in.fdt_phys')}) is not a KHO "
                                           f"handover that decodes{why}: {err.message}") from None
        found.notes[:0] = self.notes
        return found


def open_live(*, ram=None, page_size: int | None = None, use_drgn: bool = True, program=None) -> LiveDump:
    """The running kernel's handover (see the module docstring): ``/proc/kcore`` (or
    ``$KHO_KCORE``) for memory, read as :func:`~kho.dumps.open_dump` reads an ELF core with
    ``ram`` and ``page_size`` (default: the kernel's, from drgn, else kcore's VMCOREINFO); with
    ``use_drgn`` the kernel's variables through ``program`` (a drgn program; default the
    running kernel's, :func:`kernel_program`).

    KHOError(ENOENT or EACCES) with one line saying what is missing when kcore cannot be
    read (not root, no ``/proc/kcore``); KHOError(EOPNOTSUPP) when drgn reads that the
    running kernel has KHO disabled; KHOError(EINVAL) when the file is not an ELF core."""
    path = os.environ.get(KCORE_ENV, KCORE)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before open: a FIFO would block
            raise KHOError("EINVAL", f"--live: {path} is not a regular file like /proc/kcore")
        with open(path, "rb") as probe:
            probe.read(4)
    except OSError as err:
        errno_name = {FileNotFoundError: "ENOENT", PermissionError: "EACCES"}.get(type(err), "EINVAL")
        raise KHOError(errno_name, f"--live: cannot read {path} ({err.strerror}): run as root on a kernel with "
                                   "/proc/kcore, or give a dump of the machine") from None
    notes: list[str] = []
    kernel = None
    if use_drgn:
        reason = None
        if program is None:
            program, reason = kernel_program(path)
        if reason:
            notes.append(reason)
        if program is not None:
            kernel = kernel_handover(program)
            notes += kernel.notes
            if kernel.enabled is False:
                raise KHOError("EOPNOTSUPP", f"--live: the running kernel has KHO disabled "
                                             f"({kernel.read_from['enabled']} is false; boot with kho=on)")
    dump = open_dump(path, ram=ram, page_size=page_size or (kernel.page_size if kernel else None))
    if not isinstance(dump, Dump) or dump.format != "elf":
        dump.close()
        raise KHOError("EINVAL", f"--live: {path} is not an ELF core like /proc/kcore")
    if kernel is not None and kernel.read_from:
        named = ", ".join(sorted(set(kernel.read_from.values())))
        notes.append(f"KHO FDT and scratch array from the running kernel's variables ({named}), through drgn")
    return LiveDump(dump, kernel, notes)
