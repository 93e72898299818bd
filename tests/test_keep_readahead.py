"""``keep --readahead SIZE`` sets the model's block device read_ahead_kb for the run and puts
the old value back on every way out (SIGTERM, SIGINT, the --for-pid process gone); without the
permission it is one line and nothing changes.

read_ahead_kb is machine-wide: each test holds the machine lock (/tmp/warmpool-bench.lock)
while the value may differ, unless a process above this one holds it already (the suite run
under ``flock``), and checks the value is back before it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
from test_keep_cli import KeepProcess

from warmpool import _platform

pytestmark = pytest.mark.pagecache

LOCK = "/tmp/warmpool-bench.lock"
# One worker runs them all: under a parent that holds the lock (a benchmark-locked run) they
# would otherwise change the same device setting at once.
pytestmark = pytest.mark.xdist_group("readahead")


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _held_by_ancestor(path: str) -> bool:
    inode = os.stat(path).st_ino
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:  # "1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END"; waiters have "->"
        fields = line.split()
        if "->" not in fields and "FLOCK" in fields and fields[-3].endswith(f":{inode}") \
                and fields[-4].isdigit() and int(fields[-4]) in _ancestors():
            return True
    return False


@contextlib.contextmanager
def machine_lock():
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not _held_by_ancestor(LOCK):
                fcntl.flock(fd, fcntl.LOCK_EX)  # another run's benchmark: wait for it
        yield
    finally:
        os.close(fd)


@pytest.fixture
def device(private_model):
    found = _platform.read_ahead(os.stat(private_model).st_dev)
    if found is None:
        pytest.skip(f"{private_model} is on no block device with a read-ahead setting")
    if not os.access(found.path, os.W_OK):
        pytest.skip(f"{found.path} is not writable here (not root, or sysfs read-only)")
    with machine_lock():
        before = _platform.read_ahead(os.stat(private_model).st_dev).kb
        try:
            yield found.path, before
        finally:
            now = _platform.read_ahead(os.stat(private_model).st_dev).kb
            if now != before:  # the keeper failed to: put it back, then fail
                _platform.set_read_ahead_kb(found.path, before)
            assert now == before, f"read_ahead_kb left at {now}, was {before}"


def _kb(path: str) -> int:
    with open(path) as f:
        return int(f.read())


def _other(before: int) -> tuple[str, int]:
    kb = 128 if before != 128 else 256
    return f"{kb}K", kb


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_readahead_set_for_the_run_and_restored_on_a_signal(private_model, device, sig):
    path, before = device
    size, kb = _other(before)
    keeper = KeepProcess(private_model, "--readahead", size, "--interval", "0.5")
    try:
        event = keeper.wait_for("readahead_set")
        assert event["read_ahead_kb"] == kb and event["previous_kb"] == before and event["path"] == path
        assert _kb(path) == kb
        keeper.wait_for("warmed")
        keeper.proc.send_signal(sig)
        assert keeper.proc.wait(10) == 0
        assert _kb(path) == before
    finally:
        keeper.close()


def test_readahead_restored_when_the_engine_exits(private_model, device):
    path, before = device
    size, kb = _other(before)
    engine = subprocess.Popen(["sleep", "3"])
    keeper = KeepProcess(private_model, "--readahead", size, "--for-pid", engine.pid, "--interval", "0.5")
    try:
        keeper.wait_for("readahead_set")
        assert _kb(path) == kb
        engine.wait()
        assert keeper.proc.wait(15) == 0
        assert _kb(path) == before
    finally:
        engine.kill()
        keeper.close()


def test_readahead_without_the_permission_is_one_line(private_model, device):
    path, before = device
    size, _ = _other(before)
    public = tempfile.mkdtemp(dir="/var/tmp")  # the test's tmp_path is root's only
    try:
        os.chmod(public, 0o755)
        model = shutil.copy(private_model, public)
        os.chmod(model, 0o644)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                               sys.executable, "-m", "warmpool", "keep", model, "--readahead", size],
                              capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    finally:
        shutil.rmtree(public)
    if "setpriv" in proc.stderr and proc.returncode != 0 and "warmpool" not in proc.stderr:
        pytest.skip(f"setpriv cannot switch user here: {proc.stderr.strip()}")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--readahead" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert _kb(path) == before
