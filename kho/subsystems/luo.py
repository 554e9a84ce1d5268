"""The ``LUO`` sub-node: the Live Update Orchestrator's state, ``luo-v5`` (Linux 7.3).

Writer (:class:`OutgoingLuo`, ``kernel/liveupdate/luo_core.c`` and friends): at boot a
zeroed preserved page for ``struct luo_ser`` (``liveupdate_num`` = the number received +
1, ``sessions_pa`` 0) and a preserved FLB page (``pgcnt`` 1); the ``LUO`` blob is the
32-byte struct.  Creating a session grows the session block set, preserving a file grows
its session's file block set (:mod:`~kho.subsystems.blocks`); :meth:`OutgoingLuo.serialize`
(the reboot) fills the blocks, sets ``sessions_pa`` when there is a session and writes the
FLBs still in use.  Files are memfds (:mod:`~kho.subsystems.memfd`) or any
``(compatible, data)`` pair.

Reader (``luo_early_startup``, ``luo_session_deserialize``, ``luo_file_deserialize``,
``luo_flb``): both modes refuse a blob under 32 bytes, a compatible other than ``luo-v5``
(compared as the kernel's ``strncmp``), what the block reader refuses, two sessions of one
name (the kernel's EEXIST), a file count other than the files found, and an FLB count
beyond the FLB page; memfd files are decoded with :func:`~kho.subsystems.memfd.read_memfd`.
Strict also wants a 32-byte blob at a page boundary, exact NUL-padded strings, the FLB
page (``pgcnt`` 1), no file set without files, tokens unique in a session and FLB names
unique with a nonzero count.  O(sessions + files + FLBs + memfd folios).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kho.abi.luo import (
    LIVEUPDATE_FLB_COMPAT_LENGTH,
    LIVEUPDATE_HNDL_COMPAT_LENGTH,
    LIVEUPDATE_SESSION_NAME_LENGTH,
    LUO_ABI_COMPAT_LEN,
    LUO_ABI_COMPATIBLE,
    LUO_FILE_SER_DTYPE,
    LUO_FLB_HEADER_SER_DTYPE,
    LUO_FLB_PGCNT,
    LUO_FLB_SER_DTYPE,
    LUO_KHO_ENTRY_NAME,
    LUO_SER_DTYPE,
    LUO_SESSION_SER_DTYPE,
    luo_flb_max,
)
from kho.abi.memfd import MEMFD_LUO_FH_COMPATIBLE, MEMFD_LUO_SER_DTYPES
from kho.errors import KHOError, KHOFormatError
from kho.subsystems.blocks import BlockSet, OutgoingBlockSet, read_block_set
from kho.subsystems.common import (
    Blob,
    FieldsJson,
    Range,
    alloc_preserve,
    c_string,
    check_pointer,
    encode_c_string,
    read_checked,
)
from kho.subsystems.memfd import Memfd, preserve_memfd, read_memfd, restore_memfd

_U64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class LuoFile:
    """A preserved file: its handler's compatible, the user's token, the handler's data
    (for a memfd, the phys of its ``memfd_luo_ser``, decoded in ``memfd``)."""

    compatible: str
    token: int
    data: int
    memfd: Memfd | None = None

    def to_json(self) -> dict:
        out = {"compatible": self.compatible, "token": self.token, "data": self.data}
        if self.memfd is not None:
            out["memfd"] = self.memfd.to_json()
        return out


@dataclass(frozen=True)
class LuoSession:
    """A preserved session: its name, its files and the block set holding them."""

    name: str
    files: tuple[LuoFile, ...]
    file_blocks: BlockSet

    def to_json(self) -> dict:
        return {"name": self.name, "files": [f.to_json() for f in self.files]}


@dataclass(frozen=True)
class LuoFlb(FieldsJson):
    """A preserved File-Lifecycle-Bound object: its compatible, data and dependent files."""

    name: str
    data: int
    count: int


@dataclass(frozen=True)
class Luo:
    """A decoded ``LUO`` sub-node: ``struct luo_ser`` at ``phys`` and what it points at."""

    phys: int
    size: int
    compatible: str
    liveupdate_num: int
    sessions_pa: int
    flbs_pa: int
    sessions: tuple[LuoSession, ...]
    session_blocks: BlockSet
    flbs: tuple[LuoFlb, ...]

    def referenced_ranges(self, page_size: int) -> list[Range]:
        out = [Range(self.phys, self.size, "luo_ser")]
        out += self.session_blocks.block_ranges(page_size, "luo_session_ser block")
        if self.flbs_pa:
            out.append(Range(self.flbs_pa, LUO_FLB_PGCNT * page_size, "luo_flb_header_ser"))
        for session in self.sessions:
            out += session.file_blocks.block_ranges(page_size, "luo_file_ser block")
            for f in session.files:
                if f.memfd is not None:
                    out += f.memfd.referenced_ranges(page_size)
        return out

    def to_json(self) -> dict:
        return {"compatible": self.compatible, "liveupdate_num": self.liveupdate_num, "sessions_pa": self.sessions_pa,
                "flbs_pa": self.flbs_pa, "sessions": [s.to_json() for s in self.sessions],
                "flbs": [f.to_json() for f in self.flbs]}


@dataclass
class _OutgoingSession:
    name: str
    files: OutgoingBlockSet
    entries: list[tuple[str, int, int]] = field(default_factory=list)  # compatible, data, token


class OutgoingLuo:
    """The running kernel's LUO: its blob, sessions, files and FLBs (see the module docstring).

    ``received_num`` is the ``liveupdate_num`` the kernel booted with (0 on a cold boot).
    """

    def __init__(self, memory, allocator, tracker, received_num: int = 0):
        self.memory, self.allocator, self.tracker = memory, allocator, tracker
        if not 0 <= received_num < _U64_MAX:
            raise KHOError("EINVAL", f"liveupdate_num {received_num} is not a u64 below its maximum")
        self.liveupdate_num = received_num + 1
        self.phys = alloc_preserve(memory, allocator, tracker, LUO_SER_DTYPE.itemsize)
        self.flbs_pa = alloc_preserve(memory, allocator, tracker, LUO_FLB_PGCNT * memory.page_size)
        self.sessions_pa = 0
        self.sessions: dict[str, _OutgoingSession] = {}
        self.session_blocks = OutgoingBlockSet(memory, allocator, tracker, LUO_SESSION_SER_DTYPE.itemsize)
        self.flbs: dict[str, tuple[int, int]] = {}
        self._write_flbs()
        self._write_ser()

    @property
    def blob(self) -> Blob:
        """The ``LUO`` sub-node's blob: the 32-byte ``struct luo_ser``."""
        return Blob(LUO_KHO_ENTRY_NAME, self.phys, LUO_SER_DTYPE.itemsize)

    def _write_ser(self) -> None:
        ser = np.zeros(1, dtype=LUO_SER_DTYPE)
        ser["compatible"] = LUO_ABI_COMPATIBLE.encode()
        ser["liveupdate_num"], ser["sessions_pa"], ser["flbs_pa"] = self.liveupdate_num, self.sessions_pa, self.flbs_pa
        self.memory.write(self.phys, ser.tobytes())

    def _write_flbs(self) -> None:
        live = [(name, data, count) for name, (data, count) in self.flbs.items() if count > 0]
        entries = np.zeros(len(live), dtype=LUO_FLB_SER_DTYPE)
        for i, (name, data, count) in enumerate(live):
            entries[i] = (encode_c_string(name, LIVEUPDATE_FLB_COMPAT_LENGTH, "FLB compatible"), data, count)
        header = np.zeros(1, dtype=LUO_FLB_HEADER_SER_DTYPE)
        header["pgcnt"], header["count"] = LUO_FLB_PGCNT, len(live)
        self.memory.write(self.flbs_pa, header.tobytes() + entries.tobytes())

    def create_session(self, name: str) -> None:
        """``luo_session_create``: EINVAL for a name that is empty, too long or not
        printable ASCII, EEXIST for a name in use (the block grown for it stays, as in the kernel)."""
        encode_c_string(name, LIVEUPDATE_SESSION_NAME_LENGTH, "session name")
        self.session_blocks.grow(len(self.sessions) + 1)
        if name in self.sessions:
            raise KHOError("EEXIST", f"session {name!r} exists")
        self.sessions[name] = _OutgoingSession(
            name, OutgoingBlockSet(self.memory, self.allocator, self.tracker, LUO_FILE_SER_DTYPE.itemsize))

    def _session(self, name: str) -> _OutgoingSession:
        if name not in self.sessions:
            raise KHOError("ENOENT", f"no session {name!r}")
        return self.sessions[name]

    def preserve_file(self, session: str, token: int, compatible: str, data: int) -> None:
        """``luo_preserve_file`` of a file whose handler ``compatible`` returned ``data``:
        EEXIST for a token in use in the session, EINVAL for a bad compatible or token."""
        s = self._session(session)
        encode_c_string(compatible, LIVEUPDATE_HNDL_COMPAT_LENGTH, "file handler compatible")
        if not 0 <= token <= _U64_MAX or not 0 <= data <= _U64_MAX:
            raise KHOError("EINVAL", "token and data are u64")
        if any(t == token for _, _, t in s.entries):
            raise KHOError("EEXIST", f"token {token:#x} is in use in session {session!r}")
        s.files.grow(len(s.entries) + 1)
        s.entries.append((compatible, data, token))

    def preserve_memfd(self, session: str, token: int, contents: bytes = b"", *, size: int | None = None,
                       pos: int = 0, seals: int = 0, compatible: str = MEMFD_LUO_FH_COMPATIBLE) -> int:
        """Preserve a memfd (:func:`~kho.subsystems.memfd.preserve_memfd`) as a file of
        ``session``; the phys of its ``memfd_luo_ser``."""
        self._session(session)
        data = preserve_memfd(self.memory, self.allocator, self.tracker, contents, size=size, pos=pos,
                              seals=seals, compatible=compatible)
        self.preserve_file(session, token, compatible, data)
        return data

    def set_flb(self, name: str, data: int, count: int) -> None:
        """An FLB preserved with ``data`` and ``count`` dependent files (0: no longer
        preserved).  E2BIG beyond the FLB page's capacity (the kernel's ENOSPC)."""
        encode_c_string(name, LIVEUPDATE_FLB_COMPAT_LENGTH, "FLB compatible")
        if name not in self.flbs and len(self.flbs) >= luo_flb_max(self.memory.page_size):
            raise KHOError("E2BIG", f"at most {luo_flb_max(self.memory.page_size)} FLBs")
        self.flbs[name] = (data, count)

    def serialize(self) -> int:
        """The reboot (``luo_session_serialize``, ``luo_flb_serialize``): every session and
        file written into its blocks, ``sessions_pa`` set when there is a session.  Returns
        ``sessions_pa``."""
        session_entries = []
        for s in self.sessions.values():
            files = [np.array([(compatible.encode(), data, token)], dtype=LUO_FILE_SER_DTYPE).tobytes()
                     for compatible, data, token in s.entries]
            head = s.files.serialize(files) if files else 0
            rec = np.zeros(1, dtype=LUO_SESSION_SER_DTYPE)
            rec["name"] = s.name.encode()
            rec["file_set_ser"]["files"], rec["file_set_ser"]["count"] = head, len(files)
            session_entries.append(rec.tobytes())
        head = self.session_blocks.serialize(session_entries)
        self.sessions_pa = head if self.sessions else 0
        self._write_flbs()
        self._write_ser()
        return self.sessions_pa


def _read_files(memory, head: int, count: int, session: str, at: int, strict: bool) -> tuple[tuple[LuoFile, ...], BlockSet]:
    ps = memory.page_size
    where = f"luo.session[{session}].files"
    if not head:
        if count and strict:
            raise KHOFormatError(f"{where}.count", f"{count} files but no file block", at)
        return (), read_block_set(memory, 0, LUO_FILE_SER_DTYPE.itemsize)
    blocks = read_block_set(memory, head, LUO_FILE_SER_DTYPE.itemsize, strict=strict, field=f"{where}.block")
    if len(blocks.entries) != count:
        raise KHOFormatError(f"{where}.count", f"{count} files claimed, {len(blocks.entries)} found", at)
    files, tokens = [], set()
    for i, raw in enumerate(blocks.entries):
        entry_at = blocks.entry_address(i, ps)
        rec = np.frombuffer(raw, dtype=LUO_FILE_SER_DTYPE)[0]
        compatible = c_string(raw[:LIVEUPDATE_HNDL_COMPAT_LENGTH], f"{where}[{i}].compatible", entry_at, strict=strict)
        token, data = int(rec["token"]), int(rec["data"])
        if strict and token in tokens:
            raise KHOFormatError(f"{where}[{i}].token", f"token {token:#x} repeated", entry_at)
        tokens.add(token)
        memfd = read_memfd(memory, data, compatible, strict=strict) if compatible in MEMFD_LUO_SER_DTYPES else None
        files.append(LuoFile(compatible, token, data, memfd))
    return tuple(files), blocks


def _read_flbs(memory, flbs_pa: int, strict: bool) -> tuple[LuoFlb, ...]:
    ps = memory.page_size
    if not flbs_pa:
        if strict:
            raise KHOFormatError("luo.flbs_pa", "no FLB page (the kernel always writes one)", flbs_pa)
        return ()
    check_pointer(memory, flbs_pa, LUO_FLB_PGCNT * ps, "luo.flbs_pa", ps if strict else 8)
    header = np.frombuffer(memory.read(flbs_pa, LUO_FLB_HEADER_SER_DTYPE.itemsize), dtype=LUO_FLB_HEADER_SER_DTYPE)[0]
    pgcnt, count = int(header["pgcnt"]), int(header["count"])
    if strict and pgcnt != LUO_FLB_PGCNT:
        raise KHOFormatError("luo.flb.pgcnt", f"{pgcnt} pages, the kernel writes {LUO_FLB_PGCNT}", flbs_pa)
    if count > luo_flb_max(ps):
        raise KHOFormatError("luo.flb.count", f"{count} entries, a page holds {luo_flb_max(ps)}", flbs_pa + 8)
    base = flbs_pa + LUO_FLB_HEADER_SER_DTYPE.itemsize
    raw = memory.read(base, count * LUO_FLB_SER_DTYPE.itemsize)
    flbs, names = [], set()
    for i in range(count):
        part = raw[i * LUO_FLB_SER_DTYPE.itemsize:(i + 1) * LUO_FLB_SER_DTYPE.itemsize]
        rec = np.frombuffer(part, dtype=LUO_FLB_SER_DTYPE)[0]
        at = base + i * LUO_FLB_SER_DTYPE.itemsize
        name = c_string(part[:LIVEUPDATE_FLB_COMPAT_LENGTH], f"luo.flb[{i}].name", at, strict=strict)
        if strict and (name in names or not int(rec["count"])):
            raise KHOFormatError(f"luo.flb[{i}]", f"FLB {name!r} repeated or with no file", at)
        names.add(name)
        flbs.append(LuoFlb(name, int(rec["data"]), int(rec["count"])))
    return tuple(flbs)


def read_luo(memory, phys: int, size: int, *, strict: bool = True) -> Luo:
    """Decode the ``LUO`` blob of ``size`` bytes at ``phys`` (see the module docstring)."""
    need = LUO_SER_DTYPE.itemsize
    ps = memory.page_size
    if size < need or (strict and (size != need or phys % ps)):
        raise KHOFormatError("luo.blob-size", f"{size} bytes at {phys:#x}; the kernel writes {need} at a page start", phys)
    raw = read_checked(memory, phys, need, "luo")
    ser = np.frombuffer(raw, dtype=LUO_SER_DTYPE)[0]
    compat_raw = raw[:LUO_ABI_COMPAT_LEN]
    wanted = LUO_ABI_COMPATIBLE.encode().ljust(LUO_ABI_COMPAT_LEN, b"\0")
    if (compat_raw != wanted) if strict else (compat_raw[:len(LUO_ABI_COMPATIBLE) + 1] != wanted[:len(LUO_ABI_COMPATIBLE) + 1]):
        raise KHOFormatError("luo.compatible", f"{compat_raw!r} is not {LUO_ABI_COMPATIBLE!r}", phys)
    sessions_pa, flbs_pa = int(ser["sessions_pa"]), int(ser["flbs_pa"])
    blocks = read_block_set(memory, sessions_pa, LUO_SESSION_SER_DTYPE.itemsize, strict=strict, field="luo.sessions")
    sessions, names = [], set()
    for i, raw_session in enumerate(blocks.entries):
        at = blocks.entry_address(i, ps)
        rec = np.frombuffer(raw_session, dtype=LUO_SESSION_SER_DTYPE)[0]
        name = c_string(raw_session[:LIVEUPDATE_SESSION_NAME_LENGTH], f"luo.session[{i}].name", at, strict=strict)
        if name in names:
            raise KHOFormatError(f"luo.session[{i}].name", f"session {name!r} repeated", at)
        names.add(name)
        files, file_blocks = _read_files(memory, int(rec["file_set_ser"]["files"]), int(rec["file_set_ser"]["count"]),
                                         name, at + LIVEUPDATE_SESSION_NAME_LENGTH, strict)
        sessions.append(LuoSession(name, files, file_blocks))
    flbs = _read_flbs(memory, flbs_pa, strict)
    return Luo(phys, size, LUO_ABI_COMPATIBLE, int(ser["liveupdate_num"]), sessions_pa, flbs_pa, tuple(sessions), blocks, flbs)


def restore_luo_files(kernel, memory, luo: Luo) -> dict[tuple[str, int], bytes | None]:
    """What the next kernel takes back when its sessions are deserialized and every file
    retrieved, through ``kernel`` (``restore_folio``, ``restore_pages``): each memfd
    (:func:`~kho.subsystems.memfd.restore_memfd`), then the file and session block pages
    (``kho_block_set_destroy`` frees them with ``kho_restore_free``).  Returns each file's
    contents by ``(session name, token)``: the memfd's bytes, None for other handlers
    (whose data kho does not model).  The ``luo_ser`` and FLB pages stay with the caller.
    The kernel's restore errors propagate.  O(files + memfd bytes)."""
    out: dict[tuple[str, int], bytes | None] = {}
    for session in luo.sessions:
        for f in session.files:
            out[(session.name, f.token)] = None if f.memfd is None else restore_memfd(kernel, memory, f.memfd)
        for phys, _ in session.file_blocks.blocks:
            kernel.restore_folio(phys)
    for phys, _ in luo.session_blocks.blocks:
        kernel.restore_folio(phys)
    return out
