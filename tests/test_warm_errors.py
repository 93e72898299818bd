"""Errors a warm must name itself: an unknown strategy, a worker that cannot start its work,
a worker process that cannot be started, and one that dies before it has its job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import psutil
import pytest
from conftest import evict_file

import warmpool
from warmpool import WarmError, WorkerDiedError
from warmpool._pool import coordinator as _pool
from warmpool._pool import forkserver
from warmpool._progress.segment import ProgressSegment


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize("selection", [{}, {"n_gpu_layers": 99}])  # a warm with and without work
def test_unknown_strategy_is_refused(tiny_model, selection):
    with pytest.raises(WarmError, match="unknown strategy 'bogus'"):
        warmpool.warm(tiny_model, strategy="bogus", **selection)


def test_unknown_strategy_is_refused_by_the_pool(tiny_model):
    plan = warmpool.plan_model(tiny_model)
    with ProgressSegment.create(1, 1, plan.chunks, plan.n_layers) as segment:
        with pytest.raises(WarmError, match="unknown strategy 'auto'"):  # the pool runs resolved names only
            _pool.run_pool([str(tiny_model)], plan.chunks, [0], "auto", segment)


def test_cli_offers_exactly_the_strategies_a_worker_runs(tiny_model):
    run = subprocess.run([sys.executable, "-m", "warmpool", "warm", str(tiny_model), "--strategy", "bogus"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "invalid choice" in run.stderr
    for name in ("populate", "touch", "read", "willneed"):
        assert f"'{name}'" in run.stderr


def test_file_gone_before_the_workers_open_it_is_a_file_changed_error(private_model):
    """The file vanishes after the plan (and the coordinator's open) but before a worker opens
    it: the worker's own FileChangedError, no worker traceback, no "worker died"."""
    script = """
import os, sys, warmpool
path = sys.argv[1]
try:
    warmpool.warm(path, workers=2, on_start=lambda name: os.unlink(path))
except warmpool.WarmpoolError as e:
    print(type(e).__name__, e)
"""
    evict_file(private_model)  # so that the warm has work and starts workers
    run = subprocess.run([sys.executable, "-c", script, str(private_model)], capture_output=True, text=True, timeout=60)
    assert run.stdout.startswith("FileChangedError"), (run.stdout, run.stderr)
    assert "cannot reopen" in run.stdout and str(private_model) in run.stdout
    assert "died" not in run.stdout
    assert "Traceback" not in run.stderr, run.stderr


def test_launch_that_cannot_start_a_process_leaks_nothing(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    before = open_fds()
    with pytest.raises(WarmError, match="cannot start a worker process"):
        _pool._start_server("/warmpool-test", ())
    assert open_fds() == before


def test_a_fork_server_that_is_gone_starts_no_worker_and_leaks_nothing():
    server = _pool._start_server("/warmpool-test", ())
    server.process.kill()
    server.process.wait()
    before = open_fds()
    with pytest.raises(WarmError, match="cannot start a worker process: the fork server is gone"):
        _pool._launch(server, 0, ([], [], "/warmpool-test", "read", []))
    assert open_fds() == before
    server.close()


def test_the_fork_server_reaps_and_reports_under_a_callers_blocked_sigchld():
    """``warmpool run`` starts pools from a thread with SIGCHLD blocked, and a child inherits
    the mask: the server must still learn at once that a worker ended, and report how."""
    import socket

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        server = _pool._start_server("/warmpool-test", ())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        ours, theirs = socket.socketpair()
        worker = server.fork(theirs.fileno())
        theirs.close()
        ours.close()  # the worker reads the end of file where its job should be, and exits 0
        assert server.exit_code(worker.pid, 5.0) == 0
        worker.close()
    finally:
        server.close()


def test_workers_are_forks_of_one_server_that_reaps_them(private_model):
    """One interpreter per warm, whatever the pool's size: each worker is a fork of the fork
    server (its child, with its argv), and none is left once the warm returns."""
    plan = warmpool.plan_model(private_model, chunk_size=16 * 1024)  # thousands of chunks: seconds
    seen: dict[int, tuple[int, list[str]]] = {}

    def look() -> bool:
        for child in psutil.Process().children(recursive=True):
            try:
                if segment.name in child.cmdline():  # this warm's, not another fixture's process
                    seen.setdefault(child.pid, (child.ppid(), child.cmdline()))
            except psutil.Error:
                pass
        return False

    evict_file(private_model)
    with ProgressSegment.create(1, 4, plan.chunks, plan.n_layers) as segment:
        _pool.run_pool([str(private_model)], plan.chunks, range(len(plan.chunks)), "read", segment, workers=3,
                       should_stop=look)
        servers = [pid for pid, (ppid, argv) in seen.items() if ppid == os.getpid() and "forkserver" in " ".join(argv)]
        assert len(servers) == 1, seen
        workers = [pid for pid, (ppid, _) in seen.items() if ppid == servers[0]]
        assert len(workers) == 3 and all(seen[w][1] == seen[servers[0]][1] for w in workers), seen
        assert segment.name in seen[servers[0]][1]
    assert not any(psutil.pid_exists(p) for p in seen), "a worker or the server outlived the warm"


def test_worker_dead_before_its_job_is_reaped_and_named(tiny_model, monkeypatch):
    """A worker that exits before reading its job: the job's send fails (it is larger than the
    socket buffer), which must neither raise BrokenPipeError nor leave the process unreaped."""
    # The server's workers exit at once: its own module's ``worker.serve`` replaced, in the server.
    monkeypatch.setattr(forkserver, "SERVER_CODE", forkserver.SERVER_CODE.replace(
        "forkserver.serve_forks(", "import os; from warmpool._pool import worker; worker.serve = lambda fd: os._exit(3); forkserver.serve_forks("))
    plan = warmpool.plan_model(tiny_model)
    chunks = plan.chunks * (200_000 // len(plan.chunks) + 1)  # a job of several MB
    with ProgressSegment.create(1, 1, chunks, plan.n_layers) as segment:
        with pytest.raises(WorkerDiedError, match="exit status 3") as caught:
            _pool.run_pool([str(tiny_model)], chunks, [0], "read", segment, workers=1)
    assert "chunk 0" in str(caught.value)
    pid = int(re.search(r"pid (\d+)", str(caught.value)).group(1))
    assert not psutil.pid_exists(pid), "the worker was left unreaped (a zombie)"
