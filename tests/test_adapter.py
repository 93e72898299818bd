"""engine_adapter.start_warmup: a background warm an engine can start with and follow.

Every test works on its own evicted copy of the page-cache model (``private_model``), so
they run in parallel without evicting under one another.  A warm with one worker and small
chunks lasts long enough (hundreds of chunks) to be watched while it runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import evict_file, resident_fraction

import warmpool
from engine_adapter import Warmup, WarmupProgress, start_warmup

pytestmark = pytest.mark.pagecache

SLOW = dict(workers=1, chunk_size=16 * 1024)  # thousands of chunks: seconds, not milliseconds
WATCHABLE = dict(workers=1, chunk_size=64 * 1024)


def worker_pids(shm_name: str) -> list[int]:
    """Processes whose argv carries the segment name (every pool worker does: _pool.WORKER_CODE)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if shm_name.encode() in argv:
                found.append(int(entry))
    return found


def assert_nothing_left(warmup: Warmup) -> None:
    if warmup.shm_name is not None:
        assert not os.path.exists("/dev/shm" + warmup.shm_name), "segment not unlinked"
        assert worker_pids(warmup.shm_name) == [], "worker processes left running"


@pytest.fixture
def cold_model(private_model):
    evict_file(private_model)
    assert resident_fraction(private_model) < 0.05
    return private_model


def test_start_warmup_returns_at_once_and_warms_everything(cold_model):
    started = time.perf_counter()
    warmup = start_warmup(cold_model)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"start_warmup blocked for {elapsed:.3f} s"
    result = warmup.wait(timeout=60)
    assert result is not None and warmup.error is None
    assert result.resident_fraction >= 0.99 and not result.skipped
    assert resident_fraction(cold_model) >= 0.99
    final = warmup.progress()
    assert final.state == "done" and final.done_bytes == final.total_bytes == result.bytes_selected
    assert all(warmup.layer_ready(k) for k in range(-1, 9))
    assert_nothing_left(warmup)


def test_progress_is_monotonic_to_the_total(cold_model):
    warmup = start_warmup(cold_model, **WATCHABLE)
    seen: list[WarmupProgress] = []
    while not warmup.finished:
        seen.append(warmup.progress())
        time.sleep(0.002)
    seen.append(warmup.progress())
    assert seen[0].state in ("starting", "running")
    done = [p.done_bytes for p in seen]
    assert done == sorted(done), "progress went backwards"
    states = [p.state for p in seen]
    assert states == sorted(states, key=("starting", "running", "done").index), "state went backwards"
    assert len({p.done_bytes for p in seen if p.state == "running"}) > 2, "no progress seen while running"
    assert seen[-1].done_bytes == seen[-1].total_bytes > 0 and seen[-1].finished
    assert warmup.wait().bytes_selected == seen[-1].total_bytes


def test_layer_0_is_ready_before_the_last_layer(cold_model):
    n_layers = warmpool.plan_model(cold_model).n_layers
    warmup = start_warmup(cold_model, **WATCHABLE)
    ready_at: dict[int, float] = {}
    while len(ready_at) < n_layers + 2:
        now = time.perf_counter()
        for k in range(-1, n_layers + 1):
            if k not in ready_at and warmup.layer_ready(k):
                ready_at[k] = now
        if warmup.finished and len(ready_at) < n_layers + 2:
            pytest.fail(f"warm ended with layers not ready: {sorted(set(range(-1, n_layers + 1)) - set(ready_at))}")
        time.sleep(0.001)
    warmup.wait()
    assert ready_at[0] < ready_at[n_layers - 1], "plan order: blk.0 must be ready before the last block"
    assert ready_at[-1] <= ready_at[0] <= ready_at[n_layers // 2] <= ready_at[n_layers - 1]


def test_wait_layer_returns_once_the_layer_is_ready(cold_model):
    with start_warmup(cold_model, **WATCHABLE) as warmup:
        assert warmup.wait_layer(0, timeout=30)
        assert warmup.layer_ready(0)
        assert warmup.wait_layer(7, timeout=30) and warmup.layer_ready(7)
    assert warmup.wait_layer(8, timeout=0)  # ended: answers at once, never hangs
    assert warmup.n_layers == 8
    with pytest.raises(warmpool.ProgressError, match="outside -1..8"):
        warmup.layer_ready(9)


def test_cli_in_another_process_sees_the_same_totals(cold_model):
    with start_warmup(cold_model, **SLOW) as warmup:
        assert warmup.wait_started(10) and warmup.shm_name
        before = warmup.progress()
        out = subprocess.run([sys.executable, "-m", "warmpool", "progress", warmup.shm_name, "--json"],
                             capture_output=True, text=True, timeout=30)
        after = warmup.progress()
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout)
        assert seen["total_bytes"] == before.total_bytes == after.total_bytes
        assert before.done_bytes <= seen["done_bytes"] <= after.done_bytes
        if after.state == "running":
            assert seen["state"] == "running"
    assert_nothing_left(warmup)


@pytest.mark.parametrize("how", ["cancel", "context"])
def test_cancel_stops_workers_and_unlinks_the_segment(cold_model, how):
    warmup = start_warmup(cold_model, raise_errors=True, **SLOW)
    assert warmup.wait_started(10) and warmup.shm_name
    deadline = time.monotonic() + 10
    while not worker_pids(warmup.shm_name) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker_pids(warmup.shm_name), "no worker process seen"
    assert os.path.exists("/dev/shm" + warmup.shm_name)
    started = time.perf_counter()
    if how == "cancel":
        warmup.cancel()
    else:
        with warmup:
            pass
    assert time.perf_counter() - started < 2.5
    assert warmup.finished
    assert_nothing_left(warmup)
    assert warmup.progress().state == "cancelled"
    assert warmup.wait() is None  # a cancel the caller asked for is not raised, even with raise_errors
    assert isinstance(warmup.error, warmpool.CancelledError)
    assert not warmup.layer_ready(8)  # the output layer comes last: still cold
    assert warmup.wait_layer(8, timeout=1)  # ended: returns instead of hanging


@pytest.mark.parametrize("via", ["env", "environ"])
def test_policy_skip_is_reported_not_raised(cold_model, monkeypatch, via):
    kwargs = {}
    if via == "env":
        kwargs["env"] = {"WARMPOOL_PREFAULT": "0"}
    else:
        monkeypatch.setenv("WARMPOOL_PREFAULT", "0")
    warmup = start_warmup(cold_model, raise_errors=True, **kwargs)
    assert warmup.wait_layer(0, timeout=30)  # ends at once: no hang
    result = warmup.wait(timeout=30)
    assert result is not None and result.skipped and "WARMPOOL_PREFAULT=0" in result.reason
    assert warmup.error is None and warmup.shm_name is None
    progress = warmup.progress()
    assert progress.state == "skipped" and progress.total_bytes == result.bytes_selected
    assert not warmup.layer_ready(0)  # cold, and it says so
    assert resident_fraction(cold_model) < 0.05


def test_already_resident_model_needs_no_segment(cold_model):
    warmpool.warm(cold_model)
    warmup = start_warmup(cold_model)
    result = warmup.wait(timeout=30)
    assert result.bytes_warmed == 0 and warmup.shm_name is None
    assert warmup.progress() == WarmupProgress(result.bytes_selected, result.bytes_selected, "done")
    assert warmup.layer_ready(0) and warmup.wait_layer(3, timeout=0)


def test_failure_is_reported_not_raised(tmp_path):
    warmup = start_warmup(tmp_path / "missing.gguf")
    assert warmup.wait(timeout=30) is None
    assert isinstance(warmup.error, warmpool.WarmpoolError)
    assert "missing.gguf" in str(warmup.error)
    assert warmup.progress().state == "failed"
    assert warmup.wait_layer(0, timeout=5) and not warmup.layer_ready(0)


def test_failure_is_raised_when_asked(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf" * 100)
    warmup = start_warmup(tmp_path / "junk.gguf", raise_errors=True)
    with pytest.raises(warmpool.LayoutError):
        warmup.wait(timeout=30)


def test_engine_thread_keeps_running_while_workers_do_the_io(cold_model):
    """The caller's threads are not starved: the coordinator mostly sleeps in select()."""
    ticks = []
    stop = threading.Event()

    def engine_loop():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    engine = threading.Thread(target=engine_loop)
    engine.start()
    with start_warmup(cold_model, **WATCHABLE) as warmup:
        warmup.wait(timeout=60)
    stop.set()
    engine.join()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert max(gaps) < 0.5, f"the engine thread stalled {max(gaps):.3f} s"


def test_import_of_the_adapter_leaves_the_warm_machinery_to_the_warm_thread():
    """``import engine_adapter.llama_cpp`` runs in the engine's start-up, before ``Llama()``: it
    loads warmpool's exception tree and the selection rules, not the warm (plan, platform layer,
    pool), which the warm's own thread imports while the engine loads."""
    code = ("import sys; import llama_cpp; before = set(sys.modules); import engine_adapter.llama_cpp; "
            "print(sorted(m for m in set(sys.modules) - before if m.startswith('warmpool')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert eval(proc.stdout) == ["warmpool", "warmpool._errors", "warmpool._select", "warmpool._version"], proc.stdout  # noqa: S307 - our own list literal


def test_beside_an_engine_in_this_process_it_plans_only_after_the_engine_s_sweep(cold_model, tmp_path, monkeypatch):
    """An engine loading in the warm's own process (what ``engine_adapter.llama_cpp.load`` does)
    shares the interpreter's lock with the warm's thread: while it reads at device speed the
    thread only watches its reads, and reads the layout (``n_layers``) once they have stopped.
    The "engine" is a thread of this process reading a cold file of its own at ~100 MB/s, above
    a threshold lowered to 30 MB/s; its first 1 MiB may take up to 2 s (a loaded CI machine)."""
    from warmpool import _beside

    for name, value in (("DEVICE_RATE", 30e6), ("START_BYTES", 1 << 20), ("GRACE_S", 2.0)):
        monkeypatch.setattr(_beside, name, value)
    other = tmp_path / "other.bin"
    with open(other, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    evict_file(other)

    def engine() -> None:
        fd = os.open(other, os.O_RDONLY)
        try:
            at = 0
            while at < 48 << 20:
                at += len(os.pread(fd, 1 << 20, at))
                time.sleep(0.01)
        finally:
            os.close(fd)

    reader = threading.Thread(target=engine)
    reader.start()
    warmup = start_warmup(cold_model, beside_engine=True, engine_pid=os.getpid(), **WATCHABLE)
    planned_while_reading = []
    while reader.is_alive():
        planned_while_reading.append(warmup.n_layers)
        time.sleep(0.005)
    reader.join()
    result = warmup.wait(30)
    assert len(planned_while_reading) > 20 and set(planned_while_reading) == {None}, planned_while_reading
    assert result is not None and warmup.n_layers == warmpool.plan_model(cold_model).n_layers
    assert "stepped aside until its sweep ended" in result.reason and result.reason.count("beside the engine") == 1
    assert result.resident_fraction == 1.0
