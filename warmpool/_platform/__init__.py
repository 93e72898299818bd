"""Every OS call warmpool makes, behind one portable facade (psutil style).

The backend is chosen once at import: ``linux`` (ctypes to libc:
cachestat, MADV_POPULATE_READ, sysfs readahead) or ``posix`` (what any POSIX
libc offers; the rest reported by ``platform_notes()``).  Only stdlib is imported
here: this module is on the hot path of every run (numpy is imported inside
``HeldMapping.touch`` only, the keeper's ``--hold touch``).

Conventions shared by every function:

* ``fd`` is an open file descriptor of a regular file; nothing here opens or closes
  files, so the caller owns the path and adds it to errors (``err.path``).
* ``length == 0`` means "to end of file" for ``evict``, ``prefetch``,
  ``cached_bytes``, ``resident_pages`` and ``resident_bytes``; they work on whole
  pages, ``[offset rounded down, offset + length rounded up)``, clipped at EOF.
* Failures raise ``PlatformError``; a file that shrank raises ``FileChangedError``.
"""

from __future__ import annotations

import errno
import os
import sys

from warmpool._errors import PlatformError, WarmpoolError

if sys.platform.startswith("linux"):
    from warmpool._platform import linux as _backend
else:
    from warmpool._platform import posix as _backend

__all__ = [
    "CgroupMemory",
    "FileWindow",
    "HeldMapping",
    "PAGE_SIZE",
    "ReadAhead",
    "advise_random",
    "cache_counts",
    "cached_bytes",
    "cgroup_memory",
    "cpu_idle_seconds",
    "evict",
    "evict_file",
    "evict_ranges",
    "free_page_reporting",
    "huge_folio_size",
    "locked_bytes",
    "lower_priority",
    "memlock_limit",
    "memory_pressure",
    "open_model",
    "page_runs",
    "physical_memory",
    "pid_alive",
    "platform_notes",
    "prefetch",
    "process_cpu_seconds",
    "read_ahead",
    "read_byte",
    "read_range",
    "readahead_size",
    "residency_hidden",
    "resident_bytes",
    "resident_pages",
    "set_read_ahead_kb",
    "storage_read_bytes",
    "supports_cachestat",
    "supports_populate",
]

PAGE_SIZE: int = _backend.PAGE_SIZE
FileWindow = _backend.FileWindow
advise_random = _backend.advise_random
cache_counts = _backend.cache_counts
cached_bytes = _backend.cached_bytes
evict = _backend.evict
huge_folio_size = _backend.huge_folio_size
lower_priority = _backend.lower_priority
platform_notes = _backend.platform_notes
prefetch = _backend.prefetch
read_byte = _backend.read_byte
read_range = _backend.read_range
readahead_size = _backend.readahead_size
resident_bytes = _backend.resident_bytes
resident_pages = _backend.resident_pages
residency_hidden = _backend.residency_hidden
supports_cachestat = _backend.supports_cachestat
supports_populate = _backend.supports_populate
from warmpool._platform.blockdev import ReadAhead, read_ahead, set_read_ahead_kb  # noqa: E402
from warmpool._platform.libc import page_runs  # noqa: E402 - a mincore vector's runs, for every caller

# A keeper's calls: held mappings (POSIX), and what /proc and /sys tell where they exist.
from warmpool._platform.mapping import HeldMapping  # noqa: E402
from warmpool._platform.proc import (  # noqa: E402
    CgroupMemory,
    cgroup_memory,
    cpu_idle_seconds,
    free_page_reporting,
    locked_bytes,
    memlock_limit,
    memory_pressure,
    physical_memory,
    pid_alive,
    process_cpu_seconds,
    storage_read_bytes,
)

# fdatasync errors that mean "this file system cannot write back", not "write-back failed".
# A file system without an fsync operation (squashfs, erofs, iso9660: vfs_fsync_range answers
# EINVAL) or mounted read-only (EROFS), or a FUSE server that refuses the request, cannot have
# dirty pages: its pages are clean already and DONTNEED drops them.  See docs/design.md.
_CANNOT_WRITE_BACK = frozenset({errno.EINVAL, errno.EROFS, errno.ENOSYS, errno.EOPNOTSUPP})


def evict_ranges(fd: int, ranges=((0, 0),)) -> None:
    """Drop ``(offset, length)`` ranges of an open file (default: all of it) from the page cache.

    fdatasync first: POSIX_FADV_DONTNEED skips dirty pages, so a freshly written or copied model
    would otherwise stay resident (fdatasync works on a read-only fd).  A real write-back error
    (EIO, ENOSPC) raises PlatformError: those pages stay dirty, and resident.
    """
    try:
        os.fdatasync(fd)
    except OSError as exc:
        if exc.errno not in _CANNOT_WRITE_BACK:
            raise PlatformError(f"cannot flush the file before evicting it: {exc.strerror}") from None
    for offset, length in ranges:
        evict(fd, offset, length)


def open_model(path, error: type[WarmpoolError] = PlatformError, doing: str = "cannot open") -> int:
    """Open a model file read-only (never for writing: the model stays untouched); an OSError
    becomes ``error("<doing>: <strerror>", path)``, one line naming the file."""
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise error(f"{doing}: {exc.strerror}", os.fspath(path)) from None


def evict_file(path) -> None:
    """Drop a whole file's pages from the page cache (``evict_ranges`` on it)."""
    fd = open_model(path)
    try:
        evict_ranges(fd)
    except PlatformError as exc:
        exc.path = exc.path or os.fspath(path)
        raise
    finally:
        os.close(fd)
