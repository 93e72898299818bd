"""Portable POSIX backend: what ``os`` and libc offer on any POSIX system.

This is the honest fallback for non-Linux systems, and the base the Linux backend
builds on: mmap/munmap/mincore/madvise(MADV_WILLNEED) and pread exist on Linux, macOS
and the BSDs with the same ABI, so their bindings live here once.  What only Linux
has (cachestat(2), MADV_POPULATE_READ, per-device readahead in sysfs) is reported
unsupported here and implemented in ``_platform_linux``.

Ranges: ``length == 0`` means "to end of file" for the advice and measurement
functions (the convention of posix_fadvise(2) and cachestat(2)); measurements cover
whole pages, ``[offset rounded down to a page, offset + length rounded up)``, clipped
at end of file.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from warmpool._errors import FileChangedError, PlatformError

TYPE_CHECKING = False  # typing is not free to import; annotations are strings anyway
if TYPE_CHECKING:
    from typing import Callable

__all__ = [
    "DEFAULT_READAHEAD", "FileWindow", "PAGE_SIZE", "advise_random", "cached_bytes", "evict",
    "huge_folio_size", "platform_notes", "prefetch", "read_byte", "read_range", "readahead_size",
    "residency_hidden", "resident_bytes", "resident_pages", "supports_cachestat", "supports_populate",
]

PAGE_SIZE: int = mmap.PAGESIZE
# The Linux default read_ahead_kb; used where the OS does not say.
DEFAULT_READAHEAD = 128 * 1024
# resident_pages maps at most this much at once, so a 100 GB file never needs 100 GB
# of address space (and the kernel never builds page tables for more than this).
_RESIDENCY_WINDOW = 256 << 20
# mincore(2) sets bit 0 for "resident"; the other bits are reserved (Linux) or carry
# extra state (macOS/BSD: referenced, modified...).  Keep bit 0 only.
_BIT0 = bytes(i & 1 for i in range(256))
_FILE_CHANGED = "file shrank or was replaced while warming"

_OFF_T = ctypes.c_int64
_MAP_FAILED = ctypes.c_void_p(-1).value


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):  # TypeError: Windows refuses CDLL(None)
        return None


_libc = _load_libc()


def _bind(name: str, restype: type | None, *argtypes: type) -> Callable[..., int] | None:
    """A typed libc function, or None where this libc lacks it."""
    fn = getattr(_libc, name, None) if _libc is not None else None
    if fn is not None:
        fn.restype = restype
        fn.argtypes = argtypes
    return fn


_P, _N, _INT = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
# mmap64 on 32-bit glibc takes a 64-bit off_t; on 64-bit systems it is mmap itself.
_MMAP_ARGS = (_P, _N, _INT, _INT, _INT, _OFF_T)
_mmap = _bind("mmap64", _P, *_MMAP_ARGS) or _bind("mmap", _P, *_MMAP_ARGS)
_munmap = _bind("munmap", _INT, _P, _N)
_madvise = _bind("madvise", _INT, _P, _N, _INT)
_mincore = _bind("mincore", _INT, _P, _N, _P)


# -- small helpers -------------------------------------------------------------------


def _round_down(n: int) -> int:
    return n - n % PAGE_SIZE


def _round_up(n: int) -> int:
    return -(-n // PAGE_SIZE) * PAGE_SIZE


def _failure(what: str, err: int | None = None, why: str = "") -> PlatformError:
    err = ctypes.get_errno() if err is None else err
    return PlatformError(f"{what} failed: {os.strerror(err)} (errno {err}){why}")


def _require(fn: Callable[..., int] | None, name: str) -> Callable[..., int]:
    if fn is None:
        raise PlatformError(f"{name} is not available on this OS")
    return fn


def _fstat(fd: int) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as exc:
        raise PlatformError(f"fstat failed: {exc.strerror}") from exc


def _page_span(fd: int, offset: int, length: int) -> tuple[int, int, int]:
    """``(start, stop, limit)``: the page-rounded range clipped at EOF, and how many
    of its bytes exist (the page holding EOF is only partly file)."""
    size = _fstat(fd).st_size
    end = size if length == 0 else min(offset + length, size)
    if end <= offset:
        return 0, 0, 0
    start, stop = _round_down(offset), _round_up(end)
    return start, stop, min(stop, size) - start


def _map_readonly(fd: int, offset: int, length: int) -> int:
    """Address of a fresh read-only shared mapping: its faults map the page-cache
    pages themselves, and mapping alone reads nothing."""
    address = _require(_mmap, "mmap")(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if address is None or address == _MAP_FAILED:
        raise _failure("mmap")
    return address


def _unmap(address: int, length: int) -> None:
    if _require(_munmap, "munmap")(address, length) != 0:
        raise _failure("munmap")


def _mincore_into(address: int, length: int, out: bytearray, first_page: int) -> None:
    vector = (ctypes.c_ubyte * (_round_up(length) // PAGE_SIZE)).from_buffer(out, first_page)
    if _require(_mincore, "mincore")(address, length, ctypes.addressof(vector)) != 0:
        raise _failure("mincore")


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


# -- mapped windows ------------------------------------------------------------------


class FileWindow:
    """A read-only mapping of ``[offset, offset + length)`` of an open file.

    Mapped with libc mmap through ctypes rather than the ``mmap`` module: madvise and
    mincore need the raw address, ``ctypes`` refuses to take one from a read-only
    ``mmap`` object, and the ``np.frombuffer`` detour costs a numpy import on the hot
    path and pins the ``mmap`` (``close()`` raises BufferError while a view lives).
    Owning the mapping also makes ``close()`` deterministic.
    """

    # madvise advice that faults a range in and reports failure; None: not on this OS.
    _POPULATE_ADVICE: int | None = None

    def __init__(self, fd: int, offset: int, length: int) -> None:
        if offset % mmap.ALLOCATIONGRANULARITY or length <= 0:
            raise PlatformError(
                f"window [{offset}, +{length}) must start on a page and be non-empty")
        self.fd, self.offset, self.length = fd, offset, length
        self.address: int = _map_readonly(fd, offset, length)

    def __enter__(self) -> FileWindow:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "address", 0):
            try:
                self.close()
            except Exception:  # noqa: BLE001 - nothing to report to from a finalizer
                pass

    def close(self) -> None:
        """Unmap; later calls do nothing."""
        address, self.address = self.address, 0
        if address:
            _unmap(address, self.length)

    def _span(self, rel: int, n: int) -> tuple[int, int]:
        """(address, length) of the whole pages holding ``[rel, rel + n)``."""
        if not self.address:
            raise PlatformError("window is closed")
        if rel < 0 or n < 0 or rel + n > self.length:
            raise PlatformError(f"range [{rel}, +{n}) outside window of {self.length} bytes")
        start = _round_down(rel)
        return self.address + start, _round_up(rel + n) - start

    def resident(self) -> bytes:
        """One byte per page of the window, 1 = in the page cache."""
        out = bytearray(_round_up(self.length) // PAGE_SIZE)
        _mincore_into(self._span(0, self.length)[0], self.length, out, 0)
        return bytes(out).translate(_BIT0)

    def willneed(self, rel: int, n: int) -> None:
        """madvise(MADV_WILLNEED): a hint the kernel caps at its readahead size."""
        advice = getattr(mmap, "MADV_WILLNEED", None)
        err = self._madvise(rel, n, advice) if advice is not None else 0
        if err:
            raise _failure("madvise(MADV_WILLNEED)", err)

    # madvise advice a window may carry, by name (Python's mmap module spells the numbers).
    _ADVICE = {"normal": "MADV_NORMAL", "random": "MADV_RANDOM", "sequential": "MADV_SEQUENTIAL",
               "hugepage": "MADV_HUGEPAGE", "nohugepage": "MADV_NOHUGEPAGE"}

    def advise(self, rel: int, n: int, advice: str) -> bool:
        """Set an access pattern on the pages of ``[rel, rel + n)`` of this mapping: ``normal``,
        ``random``, ``sequential``, ``hugepage``, ``nohugepage``.  The kernel splits the mapping
        where the advice changes, so parts of one window can read differently.  Returns False
        where this OS or kernel lacks the advice (it is advice: nothing else changes)."""
        number = getattr(mmap, self._ADVICE[advice], None)
        if number is None:
            return False
        err = self._madvise(rel, n, number)
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return False  # e.g. MADV_HUGEPAGE on a kernel without transparent huge pages
        if err:
            raise _failure(f"madvise({self._ADVICE[advice]})", err)
        return True

    def populate(self, rel: int, n: int) -> None:
        """Fault the range in as if read (MADV_POPULATE_READ); waits for the I/O."""
        if self._POPULATE_ADVICE is None:
            raise PlatformError("MADV_POPULATE_READ is not available on this OS")
        err = self._madvise(rel, n, self._POPULATE_ADVICE)
        if err:
            raise self._populate_error(err, rel + n)

    def read_pages(self, rel: int, n: int) -> None:
        """Load the first byte of each page of the range through the mapping (one strided copy
        in C, no numpy).  For pages already mapped (after ``populate``) this costs a few ns
        per page on bare metal; in a VM the first CPU access to a page whose contents arrived
        by DMA can cost microseconds (measured: docs/folios.md), paid here instead of in the
        engine's first request.  Same SIGBUS danger as ``touch`` on a page past EOF."""
        address, size = self._span(rel, n)
        view = memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")
        view[::PAGE_SIZE].tobytes()

    def touch(self, rel: int, n: int) -> None:
        """Read one byte per page of the range, which faults each page in.

        DANGER: a page past EOF (the file shrank after mapping) raises SIGBUS, which
        kills the process; the pool runs this in worker processes for that reason.
        Prefer ``populate``, which returns an error instead.
        """
        import numpy as np  # lazy: numpy is a large import (docs/design.md, "Import cost")

        address, size = self._span(rel, n)
        pages = np.frombuffer((ctypes.c_ubyte * size).from_address(address), np.uint8)
        int(pages[::PAGE_SIZE].sum())  # the reads are the point; the sum is discarded

    def _madvise(self, rel: int, n: int, advice: int) -> int:
        """madvise over the whole pages of the range: 0, or the errno."""
        address, size = self._span(rel, n)
        madvise = _require(_madvise, "madvise")
        while madvise(address, size, advice) != 0:
            err = ctypes.get_errno()
            if err != errno.EINTR:
                return err
        return 0

    def _populate_error(self, err: int, rel_end: int) -> PlatformError | FileChangedError:
        what = "madvise(MADV_POPULATE_READ)"
        # EFAULT is the kernel's SIGBUS turned into an error: a page past EOF, or a
        # read error.  The file's current size tells the two apart.
        if err == errno.EFAULT:
            try:
                shrank = os.fstat(self.fd).st_size < self.offset + rel_end
            except OSError:
                shrank = True
            if shrank:
                return FileChangedError(_FILE_CHANGED)
            return PlatformError(f"{what} failed: I/O error reading the file (EFAULT)")
        if err in (errno.EINVAL, errno.ENOSYS):
            return _failure(what, err, ": not supported by this kernel (Linux >= 5.14 has it)")
        return _failure(what, err)


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
