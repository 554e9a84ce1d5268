"""Files kho writes and reads: atomic replacement and bounded, size-checked reading.

:func:`atomic_write` / :func:`write_atomic`: every file kho writes (images, JSON, markdown,
plots) goes to a temporary file in the destination's directory, is flushed and fsynced, then
renamed over the destination (and the directory fsynced).  A write that fails (EFBIG,
ENOSPC, an exception in the writer) removes the temporary file and leaves the old file, if
any, whole.

:func:`read_bounded`: read a whole input file only after checking what it is: a regular
file (a character device such as ``/dev/zero``, a FIFO or a directory is refused before any
byte is read: its size is unknown) of at most ``limit`` bytes by ``fstat`` (a sparse 8 GiB
file is refused without reading it), and no larger than the memory the host has available.
A file object (``io.BytesIO``, a pipe already open) is read with at most ``limit + 1`` bytes
requested.  Memory: the file's size.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, BinaryIO

from kho.errors import KHOError
from kho.sizes import format_size

PathOrFile = str | os.PathLike | BinaryIO


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """A file object writing to a temporary file beside ``path``; when the block ends without
    an exception it is flushed, fsynced and renamed over ``path``; otherwise it is removed
    and ``path`` is untouched.  The new file gets the mode a plain ``open`` would give it
    (0666 minus the umask).  O(1) besides the writes."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode {mode!r}: 'wb' or 'w'")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise OSError(err.errno, err.strerror, path) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode, encoding=encoding) as out:
            fd = -1  # owned by ``out`` now
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, path) from None  # name the file, not the write
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (best effort: some filesystems refuse to fsync a directory)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def write_atomic(path_or_file: PathOrFile, data: bytes | str) -> int:
    """Write ``data`` (bytes, or str as UTF-8 text) to a path atomically (see
    :func:`atomic_write`) or to an open file object as it is; returns the bytes written."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if hasattr(path_or_file, "write"):
        path_or_file.write(raw)
    else:
        with atomic_write(path_or_file) as out:
            out.write(raw)
    return len(raw)


def available_memory() -> int | None:
    """Bytes of memory the host can still give this process (``MemAvailable``), or None when
    the host does not say.  O(1)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def check_host_memory(need: int, what: str) -> None:
    """ENOMEM when ``need`` bytes exceed the memory the host has available now."""
    have = available_memory()
    if have is not None and need > have:
        raise KHOError("ENOMEM", f"{what} needs {format_size(need)} ({need:,} bytes); "
                                 f"the host has {format_size(have)} available")


def read_bounded(path_or_file: PathOrFile, limit: int, what: str = "file") -> bytes:
    """The whole contents of a regular file of at most ``limit`` bytes (see the module
    docstring).  E2BIG above ``limit``, ENOMEM above the host's available memory, EINVAL for
    something that is not a regular file.  Reads ``size`` bytes (``limit + 1`` at most for a
    file object); O(size)."""
    if hasattr(path_or_file, "read"):
        data = path_or_file.read(limit + 1)
        if len(data) > limit:
            raise KHOError("E2BIG", f"{what}: more than {limit:,} bytes")
        return bytes(data)
    name = os.fspath(path_or_file)
    with open(name, "rb") as src:
        info = os.fstat(src.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KHOError("EINVAL", f"{what} {name}: not a regular file (its size is unknown before reading)")
        if info.st_size > limit:
            raise KHOError("E2BIG", f"{what} {name}: {info.st_size:,} bytes, more than the {limit:,} it may have")
        check_host_memory(info.st_size, f"{what} {name}")
        data = src.read(info.st_size + 1)
    if len(data) > info.st_size:
        raise KHOError("EINVAL", f"{what} {name}: it grew while being read")
    return data
