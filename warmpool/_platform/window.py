"""A read-only mapping of part of an open file: the unit a worker faults in, measures and
advises (populate, touch, read_pages, mincore, madvise)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from warmpool._errors import FileChangedError, PlatformError
from warmpool._platform.libc import (
    _BIT0,
    PAGE_SIZE,
    _failure,
    _madvise,
    _map_readonly,
    _mincore_into,
    _require,
    _round_down,
    _round_up,
    _unmap,
)

__all__ = ["FILE_CHANGED", "FileWindow"]

FILE_CHANGED = "file shrank or was replaced while warming"


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

    def resident(self, skip: tuple[int, int] = (0, 0)) -> bytes:
        """One byte per page of the window, 1 = in the page cache.  The pages of the
        page-aligned ``skip`` range (relative) are not looked up and read 0."""
        out = bytearray(_round_up(self.length) // PAGE_SIZE)
        lo, hi = skip if skip[0] < skip[1] else (self.length, self.length)
        for start, end in ((0, lo), (hi, self.length)):
            if start < end:
                _mincore_into(self._span(start, end - start)[0], end - start, out, start // PAGE_SIZE)
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
        self.touch(rel, n)

    def touch(self, rel: int, n: int) -> None:
        """Read one byte per page of the range, which faults each page in: one strided copy in
        C, holding the GIL for its whole length (page faults and their reads included).

        DANGER: a page past EOF (the file shrank after mapping) raises SIGBUS, which
        kills the process; the pool runs this in worker processes for that reason.
        Prefer ``populate``, which returns an error instead.
        """
        address, size = self._span(rel, n)
        view = memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")
        view[::PAGE_SIZE].tobytes()

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
                return FileChangedError(FILE_CHANGED)
            return PlatformError(f"{what} failed: I/O error reading the file (EFAULT)")
        if err in (errno.EINVAL, errno.ENOSYS):
            return _failure(what, err, ": not supported by this kernel (Linux >= 5.14 has it)")
        return _failure(what, err)
