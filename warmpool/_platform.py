"""Every OS call warmpool makes, behind one portable facade (psutil style).

The backend is chosen once at import: ``_platform_linux`` (ctypes to libc:
cachestat, MADV_POPULATE_READ, sysfs readahead) or ``_platform_posix`` (what any POSIX
libc offers; the rest reported by ``platform_notes()``).  Only stdlib is imported
here: this module is on the hot path of every run (numpy is imported inside
``FileWindow.touch`` only).

Conventions shared by every function:

* ``fd`` is an open file descriptor of a regular file; nothing here opens or closes
  files, so the caller owns the path and adds it to errors (``err.path``).
* ``length == 0`` means "to end of file" for ``evict``, ``prefetch``,
  ``cached_bytes``, ``resident_pages`` and ``resident_bytes``; they work on whole
  pages, ``[offset rounded down, offset + length rounded up)``, clipped at EOF.
* Failures raise ``PlatformError``; a file that shrank raises ``FileChangedError``.
"""

from __future__ import annotations

import os
import sys

if sys.platform.startswith("linux"):
    from warmpool import _platform_linux as _backend
else:
    from warmpool import _platform_posix as _backend

__all__ = [
    "FileWindow",
    "PAGE_SIZE",
    "advise_random",
    "cached_bytes",
    "evict",
    "evict_file",
    "huge_folio_size",
    "platform_notes",
    "prefetch",
    "read_byte",
    "read_range",
    "readahead_size",
    "resident_bytes",
    "resident_pages",
    "supports_cachestat",
    "supports_populate",
]

PAGE_SIZE: int = _backend.PAGE_SIZE
FileWindow = _backend.FileWindow
advise_random = _backend.advise_random
cached_bytes = _backend.cached_bytes
evict = _backend.evict
huge_folio_size = _backend.huge_folio_size
platform_notes = _backend.platform_notes
prefetch = _backend.prefetch
read_byte = _backend.read_byte
read_range = _backend.read_range
readahead_size = _backend.readahead_size
resident_bytes = _backend.resident_bytes
resident_pages = _backend.resident_pages
supports_cachestat = _backend.supports_cachestat
supports_populate = _backend.supports_populate


def evict_file(path) -> None:
    """Drop a whole file's pages from the page cache.

    fdatasync first: POSIX_FADV_DONTNEED skips dirty pages, so a freshly written or copied model
    would otherwise stay resident (fdatasync works on a read-only fd; a file system without
    fsync, such as some FUSE servers, has clean pages anyway).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            os.fdatasync(fd)
        except OSError:
            pass
        evict(fd, 0, 0)
    finally:
        os.close(fd)
