"""Linux backend: the POSIX base plus cachestat(2), MADV_POPULATE_READ and the
per-device readahead size from sysfs.

What each call relies on is in docs/design.md ("Residency", "Readahead and hints"), with
its figures; each feature is probed once, so older kernels fall back
instead of failing.
"""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
import os
import threading

from warmpool._platform import posix as _posix
from warmpool._platform.blockdev import read_ahead_bytes
from warmpool._platform.posix import (
    DEFAULT_READAHEAD,
    PAGE_SIZE,
    advise_random,
    evict,
    read_byte,
    read_range,
    resident_bytes,
    resident_pages,
)
from warmpool._platform.proc import read_int

__all__ = [
    "DEFAULT_READAHEAD",
    "FileWindow",
    "PAGE_SIZE",
    "advise_random",
    "cache_counts",
    "cached_bytes",
    "evict",
    "huge_folio_size",
    "lower_priority",
    "platform_notes",
    "prefetch",
    "read_byte",
    "read_range",
    "readahead_size",
    "residency_hidden",
    "resident_bytes",
    "resident_pages",
    "supports_cachestat",
    "supports_populate",
]

# Linux >= 5.14 (include/uapi/asm-generic/mman-common.h); Python's mmap lacks it.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
# cachestat(2), Linux >= 6.5.  451 in the generic table on these two; other
# architectures are left out rather than risk calling a different syscall.
_SYS_CACHESTAT = {"x86_64": 451, "aarch64": 451}.get(os.uname().machine)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_syscall = _posix._bind("syscall", ctypes.c_long, ctypes.c_long, ctypes.c_int,
                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint)


# -- readahead -----------------------------------------------------------------------

def readahead_size(fd: int) -> int:
    """The readahead size in bytes of the device holding the open file (cached per device)."""
    size = read_ahead_bytes(_posix._fstat(fd).st_dev)
    return DEFAULT_READAHEAD if size is None else max(_posix._round_down(size), PAGE_SIZE)


def prefetch(fd: int, offset: int, length: int) -> None:
    """Queue reads of exactly the range (``length == 0``: to EOF).

    One POSIX_FADV_WILLNEED reads at most max(bdi io_pages, ra_pages) pages
    (force_page_cache_ra in mm/readahead.c), the readahead size on most disks.
    Requests of readahead-size steps are each read in full, and read nothing outside
    the range, unlike faulting or plain reads (docs/design.md).

    Mostly asynchronous: the pages enter the cache locked and are read behind the
    caller's back, but a call blocks once the device queue is full
    (docs/design.md, "Readahead and hints").  Prefetch a chunk or two ahead, then
    ``FileWindow.populate`` waits for what is still in flight.
    """
    _posix._stepped_willneed(fd, offset, length, readahead_size(fd))


# -- huge folios ---------------------------------------------------------------------

_huge_folio_size: int | None | bool = False  # False: not probed yet


def huge_folio_size() -> int | None:
    """Bytes of a PMD-size folio (2 MiB on x86-64 and arm64 with 4 KiB pages), or None where
    the kernel has no transparent huge pages: the size a fault under MADV_HUGEPAGE reads and
    caches at once (``do_sync_mmap_readahead``, mm/filemap.c).  Read once from sysfs."""
    global _huge_folio_size
    if _huge_folio_size is False:
        size = read_int("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")  # in bytes
        _huge_folio_size = size if size and size % PAGE_SIZE == 0 else None
    return _huge_folio_size


# -- cachestat -----------------------------------------------------------------------

_cachestat_works: bool | None = None


def supports_cachestat() -> bool:
    """Whether cachestat(2) exists and is allowed (probed once).

    Probed on fd -1: the kernel answers EBADF when the syscall exists, ENOSYS when
    it does not, and a seccomp filter (containers) answers EPERM or ENOSYS.
    """
    global _cachestat_works
    if _cachestat_works is None:
        _cachestat_works = _cachestat_probe()
    return _cachestat_works


def _cachestat_probe() -> bool:
    if _SYS_CACHESTAT is None or _syscall is None:
        return False
    result = _syscall(_SYS_CACHESTAT, -1, ctypes.byref(_CachestatRange()),
                      ctypes.byref(_Cachestat()), 0)
    return result == 0 or ctypes.get_errno() == errno.EBADF


def _cached_pages(fd: int, offset: int, length: int) -> int | None:
    """nr_cache of cachestat(2) over the range; None where this file cannot be asked."""
    stats = _cachestat(fd, offset, length)
    return None if stats is None else stats.nr_cache


def _cachestat(fd: int, offset: int, length: int, stats: _Cachestat | None = None,
               byte_range: _CachestatRange | None = None) -> _Cachestat | None:
    """cachestat(2) over the range (all its counts, into ``stats`` when given: a caller asking
    about thousands of ranges reuses one pair of structs); None where this file cannot be asked.

    Since 6.14 cachestat refuses (EPERM) files the caller neither owns nor may write,
    like mincore; hugetlbfs answers EOPNOTSUPP.
    """
    stats = _Cachestat() if stats is None else stats
    byte_range = _CachestatRange() if byte_range is None else byte_range
    byte_range.off, byte_range.len = offset, length
    if _syscall(_SYS_CACHESTAT, fd, ctypes.byref(byte_range), ctypes.byref(stats), 0) == 0:
        return stats
    err = ctypes.get_errno()
    if err in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
        return None
    raise _posix._failure("cachestat", err)


def cached_bytes(fd: int, offset: int, length: int) -> int | None:
    """Bytes of the page-rounded range in the page cache by cachestat(2): no mapping, orders of
    magnitude cheaper than mincore (docs/design.md, "Residency: mincore and cachestat").  None where cachestat is
    unavailable (Linux < 6.5, other architecture, seccomp, EPERM on this file).

    It counts pages whose read is still in flight (it does not check uptodate, which
    mincore does): right after ``prefetch`` it can report the whole range while
    ``resident_bytes`` reports what has arrived.  Exact once the reads completed.
    """
    if not supports_cachestat():
        return None
    start, stop, limit = _posix._page_span(fd, offset, length)
    if stop == start:
        return 0
    pages = _cached_pages(fd, start, stop - start)
    return None if pages is None else min(pages * PAGE_SIZE, limit)


def cache_counts(fd: int, ranges) -> list[tuple[int, int, int]] | None:
    """Per ``(offset, length)`` range of one open file, cachestat(2)'s ``(nr_cache, nr_evicted,
    nr_recently_evicted)`` in pages: resident now, evicted (a shadow entry remains), and evicted
    recently enough that reading it again counts as a refault of the working set
    (mm/workingset.c).  One syscall per range, no mapping: the cost of a residency sample over
    thousands of expert slices (docs/experts.md).  None where cachestat cannot be asked."""
    if not supports_cachestat():
        return None
    stats, byte_range = _Cachestat(), _CachestatRange()
    counts = []
    for offset, length in ranges:
        if _cachestat(fd, offset, length, stats, byte_range) is None:
            return None
        counts.append((stats.nr_cache, stats.nr_evicted, stats.nr_recently_evicted))
    return counts


# -- residency the kernel hides -------------------------------------------------------

# The probe page lies this far past the end of the file: further than any folio reaches (a
# large folio that a truncate could not split may still cover a page or two past EOF).
_PROBE_GAP = 1 << 30


def residency_hidden(fd: int) -> bool:
    """Whether the kernel hides this file's page-cache residency from us (docs/design.md,
    "Residency the kernel hides").

    Linux >= 5.2 (``can_do_mincore`` in mm/mincore.c) answers mincore(2) truthfully only for
    a file the caller owns (or has CAP_FOWNER over) or may open for writing; for any other
    file it fills the vector with 1s, "all resident".  Rather than re-implement that rule
    (fsuid, capabilities, ACLs, user namespaces, LSMs), ask the kernel about a page that
    cannot be cached: one well past end of file.  Mapping it reads nothing; mincore says 0
    for it unless the answer is made up.
    """
    probe = _posix._round_up(_posix._fstat(fd).st_size) + _PROBE_GAP
    address = _posix._map_readonly(fd, probe, PAGE_SIZE)
    try:
        out = bytearray(1)
        _posix._mincore_into(address, PAGE_SIZE, out, 0)
    finally:
        _posix._unmap(address, PAGE_SIZE)
    return bool(out[0] & 1)


# -- populate ------------------------------------------------------------------------

_populate_works: bool | None = None


def supports_populate() -> bool:
    """Whether madvise(MADV_POPULATE_READ) works (Linux >= 5.14; probed once on one
    anonymous page: older kernels answer EINVAL)."""
    global _populate_works
    if _populate_works is None:
        _populate_works = _populate_probe()
    return _populate_works


def _populate_probe() -> bool:
    if _posix._mmap is None or _posix._madvise is None:
        return False
    address = _posix._mmap(None, PAGE_SIZE, mmap.PROT_READ,
                           mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if address is None or address == _posix._MAP_FAILED:
        raise _posix._failure("mmap of a probe page")
    try:
        return _posix._madvise(address, PAGE_SIZE, MADV_POPULATE_READ) == 0
    finally:
        _posix._unmap(address, PAGE_SIZE)


_pwritev = _posix._bind("pwritev", ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_long)
_IOV_MAX = 1024


class _Sink:
    """A memfd: pwritev's destination, always written at offset 0.  One per thread, because a
    shmem write holds the file's inode lock, so fault threads sharing one took turns; closed
    when its thread ends (a caller's threads may be short-lived; a worker's fault threads
    last as long as the worker)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        os.close(self.fd)


_sinks = threading.local()


def _sink_fd() -> int | None:
    sink = getattr(_sinks, "sink", None)
    if sink is None:
        try:
            fd = os.memfd_create("warmpool-read-pages", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            return None
        sink = _sinks.sink = _Sink(fd)
    return sink.fd


class FileWindow(_posix.FileWindow):
    """The POSIX window plus ``populate``: MADV_POPULATE_READ faults the range in and
    returns EFAULT on a page past EOF, where touching the bytes would raise SIGBUS."""

    _POPULATE_ADVICE = MADV_POPULATE_READ

    def read_pages(self, rel: int, n: int) -> None:
        """As the POSIX window's, but the kernel reads the bytes: ``pwritev`` of one byte per
        page, up to 1024 pages a call, into a memfd of the calling thread (always at offset 0, so
        it stays one page).  The kernel copies them with ordinary user accesses (copy_from_user),
        the calling thread releases the GIL meanwhile, and a page past EOF ends the call with
        EFAULT instead of SIGBUS.  The iovecs are built by slice assignment: one ctypes
        structure per page cost ~1 µs a page, most of what this call used to cost
        (docs/performance.md, "Pool size and start-up")."""
        sink = _sink_fd() if _pwritev is not None else None
        if sink is None:
            return super().read_pages(rel, n)
        address, size = self._span(rel, n)
        pages = size // PAGE_SIZE
        for first in range(0, pages, _IOV_MAX):
            count = min(_IOV_MAX, pages - first)
            base = address + first * PAGE_SIZE
            # (address, 1) pairs built by slice assignment: C loops, not one ctypes object a page
            pairs = [1] * (2 * count)
            pairs[0::2] = range(base, base + count * PAGE_SIZE, PAGE_SIZE)
            iov = array.array("Q" if ctypes.sizeof(ctypes.c_void_p) == 8 else "L", pairs)
            if _pwritev(sink, iov.buffer_info()[0], count, 0) < 0:
                err = ctypes.get_errno()
                if err == errno.EFAULT:  # a page past EOF: the file shrank, as populate reports it
                    raise self._populate_error(err, rel + n)
                if err in (errno.ENOSYS, errno.EPERM):
                    return super().read_pages(rel, n)
                raise _posix._failure("pwritev", err)


# -- scheduling ----------------------------------------------------------------------


def lower_priority() -> str | None:
    """SCHED_IDLE for the calling thread and the threads it starts later: it runs only on CPU
    time no normal task wants, and, unless an I/O class was set, its reads go to the block layer
    in the idle I/O class (docs/design.md, "Worker processes").  Any process may lower itself to
    it (sched(7)); where a sandbox refuses, nice 19.  Returns what was applied."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        return _posix.lower_priority()
    return "SCHED_IDLE"


# -- features ------------------------------------------------------------------------


def platform_notes() -> list[str]:
    """What this kernel lacks, one line each, for the coordinator to say once."""
    notes = []
    if not supports_populate():
        notes.append("MADV_POPULATE_READ unavailable (Linux < 5.14): windows must be "
                     "warmed by touching or reading them")
    if not supports_cachestat():
        notes.append("cachestat(2) unavailable (Linux < 6.5, other architecture or "
                     "seccomp): cached_bytes() says None, resident_bytes() maps and "
                     "asks mincore(2)")
    return notes
