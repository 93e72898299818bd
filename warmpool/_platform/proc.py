"""What the kernel tells about processes and memory: the memlock limit and locked bytes, RAM
and the memory cgroup's limit, memory pressure (PSI), whether a process is alive, and whether
this guest hands free memory back to its host.

Linux files (/proc, /sys) are read where they exist; elsewhere each answer is unknown (None).
"""

from __future__ import annotations

import os
import resource
from typing import NamedTuple

__all__ = ["CgroupMemory", "PAGE_REPORTING_ORDER", "cgroup_memory", "cpu_idle_seconds", "free_page_reporting", "locked_bytes",
           "memlock_limit", "memory_pressure", "page_reporting_order", "physical_memory", "pid_alive",
           "process_cpu_seconds", "read_int", "storage_read_bytes"]

CGROUP = "/sys/fs/cgroup"


class CgroupMemory(NamedTuple):
    limit: int | None  # bytes; None when unlimited ("max" in v2, a page-rounded LONG_MAX in v1)
    usage: int  # bytes charged now, page cache included
    inactive_file: int  # of those, inactive file pages (the kernel reclaims them first)
    limit_file: str  # v2 memory.max or v1 memory.limit_in_bytes: which one, for messages
    # Of the usage, what reclaim cannot take without swap: anonymous memory (v2 ``anon``, v1
    # ``total_rss``) and unevictable pages, mlocked ones included (``unevictable``).
    anon: int = 0
    unevictable: int = 0


def memlock_limit() -> int | None:
    """RLIMIT_MEMLOCK's soft limit in bytes; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def _proc_kb(path: str, *fields: str) -> dict[str, int]:
    """The ``Field: N kB`` lines of a /proc file (status, meminfo) that are asked for, in bytes;
    whatever is missing or unreadable is left out."""
    found: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in fields:
                    found[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found


def locked_bytes(pid: int | str = "self") -> int | None:
    """VmLck of a process (bytes the kernel counts as mlocked by it); None where unknown."""
    return _proc_kb(f"/proc/{pid}/status", "VmLck").get("VmLck")


def storage_read_bytes(pid: int | str = "self") -> int | None:
    """Bytes the process (all its threads) had read from block devices: ``read_bytes`` of
    /proc/PID/io, counted as each read bio is submitted (``submit_bio``), page faults and
    readahead included, page-cache hits not; reads of FUSE and NFS files submit no bio and do
    not count.  None where unknown (no such process, no permission, no task I/O accounting)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds the process (all its threads) has used, user and system (``utime`` +
    ``stime`` of /proc/PID/stat, in USER_HZ ticks: 10 ms steps); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_idle_seconds() -> float | None:
    """CPU seconds all CPUs have spent idle or waiting for I/O since boot (/proc/stat's first
    line: ``idle`` plus ``iowait``, in USER_HZ ticks); None where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def physical_memory() -> tuple[int, int] | None:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo; None where either is missing (not
    Linux, or a kernel before 3.14).  What psutil.virtual_memory() reports as total and
    available on Linux, without importing psutil (~10 ms before a cold warm's first worker;
    docs/performance.md, "Pool size and start-up")."""
    found = _proc_kb("/proc/meminfo", "MemTotal", "MemAvailable")
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


_VIRTIO_BALLOON_F_REPORTING = 5  # include/uapi/linux/virtio_balloon.h
PAGE_REPORTING_ORDER = "module/page_reporting/parameters/page_reporting_order"  # under sysfs


def page_reporting_order(sysfs: str = "/sys") -> int | None:
    """The running value of mm/page_reporting.c's ``page_reporting_order`` parameter; None where
    the kernel has no page reporting.  Whether anything is reported also takes a reporting
    device: ``free_page_reporting``."""
    return read_int(f"{sysfs}/{PAGE_REPORTING_ORDER}")


def free_page_reporting(sysfs: str = "/sys", buddyinfo: str = "/proc/buddyinfo") -> int | None:
    """The order of the free blocks this guest hands back to its host (free page reporting,
    mm/page_reporting.c, through a virtio balloon that offers ``VIRTIO_BALLOON_F_REPORTING``),
    or None where it is not known to: no such device, or an order above the largest free block
    (``/proc/buddyinfo`` has one column per order), which reports nothing.  Under memory
    pressure such a guest makes an engine's first read of idle pages slower, and keeping the
    pages resident does not prevent it (docs/keep.md).  Hyper-V's balloon also reports; it is
    not detected here."""
    order = page_reporting_order(sysfs)
    if order is None:
        return None
    try:
        with open(buddyinfo) as f:
            largest = len(f.readline().split()) - 5  # "Node 0, zone DMA" and one count per order
    except OSError:
        return None
    if not 0 <= order <= largest:
        return None
    base = f"{sysfs}/bus/virtio/drivers/virtio_balloon"
    try:
        devices = [name for name in os.listdir(base) if name.startswith("virtio")]
    except OSError:
        return None
    for name in devices:
        try:
            with open(f"{base}/{name}/features") as f:
                bits = f.read().strip()  # one character per feature bit, bit 0 first
        except OSError:
            continue
        if len(bits) > _VIRTIO_BALLOON_F_REPORTING and bits[_VIRTIO_BALLOON_F_REPORTING] == "1":
            return order
    return None


def read_int(path: str) -> int | None:
    """The integer a small /proc or /sys file holds; None where it is missing, unreadable or not
    a number (cgroup v2 writes "max").  Every such read of the platform layer goes through here."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded LONG_MAX


def _cgroup_files() -> tuple[str, str] | None:
    """(limit file, usage file) of this process's memory cgroup: v2, else v1."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and os.path.exists(f"{CGROUP}{path}/memory.max"):
            return f"{CGROUP}{path}/memory.max", f"{CGROUP}{path}/memory.current"
        if "memory" in controllers.split(","):
            base = f"{CGROUP}/memory{path}"
            return f"{base}/memory.limit_in_bytes", f"{base}/memory.usage_in_bytes"
    return None


def _memory_stat(cgroup_dir: str) -> tuple[int, int, int]:
    """The cgroup's (inactive file, anon, unevictable) bytes from memory.stat: v1's
    hierarchical ``total_*`` lines where they exist, else v2's (already hierarchical)."""
    try:
        with open(f"{cgroup_dir}/memory.stat") as f:
            stat = dict(line.split() for line in f if line.count(" ") == 1)
    except OSError:
        return 0, 0, 0

    def get(v1: str, v2: str) -> int:
        return int(stat.get(f"total_{v1}", stat.get(v2, 0)))

    return get("inactive_file", "inactive_file"), get("rss", "anon"), get("unevictable", "unevictable")


def cgroup_memory() -> CgroupMemory | None:
    """This process's memory cgroup (v2, else v1); None where there is none."""
    files = _cgroup_files()
    if files is None:
        return None
    limit = read_int(files[0])
    inactive_file, anon, unevictable = _memory_stat(os.path.dirname(files[1]))
    return CgroupMemory(limit if limit is not None and limit < UNLIMITED else None, read_int(files[1]) or 0,
                        inactive_file, files[0], anon, unevictable)
