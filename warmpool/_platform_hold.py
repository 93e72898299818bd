"""OS calls of a long-lived keeper: a held mapping (populate, touch, mlock, munlock), the
memlock limit, locked bytes as the kernel counts them, memory pressure (PSI) and whether a
process is alive.

Part of the platform layer (re-exported by ``_platform``); POSIX calls through the same libc
bindings as ``_platform_posix``, Linux-only files (/proc) read where they exist and reported
as unknown (None) elsewhere.  Why holding a mapping matters for residency is in docs/keep.md.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource

from warmpool import _platform_posix as _posix
from warmpool._errors import PlatformError
from warmpool._platform_window import FileWindow

__all__ = ["HeldMapping", "locked_bytes", "memlock_limit", "memory_pressure", "physical_memory", "pid_alive"]

# Linux >= 5.14; elsewhere populate falls back to touching each page.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_mlock = _posix._bind("mlock", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_munlock = _posix._bind("munlock", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
PAGE_SIZE = _posix.PAGE_SIZE
_PMD = 2 << 20  # the folio size a default warm leaves (x86-64 and arm64 with 4 KiB pages)


class HeldMapping(FileWindow):
    """A read-only shared mapping of ``[offset, offset + length)`` of an open file that the
    caller keeps for as long as it wants the pages kept: mapped pages are what a reclaimer
    that skips mapped folios leaves alone, their accessed bits are what reclaim asks
    (``folio_referenced``), and ``mlock`` pins them."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__(fd, offset, length)
        self._view = None  # numpy view for touch(), made on first use

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

    def refresh(self) -> int:
        """Mark every resident page of the mapping accessed, reading nothing that is not resident:
        mincore, then MADV_POPULATE_READ over each run of resident pages.  Its page walk marks the
        folios it finds accessed (``FOLL_TOUCH``: ``folio_mark_accessed()``, a young PMD), which
        is what LRU reclaim asks before it takes a mapped file folio.  A page evicted between the
        two calls is read back in (one page per race, at most).  Returns bytes refreshed."""
        vector = self.resident()
        done, start = 0, vector.find(1)
        while start >= 0:
            end = vector.find(0, start)
            end = len(vector) if end < 0 else end
            n = min(end * PAGE_SIZE, self.length) - start * PAGE_SIZE
            if self.populate(start * PAGE_SIZE, n):
                done += n
            # The walk sets only the accessed bit of a PMD-mapped 2 MiB folio, and that alone did
            # not keep such folios under LRU pressure here (docs/keep.md): a 1-byte read of each
            # marks the folio accessed as any reader would (filemap_read -> folio_mark_accessed).
            first = self.offset + start * PAGE_SIZE
            for offset in range(first + (-first % _PMD), first + n, _PMD):
                os.pread(self.fd, 1, offset)
            start = vector.find(1, end)
        return done

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


def memlock_limit() -> int | None:
    """RLIMIT_MEMLOCK's soft limit in bytes; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def _status_kb(pid: int | str, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def locked_bytes(pid: int | str = "self") -> int | None:
    """VmLck of a process (bytes the kernel counts as mlocked by it); None where unknown."""
    return _status_kb(pid, "VmLck")


def physical_memory() -> tuple[int, int] | None:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo; None where either is missing (not
    Linux, or a kernel before 3.14).  What psutil.virtual_memory() reports as total and
    available on Linux, without importing psutil (~10 ms before a cold warm's first worker;
    docs/bench/warm_speed_phases.md)."""
    found = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    found[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if len(found) < 2:
        return None
    return found["MemTotal"], min(found["MemAvailable"], found["MemTotal"])


def memory_pressure() -> float | None:
    """PSI memory "some" avg10 (percent of the last 10 s some task stalled on memory):
    the cgroup's where it has one, else the system's; None without PSI."""
    paths = ["/proc/pressure/memory"]
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    paths.insert(0, f"/sys/fs/cgroup{line[3:].strip()}/memory.pressure")
    except OSError:
        pass
    for path in paths:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("some "):
                        return float(dict(kv.split("=") for kv in line.split()[1:])["avg10"])
        except (OSError, ValueError, KeyError):
            continue
    return None


def pid_alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (a pid <= 0 names no single process:
    kill(0, 0) would ask about our own process group)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc: kill(0) said it exists
