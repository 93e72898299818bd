"""The workers' CPU priority: ``priority="idle"`` runs every worker thread under SCHED_IDLE and
still warms everything; ``"normal"`` (the API's and the CLI's default) leaves them as they were;
engine_adapter.start_warmup defaults to idle.

Each test warms its own evicted copy of the model with small chunks, so the warm lasts long
enough for the live workers' scheduling policy to be read from the kernel (sched_getscheduler
of every thread in /proc/PID/task).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import evict_file, resident_fraction

import warmpool
from engine_adapter import start_warmup

pytestmark = pytest.mark.pagecache

SLOW = dict(workers=2, chunk_size=16 * 1024)  # thousands of chunks: seconds, not milliseconds


def worker_policies(parent: int) -> dict[int, set[int]]:
    """Scheduling policy of every thread of each live pool worker of ``parent``."""
    found = {}
    try:
        children = psutil.Process(parent).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for child in children:
        try:
            # Workers are forks of the pool's fork server (``_pool.forkserver``): its children.
            if child.ppid() == parent or "warmpool._pool import forkserver" not in " ".join(child.cmdline()):
                continue
            found[child.pid] = {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{child.pid}/task")}
        except (psutil.Error, OSError):  # it exited meanwhile
            continue
    return found


def watch(parent: int, running, want: int) -> tuple[int, dict]:
    """Poll the workers of ``parent`` while ``running()``; return how many workers were seen in
    ``want`` on every thread, and the last policies seen (for the failure message)."""
    seen, last = set(), {}
    while running():
        policies = worker_policies(parent)
        last = policies or last
        seen |= {pid for pid, ps in policies.items() if ps == {want}}
        time.sleep(0.005)
    return len(seen), last


def test_idle_priority_runs_every_worker_thread_under_sched_idle(private_model):
    evict_file(private_model)
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=warmpool.warm(private_model, priority="idle", **SLOW)))
    thread.start()
    idle, last = watch(os.getpid(), thread.is_alive, os.SCHED_IDLE)
    thread.join()
    assert idle >= 1, f"no worker ran under SCHED_IDLE; policies seen: {last}"
    result = out["r"]
    assert result.workers >= 1 and result.bytes_warmed > 0
    # Reclaim may take a few pages of a slow warm; the warm reads them again at its end, but one
    # can still go before its last mincore, which reports it: "everything" is ≥ 99 % here.
    assert result.resident_fraction >= 0.99 and resident_fraction(private_model) >= 0.99


def test_start_warmup_defaults_to_idle_priority(private_model):
    evict_file(private_model)
    warmup = start_warmup(private_model, **SLOW)
    idle, last = watch(os.getpid(), lambda: not warmup.finished, os.SCHED_IDLE)
    result = warmup.wait()
    assert warmup.error is None, warmup.error
    assert idle >= 1, f"no worker of start_warmup ran under SCHED_IDLE; policies seen: {last}"
    assert result.resident_fraction >= 0.99  # as above: reclaim may take a few pages of a slow warm


def test_cli_default_keeps_normal_priority_and_flag_lowers_it(private_model):
    """`warmpool warm` leaves its workers at the caller's policy; --priority idle lowers them."""
    for flag, want in (([], os.SCHED_OTHER), (["--priority", "idle"], os.SCHED_IDLE)):
        evict_file(private_model)
        proc = subprocess.Popen([sys.executable, "-m", "warmpool", "warm", str(private_model), "--json",
                                 "--no-progress", "--workers", "2", "--chunk-size", "16K", *flag],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        matching, last = watch(proc.pid, lambda: proc.poll() is None, want)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assert matching >= 1, f"{flag}: no worker under policy {want}; policies seen: {last}"
        assert json.loads(stdout)["resident_fraction"] == 1.0


def test_bad_priority_is_one_line_and_starts_nothing(private_model):
    with pytest.raises(warmpool.WarmError, match="unknown priority 'low': expected one of normal, idle"):
        warmpool.warm(private_model, priority="low")
    assert worker_policies(os.getpid()) == {}
    run = subprocess.run([sys.executable, "-m", "warmpool", "warm", str(private_model), "--priority", "low"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "--priority" in run.stderr and "invalid choice: 'low'" in run.stderr


def test_posix_fallback_lowers_to_nice_19():
    """Where SCHED_IDLE is refused the Linux backend falls back to the POSIX one: nice 19, for
    the calling thread (run in a child so this test process keeps its own priority)."""
    code = ("import os; from warmpool._platform import posix as p; "
            "print(p.lower_priority(), os.getpriority(os.PRIO_PROCESS, 0))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["nice", "19", "19"]


def test_run_keeps_its_own_threads_at_idle_beside_the_engine(private_model, tmp_path):
    """``warmpool run -- ENGINE``: the engine is a process of its own at its own priority; every
    thread of warmpool's beside it (the one that plans, the keeper's, its checks) runs under
    SCHED_IDLE, and the main thread, which only waits on the engine, is left as it was."""
    engine = [sys.executable, "-c", "import time; time.sleep(4)"]
    proc = subprocess.Popen([sys.executable, "-m", "warmpool", "run", "-m", str(private_model), "--interval", "0.2",
                             "--", *engine], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, seen = time.monotonic() + 3.5, {}  # tid -> its policy at each sample, in order
        while time.monotonic() < deadline and proc.poll() is None:
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                try:
                    seen.setdefault(int(tid), []).append(os.sched_getscheduler(int(tid)))
                except OSError:
                    pass  # a thread that ended meanwhile
            time.sleep(0.002)
    finally:
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    main = set(seen.pop(proc.pid))
    assert any(len(p) > 1 for p in seen.values()), f"warmpool run never had a thread beside its main one: {err}"
    assert main == {os.SCHED_OTHER}, main
    # warmpool's thread lowers itself once it has imported the platform layer (after the engine's
    # spawn, which waits on no import of it): its first samples, a few milliseconds, may precede
    # that; the threads it starts inherit the policy.  Once idle, a thread stays idle.
    for tid, policies in seen.items():
        if len(policies) > 1:
            assert os.SCHED_IDLE in policies, (tid, policies)
            lowered = policies.index(os.SCHED_IDLE)
            assert lowered <= 50 and set(policies[lowered:]) == {os.SCHED_IDLE}, (tid, policies)
