"""Faults during a warm: Ctrl-C, a killed worker, a file truncated or replaced under it.

Each runs the real CLI in a subprocess on a private copy of the model and checks that
nothing is left behind: no worker process, no /dev/shm segment, and (unless the test itself
damaged it) the model's size, mtime and bytes unchanged.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import evict_file

from warmpool import ProgressView

pytestmark = pytest.mark.pagecache

# Small chunks and one worker stretch a 40 MB warm over seconds, so the fault lands mid-warm.
SLOW = ["--chunk-size", "16K", "--workers", "2", "--no-progress"]


def fingerprint(path):
    st = os.stat(path)
    with open(path, "rb") as f:
        return st.st_size, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest()


def start_warm(path, *extra):
    evict_file(path)
    return subprocess.Popen([sys.executable, "-m", "warmpool", "warm", str(path), *SLOW, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_workers(proc, timeout=20.0):
    """The warm's segment name and its worker processes, once they are running."""
    prefix = f"warmpool-{proc.pid}-"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
        workers = workers_of(prefix) if names else []
        if workers:
            return names[0], workers
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("the warm never started its workers")


def workers_of(prefix):
    """The warm's workers: the processes whose argv names its segment, less the fork server
    they are forked from (the coordinator's child; ``_pool.forkserver``)."""
    coordinator = int(prefix.split("-")[1])
    found = []
    for p in psutil.process_iter(["cmdline", "ppid"]):
        cmdline = p.info["cmdline"] or []
        if p.info["ppid"] != coordinator and any(arg.startswith("/" + prefix) or arg.startswith(prefix) for arg in cmdline):
            found.append(p)
    return found


def assert_nothing_left(proc):
    prefix = f"warmpool-{proc.pid}-"
    deadline = time.monotonic() + 5
    while workers_of(prefix) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not workers_of(prefix), "a worker process outlived the warm"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)], "the segment was not unlinked"


def final_state(view):
    """The state a reader attached mid-warm is left with (its mapping outlives the unlink)."""
    try:
        return view.snapshot().state
    finally:
        view.close()


def test_ctrl_c_stops_within_two_seconds(private_model):
    before = fingerprint(private_model)
    proc = start_warm(private_model)
    name, _ = wait_for_workers(proc)
    view = ProgressView.attach(name)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert time.monotonic() - sent < 2.0
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert_nothing_left(proc)
    assert fingerprint(private_model) == before
    assert final_state(view) == "cancelled"


def test_sigterm_cleans_up_and_reads_as_cancelled(private_model):
    """SIGTERM is a stop someone asked for: readers see "cancelled", as after Ctrl-C."""
    proc = start_warm(private_model)
    name, _ = wait_for_workers(proc)
    view = ProgressView.attach(name)
    proc.terminate()
    proc.communicate(timeout=10)
    assert proc.returncode == 143
    assert_nothing_left(proc)
    assert final_state(view) == "cancelled"


def test_killed_worker_is_noticed_and_named(private_model):
    before = fingerprint(private_model)
    proc = start_warm(private_model)
    name, workers = wait_for_workers(proc)
    view = ProgressView.attach(name)
    killed = time.monotonic()
    workers[0].kill()
    out, err = proc.communicate(timeout=10)
    assert time.monotonic() - killed < 5.0
    assert proc.returncode == 1
    assert "died" in err and "chunk" in err and "signal 9" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert_nothing_left(proc)
    assert fingerprint(private_model) == before
    assert final_state(view) == "failed"


@pytest.mark.parametrize("strategy", ["populate", "touch", "read"])
def test_truncated_file_is_a_clean_error(private_model, strategy):
    proc = start_warm(private_model, "--strategy", strategy)
    wait_for_workers(proc)
    os.truncate(private_model, 1 << 20)  # the adversary: shrink the model under the warm
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 1, (out, err)
    assert str(private_model) in err
    assert "Traceback" not in err
    assert_nothing_left(proc)


def test_replaced_file_is_reported(private_model, tmp_path):
    replacement = tmp_path / "other.gguf"
    replacement.write_bytes(private_model.read_bytes())
    proc = start_warm(private_model)
    wait_for_workers(proc)
    os.replace(replacement, private_model)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, (out, err)
    assert "replaced or modified" in err
    assert_nothing_left(proc)


def model_fds(process, path):
    """(fd, flags) of each descriptor the process has open on the model."""
    return [(f.fd, f.flags) for f in process.open_files() if f.path == str(path)]


def test_model_is_never_opened_for_writing(private_model):
    """Every descriptor the coordinator or a worker holds on the model, all through the warm, is
    read-only.  A worker may hold two: its own, and the one that clears readahead marks
    (``_worker_finish.Marks`` wants a fresh file description)."""
    before = fingerprint(private_model)
    proc = start_warm(private_model)
    _, workers = wait_for_workers(proc)
    processes = [psutil.Process(proc.pid), *workers]
    seen: dict[int, set] = {p.pid: set() for p in processes}
    samples = 0
    while proc.poll() is None:  # sampled until the warm ends, so a late open is seen too
        for p in processes:
            try:
                seen[p.pid].update(model_fds(p, private_model))
            except psutil.NoSuchProcess:
                pass
        samples += 1
        time.sleep(0.005)
    missing = [pid for pid, fds in seen.items() if not fds]
    assert not missing, f"the model was never seen open by {missing} in {samples} samples"
    for pid, fds in seen.items():
        for fd, flags in fds:
            assert flags & os.O_ACCMODE == os.O_RDONLY, (pid, fd, oct(flags))
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert fingerprint(private_model) == before


def test_the_cli_s_workers_come_from_the_server_it_started_before_planning(private_model):
    """``warmpool warm`` starts its fork server before it reads the header (its boot overlaps
    the plan), and the pool forks its workers from that one."""
    proc = start_warm(private_model)
    try:
        _, workers = wait_for_workers(proc)
        tag = f"/warmpool-{proc.pid}-pool"
        assert all(tag in w.cmdline() for w in workers), [w.cmdline() for w in workers]
    finally:
        proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("case", ["nothing cold", "no such model"])
def test_a_prestarted_server_no_pool_took_is_killed_before_the_command_returns(private_model, tmp_path, case,
                                                                                 capsys):
    """The command in this process (``main``), so that a server it left would still be our
    child: killed and reaped before ``main`` returns, not left to notice the end of its socket."""
    from warmpool.commands import main

    path = tmp_path / "missing.gguf" if case == "no such model" else private_model
    if case == "nothing cold":
        with open(private_model, "rb") as f:
            while f.read(1 << 20):
                pass
    before = {c.pid for c in psutil.Process().children()}
    code = main(["warm", str(path), "--no-progress"])
    assert code == (0 if case == "nothing cold" else 1), capsys.readouterr().err
    left = [(c.pid, c.status()) for c in psutil.Process().children() if c.pid not in before]
    assert not left, left  # alive or a zombie: a server not killed, or not reaped
