"""A held mapping: a keeper's read-only mapping of a selection with every page mapped
(populate, refresh, touch, mlock, munlock).

Part of the platform layer (re-exported by ``_platform``); POSIX calls through the same libc
bindings as ``posix``, Linux-only files (/proc) read where they exist and reported
as unknown (None) elsewhere.  Why holding a mapping matters for residency is in docs/keep.md.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from warmpool._errors import PlatformError
from warmpool._platform import posix as _posix
from warmpool._platform.libc import page_runs
from warmpool._platform.window import FileWindow

__all__ = ["HeldMapping"]

# Linux >= 5.14; elsewhere populate falls back to touching each page.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_mlock = _posix._bind("mlock", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_munlock = _posix._bind("munlock", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
PAGE_SIZE = _posix.PAGE_SIZE
_PMD = 2 << 20  # the folio size a default warm leaves (x86-64 and arm64 with 4 KiB pages)
_ioctl = _posix._bind("ioctl", ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class _PmScanArg(ctypes.Structure):  # struct pm_scan_arg, include/uapi/linux/fs.h (Linux >= 6.7)
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


_PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(_PmScanArg) << 16) | (ord("f") << 8) | 16  # _IOWR('f', 16, ...)
_PAGE_IS_HUGE = 1 << 6


def _huge_ranges(address: int, length: int) -> list[tuple[int, int]] | None:
    """[(start, end)) of ``[address, address + length)`` that are mapped by huge (PMD) entries,
    from PAGEMAP_SCAN on /proc/self/pagemap; None where the kernel lacks it."""
    if _ioctl is None:
        return None
    regions = (_PageRegion * 512)()
    out: list[tuple[int, int]] = []
    start, end = address, address + length
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None
    try:
        while start < end:
            arg = _PmScanArg(size=ctypes.sizeof(_PmScanArg), start=start, end=end, vec=ctypes.addressof(regions),
                             vec_len=len(regions), category_mask=_PAGE_IS_HUGE, return_mask=_PAGE_IS_HUGE)
            n = _ioctl(fd, _PAGEMAP_SCAN, ctypes.byref(arg))
            if n < 0:
                return None if ctypes.get_errno() in (errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP) else out
            out.extend((regions[i].start, regions[i].end) for i in range(n))
            if arg.walk_end <= start:
                break
            start = arg.walk_end
    finally:
        os.close(fd)
    return out


class HeldMapping(FileWindow):
    """A read-only shared mapping of ``[offset, offset + length)`` of an open file that the
    caller keeps for as long as it wants the pages kept: mapped pages are what a reclaimer
    that skips mapped folios leaves alone, their accessed bits are what reclaim asks
    (``folio_referenced``), and ``mlock`` pins them."""

    _null: int | None = None  # /dev/null, opened once per process for the refresh's sendfile

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__(fd, offset, length)
        self._view = None  # numpy view for touch(), made on first use
        # A holder's faults (populate, mlock, touch) must read only the page they need: a page
        # evicted since the warm would otherwise bring the device's read-ahead around it (8 MiB
        # on many disks), which under memory pressure is most of what a keeper then reads.
        self.advise(0, length, "random")

    def _span(self, rel: int, n: int) -> tuple[int, int]:
        if not self.address:
            raise PlatformError("held mapping is closed")
        rel = max(rel, 0)
        end = min(rel + n, self.length)
        start = _posix._round_down(rel)
        return self.address + start, max(_posix._round_up(end) - start, 0)

    def populate(self, rel: int, n: int) -> bool:
        """Map the range's pages into this mapping (MADV_POPULATE_READ: faults, which read what
        is not resident).  False when the kernel could not (a page past EOF, an I/O error)."""
        address, size = self._span(rel, n)
        if not size:
            return True
        madvise = _posix._require(_posix._madvise, "madvise")
        while madvise(address, size, _MADV_POPULATE_READ) != 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            if err in (errno.EINVAL, errno.ENOSYS):  # no MADV_POPULATE_READ: touch instead
                self.touch(rel, n, PAGE_SIZE)
                return True
            return False
        return True

    def refresh(self, read_folios: bool = True) -> int:
        """Mark every resident page of the mapping accessed, reading nothing that is not resident.

        mincore, then ``MADV_POPULATE_READ`` over each run of resident pages (maps what reclaim
        unmapped), then a read that marks each folio accessed as any reader does
        (``filemap_read()``/``filemap_splice_read()`` → ``folio_mark_accessed()``, which sets
        ``PG_referenced`` and activates a folio marked already): one byte per 2 MiB where the
        mapping maps a whole 2 MiB folio with one PMD (PAGEMAP_SCAN says which), and elsewhere a
        ``sendfile`` of the run to /dev/null, which hands each page to a pipe without copying
        it.  The page walk alone does not do it (docs/keep.md).  A page evicted between mincore
        and the read is read back in (one page per race).  ``read_folios=False`` skips the reads
        (what they add: docs/probes.md, "What keeps a held selection under LRU pressure").
        Returns bytes refreshed."""
        runs = [(s * PAGE_SIZE, min(e * PAGE_SIZE, self.length)) for s, e in page_runs(self.resident())]
        done = sum(b - a for a, b in runs if self.populate(a, b - a))
        if read_folios and runs:
            huge = _huge_ranges(self.address, self.length) or []
            for a, b in runs:
                self._mark_read(a, b, huge)
        return done

    def _mark_read(self, a: int, b: int, huge: list[tuple[int, int]]) -> None:
        """The reads of ``refresh`` over the resident run [a, b) of the mapping."""
        pos = a
        for h0, h1 in huge:
            h0, h1 = max(h0 - self.address, a), min(h1 - self.address, b)
            if h1 <= h0:
                continue
            self._sendfile(pos, h0)
            for offset in range(h0, h1, _PMD):
                os.pread(self.fd, 1, self.offset + offset)
            pos = h1
        self._sendfile(pos, b)

    def _sendfile(self, a: int, b: int) -> None:
        if b <= a:
            return
        if HeldMapping._null is None:
            HeldMapping._null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        offset, end = self.offset + a, self.offset + b
        while offset < end:
            sent = os.sendfile(HeldMapping._null, self.fd, offset, end - offset)
            if sent <= 0:
                return
            offset += sent

    def touch(self, rel: int, n: int, stride: int = PAGE_SIZE) -> int:
        """Read one byte every ``stride`` bytes of the range: sets the accessed bit of each
        touched page table entry (and maps the page if it was not).  Returns bytes touched."""
        import numpy as np  # lazy: only the touch mode pays for numpy

        if self._view is None:
            self._view = np.ctypeslib.as_array((ctypes.c_ubyte * self.length).from_address(self.address))
        rel, end = max(rel, 0), min(rel + n, self.length)
        if end > rel:
            int(self._view[rel:end:stride].sum())  # the loads are the point; the sum is discarded
        return max(end - rel, 0)

    def lock(self, rel: int, n: int) -> int:
        """mlock the whole pages of the range: 0, or the errno (ENOMEM/EAGAIN over
        RLIMIT_MEMLOCK, EPERM without the right to lock)."""
        address, size = self._span(rel, n)
        if size and _posix._require(_mlock, "mlock")(address, size) != 0:
            return ctypes.get_errno()
        return 0

    def unlock(self) -> None:
        if self.address and _munlock is not None:
            _munlock(self.address, self.length)

    def resident(self, rel: int = 0, n: int | None = None) -> bytes:
        """One byte per page of the range (default: all), 1 = in the page cache: mincore on
        this mapping, with no mmap/munmap per call (what makes it ~10x cheaper than
        ``resident_pages`` where there is no cachestat)."""
        address, size = self._span(rel, self.length - rel if n is None else n)
        out = bytearray(size // PAGE_SIZE)
        _posix._mincore_into(address, size, out, 0)
        return bytes(out).translate(_posix._BIT0)

    def close(self) -> None:
        """Unmap (which also unlocks); later calls do nothing."""
        self._view = None
        super().close()
