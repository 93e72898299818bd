"""Portable POSIX backend: what ``os`` and libc offer on any POSIX system.

This is the honest fallback for non-Linux systems, and the base the Linux backend
builds on: mmap/munmap/mincore/madvise(MADV_WILLNEED) and pread exist on Linux, macOS
and the BSDs with the same ABI, so their bindings live here once.  What only Linux
has (cachestat(2), MADV_POPULATE_READ, per-device readahead in sysfs) is reported
unsupported here and implemented in ``linux``.

Ranges: ``length == 0`` means "to end of file" for the advice and measurement
functions (the convention of posix_fadvise(2) and cachestat(2)); measurements cover
whole pages, ``[offset rounded down to a page, offset + length rounded up)``, clipped
at end of file.
"""

from __future__ import annotations

import os

from warmpool._errors import FileChangedError, PlatformError
from warmpool._platform.libc import (  # noqa: F401 - the Linux backend and the keeper's calls use them as _posix._NAME
    _BIT0,
    _MAP_FAILED,
    PAGE_SIZE,
    _bind,
    _failure,
    _fstat,
    _madvise,
    _map_readonly,
    _mincore,
    _mincore_into,
    _mmap,
    _page_span,
    _require,
    _round_down,
    _round_up,
    _unmap,
)
from warmpool._platform.window import FILE_CHANGED as _FILE_CHANGED
from warmpool._platform.window import FileWindow

__all__ = [
    "DEFAULT_READAHEAD", "FileWindow", "PAGE_SIZE", "advise_random", "cache_counts", "cached_bytes", "evict",
    "huge_folio_size", "lower_priority", "platform_notes", "prefetch", "read_byte", "read_range", "readahead_size",
    "residency_hidden", "resident_bytes", "resident_pages", "supports_cachestat", "supports_populate",
]

# The Linux default read_ahead_kb; used where the OS does not say.
DEFAULT_READAHEAD = 128 * 1024

# resident_pages maps at most this much at once, so a 100 GB file never needs 100 GB
# of address space (and the kernel never builds page tables for more than this).
_RESIDENCY_WINDOW = 256 << 20


def _fadvise(fd: int, offset: int, length: int, advice_name: str) -> None:
    """posix_fadvise, or nothing where the OS has none (macOS): advice is optional."""
    advice = getattr(os, advice_name, None)
    if advice is None:
        return
    try:
        os.posix_fadvise(fd, offset, length, advice)
    except OSError as exc:
        raise PlatformError(f"posix_fadvise({advice_name}) failed: {exc.strerror}") from exc


def _stepped_willneed(fd: int, offset: int, length: int, step: int) -> None:
    """WILLNEED over the range in ``step``-byte requests (see ``prefetch``)."""
    size = _fstat(fd).st_size
    end = size if length == 0 else min(offset + length, size)
    for pos in range(_round_down(offset), end, step):
        _fadvise(fd, pos, min(step, end - pos), "POSIX_FADV_WILLNEED")


# -- advice --------------------------------------------------------------------------


def evict(fd: int, offset: int, length: int) -> None:
    """Drop the clean cached pages of the range (``length == 0``: to EOF).

    The range is widened to whole pages: POSIX_FADV_DONTNEED itself only drops pages
    the range covers completely, and callers think in page-rounded ranges.
    """
    start = _round_down(offset)
    _fadvise(fd, start, 0 if length == 0 else _round_up(offset + length) - start,
             "POSIX_FADV_DONTNEED")


def readahead_size(fd: int) -> int:
    """The OS does not say here; the Linux default."""
    return DEFAULT_READAHEAD


def prefetch(fd: int, offset: int, length: int) -> None:
    """Ask the OS to read the range in the background (a hint; may do nothing)."""
    _stepped_willneed(fd, offset, length, readahead_size(fd))


def huge_folio_size() -> int | None:
    """No transparent huge pages known here."""
    return None


def advise_random(fd: int) -> None:
    """Turn off readahead on this open file so reads bring in exactly what they ask."""
    _fadvise(fd, 0, 0, "POSIX_FADV_RANDOM")


# -- measurement ---------------------------------------------------------------------


def cached_bytes(fd: int, offset: int, length: int) -> int | None:
    """cachestat(2) is Linux-only: always None here."""
    return None


def cache_counts(fd: int, ranges) -> list[tuple[int, int, int]] | None:
    """cachestat(2) is Linux-only: always None here (use resident_pages)."""
    return None


def resident_pages(fd: int, offset: int, length: int) -> bytes:
    """One byte per page of the range (1 = in the page cache), clipped at EOF.

    mincore(2) on read-only windows of at most 256 MiB: it reads page-cache state
    without faulting anything in.  (Linux >= 5.2 reports every page resident unless the
    caller owns the file or may open it for writing: check ``residency_hidden`` first.)
    """
    start, stop, _ = _page_span(fd, offset, length)
    return _mincore_range(fd, start, stop)


def _mincore_range(fd: int, start: int, stop: int) -> bytes:
    out = bytearray((stop - start) // PAGE_SIZE)
    for window in range(start, stop, _RESIDENCY_WINDOW):
        size = min(_RESIDENCY_WINDOW, stop - window)
        address = _map_readonly(fd, window, size)
        try:
            _mincore_into(address, size, out, (window - start) // PAGE_SIZE)
        finally:
            _unmap(address, size)
    return bytes(out).translate(_BIT0)


def residency_hidden(fd: int) -> bool:
    """Only Linux is known to hide residency (see the Linux backend): False."""
    return False


def resident_bytes(fd: int, offset: int, length: int) -> int:
    """Bytes of the page-rounded range that are in the page cache and readable.

    A mincore count: it counts only pages whose read has completed (uptodate), so it
    is the truth for "is it warm"; the page holding EOF counts only its file bytes.
    """
    start, stop, limit = _page_span(fd, offset, length)
    return min(_mincore_range(fd, start, stop).count(1) * PAGE_SIZE, limit)


# -- reading -------------------------------------------------------------------------


_HAS_PREADV = hasattr(os, "preadv")  # Linux, the BSDs, macOS >= 11


def _pread_into(fd: int, view: memoryview, position: int) -> int:
    if _HAS_PREADV:  # straight into the caller's buffer: no bytes object per step
        return os.preadv(fd, [view], position)
    data = os.pread(fd, len(view), position)
    view[: len(data)] = data
    return len(data)


def read_byte(fd: int, offset: int) -> None:
    """read(2) one byte at ``offset`` through the page cache (a cached page is not read again).

    What a plain read of a cached folio does besides copying: if the folio carries the
    readahead mark, the kernel clears it and starts async readahead from the first missing
    page within the file's readahead window (``page_cache_async_ra``, mm/readahead.c); with
    every page of that window cached it reads nothing."""
    try:
        os.pread(fd, 1, offset)
    except OSError as exc:
        raise PlatformError(f"pread at byte {offset} failed: {exc.strerror}") from exc


def read_range(fd: int, offset: int, length: int, buf: bytearray) -> None:
    """Read ``[offset, offset + length)`` into ``buf`` in ``len(buf)``-byte steps.

    The bytes are discarded (``buf`` is reused); reading is what fills the cache.
    Raises FileChangedError when the file ends before ``offset + length``.
    """
    if not buf:
        raise PlatformError("read_range needs a non-empty buffer")
    view = memoryview(buf)
    position, end = offset, offset + length
    while position < end:
        want = min(len(view), end - position)
        try:
            got = _pread_into(fd, view if want == len(view) else view[:want], position)
        except OSError as exc:
            raise PlatformError(f"pread at byte {position} failed: {exc.strerror}") from exc
        if got == 0:  # EOF before the end of the range: the file shrank under us
            raise FileChangedError(f"{_FILE_CHANGED} (ends before byte {end})")
        position += got


# -- scheduling ----------------------------------------------------------------------


def lower_priority() -> str | None:
    """Put the calling thread (and threads it starts later) at the lowest CPU priority this
    OS lets any process take: nice 19.  Returns what was applied, None if it was refused."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    except (AttributeError, OSError):
        return None
    return "nice 19"


# -- features ------------------------------------------------------------------------


def supports_populate() -> bool:
    return False


def supports_cachestat() -> bool:
    return False


def platform_notes() -> list[str]:
    """What this OS lacks, one line each, for the coordinator to say once."""
    notes = ["no MADV_POPULATE_READ on this OS: warm windows by touching or reading them",
             "no cachestat(2) on this OS: cached_bytes() says None, use resident_bytes()",
             "no per-device readahead size known: WILLNEED steps are 128 KiB"]
    if not hasattr(os, "posix_fadvise"):
        notes.append("no posix_fadvise on this OS: evict, prefetch and advise_random do nothing")
    if _mincore is None or _mmap is None:
        notes.append("no mmap/mincore in libc: residency cannot be measured")
    return notes
