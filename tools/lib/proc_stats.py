"""What tools/keep_bench.py reads about a process around each request, from /proc: disk bytes
read, CPU time, run and run-queue time of the calling thread, steal time (a process tree's
RssAnon is ``measure.rss_anon_tree``)."""

from __future__ import annotations

import os
import resource


def read_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and of its children it has waited for (the workers)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def usage() -> resource.struct_rusage:
    """This process's own rusage (faults, context switches); the engine runs in it."""
    return resource.getrusage(resource.RUSAGE_SELF)


def sched() -> tuple[float, float]:
    """Seconds this thread has run on a CPU and spent runnable but waiting for one
    (/proc/thread-self/schedstat, first two fields); (0.0, 0.0) where the kernel has no schedstat.
    The wait, unlike involuntary context switches, also counts the wait after a sleep (a lock,
    reclaim) before the thread got a CPU back. The run time leaves out time the hypervisor gave
    the vCPU to someone else where the kernel accounts steal time (CONFIG_PARAVIRT_TIME_ACCOUNTING
    subtracts it from the clock the scheduler charges tasks with), so wall time minus both is
    time off the CPU: stolen by the host, or blocked."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            ran, queued = f.read().split()[:2]
            return int(ran) / 1e9, int(queued) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


def steal_ticks() -> int:
    """Steal time of all CPUs so far, in USER_HZ ticks (/proc/stat); 0 where not reported."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) if len(fields) > 8 else 0
    except (OSError, ValueError):
        return 0
