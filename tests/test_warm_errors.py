"""Errors a warm must name itself: an unknown strategy, a worker that cannot start its work,
a worker process that cannot be started, and one that dies before it has its job."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psutil
import pytest
from conftest import evict_file

import warmpool
from warmpool import WarmError, WorkerDiedError
from warmpool._pool import coordinator as _pool
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
        _pool._launch(0, ([], [], "/warmpool-test", "read", []))
    assert open_fds() == before


def test_worker_dead_before_its_job_is_reaped_and_named(tiny_model, monkeypatch):
    """A worker that exits before reading its job: the job's send fails (it is larger than the
    socket buffer), which must neither raise BrokenPipeError nor leave the process unreaped."""
    monkeypatch.setattr(_pool, "WORKER_CODE", "import os; os._exit(3)")
    plan = warmpool.plan_model(tiny_model)
    chunks = plan.chunks * (200_000 // len(plan.chunks) + 1)  # a job of several MB
    with ProgressSegment.create(1, 1, chunks, plan.n_layers) as segment:
        with pytest.raises(WorkerDiedError, match="exit status 3") as caught:
            _pool.run_pool([str(tiny_model)], chunks, [0], "read", segment, workers=1)
    assert "chunk 0" in str(caught.value)
    pid = int(re.search(r"pid (\d+)", str(caught.value)).group(1))
    assert not psutil.pid_exists(pid), "the worker was left unreaped (a zombie)"
