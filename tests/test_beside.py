"""A warm beside an engine that loads the model itself (``warm(beside_engine=True)``).

The "engine" is a real process reading the evicted file with ``pread``, at full speed or paced;
the warm watches the page cache grow (cachestat) and must step aside from the fast reader, and
warm from the far end beside the slow one or none.  Real page cache, real workers, mincore.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from conftest import evict_file, warm_watched, write_random

import warmpool
from warmpool import _beside, _platform

pytestmark = [pytest.mark.pagecache, pytest.mark.xdist_group("pagecache"),
              pytest.mark.skipif(not _platform.supports_cachestat(), reason="no cachestat(2): nothing to watch")]

# Reads FILE in 1 MiB preads, sleeping PAUSE seconds after each (0: as fast as the disk goes).
READER = """
import os, sys, time
fd, pause = os.open(sys.argv[1], os.O_RDONLY), float(sys.argv[2])
size, at = os.fstat(fd).st_size, 0
print("ready", flush=True)
sys.stdin.readline()
while at < size:
    at += len(os.pread(fd, 1 << 20, at))
    time.sleep(pause)
"""


class Engine:
    """A reader process, started before the warm and told to go as the warm starts."""

    def __init__(self, path, pause: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", READER, str(path), str(pause)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


CHUNK = 4 * 1024 * 1024  # ~10 chunks of the ~40 MB model: an order to see


def _done_sampler(samples: list[frozenset[int]]):
    def sample(view) -> None:
        samples.append(frozenset(i for i, s in enumerate(view.chunk_states()) if s == "done"))
    return sample


def _far_end_first(samples: list[frozenset[int]], n: int) -> bool:
    """With one worker, chunks turn done in the order handed out: from the far end, the done set
    is always a suffix of the plan; and some sample saw it part-way (else the check proves nothing)."""
    suffixes = all(d == frozenset(range(n - len(d), n)) for d in samples)
    return suffixes and any(0 < len(d) < n for d in samples)


def test_steps_aside_from_an_engine_reading_at_device_speed(pagecache_model, monkeypatch):
    # Paced at ~100 MB/s so that the ~40 MB file lasts longer than the warm's header walk and
    # plan; "device speed" is then anything above 30 MB/s.
    monkeypatch.setattr(_beside, "DEVICE_RATE", 30e6)
    evict_file(pagecache_model)
    engine = Engine(pagecache_model, 0.01)
    try:
        engine.go()
        result = warmpool.warm(pagecache_model, beside_engine=True)
        engine.proc.wait(30)
    finally:
        engine.close()
    assert "stepped aside" in result.reason, result.reason
    assert result.workers == 0  # no worker competed with the engine
    assert result.resident_fraction == 1.0  # the engine read it all, and the verdict says so
    assert result.bytes_warmed == 0  # what the engine read is not the warm's


def test_warms_from_the_far_end_when_no_engine_reads(pagecache_model, monkeypatch):
    monkeypatch.setattr(_beside, "ENGINE_START_S", 0.2)
    evict_file(pagecache_model)
    seen: list[frozenset[int]] = []
    started = time.monotonic()
    result = warm_watched(pagecache_model, _done_sampler(seen), beside_engine=True, workers=1, chunk_size=CHUNK)
    assert time.monotonic() - started >= 0.2  # it watched first
    assert "not seen reading" in result.reason and "far end" in result.reason, result.reason
    assert result.workers >= 1 and result.resident_fraction == 1.0
    n = len(warmpool.plan_model(pagecache_model, chunk_size=CHUNK).chunks)
    assert n >= 4 and _far_end_first(seen, n), (n, sorted(set(map(len, seen))))


def test_warms_from_the_far_end_beside_a_slow_engine(pagecache_model, monkeypatch):
    # A reader paced at ~50 MB/s: under DEVICE_RATE, so the workers help, from the other end.
    monkeypatch.setattr(_beside, "DEVICE_RATE", 150e6)
    evict_file(pagecache_model)
    engine = Engine(pagecache_model, 0.02)
    seen: list[frozenset[int]] = []
    try:
        engine.go()
        result = warm_watched(pagecache_model, _done_sampler(seen), beside_engine=True, workers=1, chunk_size=CHUNK)
        engine_done = engine.proc.poll() is not None
    finally:
        engine.close()
    assert "MB/s; warmed from the far end" in result.reason, result.reason
    assert result.workers >= 1 and result.resident_fraction == 1.0
    assert not engine_done  # the warm finished the file before the slow engine reached its end
    n = len(warmpool.plan_model(pagecache_model, chunk_size=CHUNK).chunks)
    # Chunks the engine already read are found resident (done at once): still from the far end.
    assert _far_end_first(seen, n), (n, sorted(set(map(len, seen))))


def test_without_beside_engine_nothing_is_watched(pagecache_model):
    evict_file(pagecache_model)
    seen: list[frozenset[int]] = []
    result = warm_watched(pagecache_model, _done_sampler(seen), workers=1, chunk_size=CHUNK)
    assert "beside the engine" not in result.reason
    n = len(warmpool.plan_model(pagecache_model, chunk_size=CHUNK).chunks)
    assert all(d == frozenset(range(len(d))) for d in seen) and any(0 < len(d) < n for d in seen)  # plan order


def test_with_the_engine_in_view_it_warms_first_while_the_engine_is_still_starting(pagecache_model):
    """An engine process that has not read by ``GRACE_S`` (a Python server importing): the warm
    goes first, in plan order (where the engine's sweep will begin), after GRACE_S, not the
    second it waits for a cache growth it cannot tell from its own."""
    evict_file(pagecache_model)
    engine = Engine(pagecache_model, 0.0)  # started, never told to go
    seen: list[frozenset[int]] = []
    try:
        result = warm_watched(pagecache_model, _done_sampler(seen), beside_engine=True, engine_pid=engine.proc.pid,
                              workers=1, chunk_size=CHUNK)
    finally:
        engine.close()
    assert f"not reading within {_beside.GRACE_S:g} s; warmed first, in its order" in result.reason, result.reason
    assert result.workers >= 1 and result.resident_fraction == 1.0
    assert result.bytes_warmed >= 0.99 * result.bytes_selected
    n = len(warmpool.plan_model(pagecache_model, chunk_size=CHUNK).chunks)
    prefixes = all(d == frozenset(range(len(d))) for d in seen) and any(0 < len(d) < n for d in seen)
    assert prefixes, (n, sorted(set(map(len, seen))))


def test_going_first_it_steps_aside_once_the_engine_reads_at_device_speed(pagecache_model, monkeypatch, tmp_path):
    """The engine starts reading while the warm goes first (kept slow: a pread and a round trip
    per page, one worker, ~1.7 s): its own reads at "device speed" (over 30 MB/s here, watched
    over 50 ms) stop the pool; the warm waits for the engine's sweep to end, says so, then warms
    the rest.  The stand-in reads a cold file of its own: reading the model behind the warm, it
    would find the pages the warm had read and read nothing from the disk (as it should)."""
    for name, value in (("DEVICE_RATE", 30e6), ("START_BYTES", 1 << 20), ("GRACE_S", 0.1), ("WATCH_S", 0.05),
                        ("POLL_S", 0.01)):
        monkeypatch.setattr(_beside, name, value)
    other = tmp_path / "other.bin"
    write_random(other, 48 << 20)
    evict_file(other)
    evict_file(pagecache_model)
    engine = Engine(other, 0.01)  # ~100 MB/s once it goes
    # It goes 0.1 s after the warm's first pool starts (the warm went first), whatever the plan
    # took; the warm of the rest after the sweep starts a second pool.
    timer = threading.Timer(0.1, engine.go)
    pools: list[str] = []

    def on_start(segment: str) -> None:
        pools.append(segment)
        if len(pools) == 1:
            timer.start()

    try:
        result = warmpool.warm(pagecache_model, beside_engine=True, engine_pid=engine.proc.pid, workers=1,
                               chunk_size=4096, strategy="read", on_start=on_start)
        engine.proc.wait(30)
    finally:
        timer.cancel()
        engine.close()
    assert "warmed first" in result.reason and "stepped aside until its sweep ended" in result.reason, result.reason
    assert result.resident_fraction == 1.0 and len(pools) == 2, pools
    # The engine read none of the model: every byte of it is the warm's, its head start and the rest.
    assert result.bytes_warmed >= 0.99 * result.bytes_selected, (result.bytes_warmed, result.bytes_selected)


def test_the_watch_before_the_plan_follows_an_engine_through_its_sweep(pagecache_model, monkeypatch, tmp_path):
    """``warmpool.watch_engine``: the engine's own reads alone, no plan, no open file.  A reader
    at "device speed" (~100 MB/s against a threshold lowered to 30 MB/s) is stood aside from
    until its reads stop; ``warm(engine_watch=...)`` acts on that verdict, says it once, and warms
    what the engine left cold (here all of the model: the stand-in reads a file of its own).
    Its first 1 MiB may take up to 2 s (a loaded CI machine): the engine counts as reading."""
    for name, value in (("DEVICE_RATE", 30e6), ("START_BYTES", 1 << 20), ("GRACE_S", 2.0)):
        monkeypatch.setattr(_beside, name, value)
    other = tmp_path / "other.bin"
    write_random(other, 48 << 20)
    evict_file(other)
    evict_file(pagecache_model)
    engine = Engine(other, 0.01)
    try:
        engine.go()
        watch = warmpool.watch_engine(engine.proc.pid)
        ended = engine.proc.poll()  # the watch waited for the sweep's end: the reader has exited
        result = warmpool.warm(pagecache_model, engine_watch=watch, workers=1, chunk_size=CHUNK)
    finally:
        engine.close()
    assert watch.started and watch.stepped_aside and not watch.head_start, watch
    assert watch.rate >= 30e6 and watch.engine_pid == engine.proc.pid
    assert ended == 0, "the watch returned while the engine was still reading"
    assert result.reason.count("beside the engine") == 1, result.reason
    assert "stepped aside until its sweep ended" in result.reason
    assert result.resident_fraction == 1.0 and result.bytes_warmed >= 0.99 * result.bytes_selected


def test_the_watch_before_the_plan_of_an_engine_not_reading_goes_first(pagecache_model):
    """Not reading within ``GRACE_S``: a head start, under the guard; a process whose reads
    cannot be seen (gone) gives no verdict at all."""
    engine = Engine(pagecache_model, 0.0)  # started, never told to go
    try:
        started = time.monotonic()
        watch = warmpool.watch_engine(engine.proc.pid)
        waited = time.monotonic() - started
    finally:
        engine.close()
    assert watch.head_start and not watch.started and watch.engine_pid == engine.proc.pid, watch
    assert _beside.GRACE_S <= waited < _beside.GRACE_S + 0.5
    assert warmpool.watch_engine(engine.proc.pid) is None  # reaped: no /proc entry


# Spins one core for argv[1] seconds, then sleeps: an engine answering its first request, then idle.
SPINNER = """
import sys, time
end = time.monotonic() + float(sys.argv[1])
print("spinning", flush=True)
while time.monotonic() < end:
    pass
time.sleep(60)
"""


def _spinner(seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SPINNER, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "spinning"
    return proc


def test_wait_until_quiet_sees_a_busy_engine_and_an_idle_one(monkeypatch):
    monkeypatch.setattr(_beside, "QUIET_MAX_S", 1.5)
    busy, idle = _spinner(30), _spinner(0)
    try:
        started = time.monotonic()
        assert _beside.wait_until_quiet(busy.pid, lambda: False) is False  # busy throughout: gave up
        assert time.monotonic() - started >= 1.5
        started = time.monotonic()
        assert _beside.wait_until_quiet(idle.pid, lambda: False) is True
        assert time.monotonic() - started < 1.4  # one or two windows of QUIET_S
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()
    assert _beside.wait_until_quiet(busy.pid, lambda: False) is False  # gone: at once


def test_the_keeper_holds_once_the_engine_is_between_requests(pagecache_model):
    """Beside an engine, the keeper's hold (map, fault, read a byte per page) waits until the
    engine stops using the CPU: here a stand-in busy for 1.5 s after the warm starts."""
    evict_file(pagecache_model)
    engine = _spinner(1.5)
    busy_until = time.monotonic() + 1.5
    events: list[dict] = []
    keeper = warmpool.Keeper([pagecache_model], interval=60, beside_engine=True, engine_pid=engine.pid,
                             on_event=events.append, workers=1)
    try:
        keeper.start()
        assert keeper.wait_warm(30)
        held_at = time.monotonic()
        warmed = [e for e in events if e["event"] == "warmed"]
        rows = keeper.status()
    finally:
        keeper.stop()
        engine.kill()
        engine.wait()
    assert held_at >= busy_until, "held while the engine was busy"
    assert len(warmed) == 1 and warmed[0]["engine_quiet_wait_s"] >= 0.5, warmed
    assert rows[0]["resident_fraction"] == 1.0, rows


def test_a_keeper_stopped_while_it_waits_for_a_busy_engine_ends_without_holding(pagecache_model):
    engine = _spinner(60)
    events: list[dict] = []
    keeper = warmpool.Keeper([pagecache_model], interval=60, beside_engine=True, engine_pid=engine.pid,
                             on_event=events.append, workers=1)
    try:
        keeper.start()
        deadline = time.monotonic() + 30
        while keeper.status()[0]["state"] != "warming" and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.0)  # the warm (nothing cold, or a short one) is over: it waits for the engine
        started = time.monotonic()
        keeper.stop()
        stopped_in = time.monotonic() - started
    finally:
        engine.kill()
        engine.wait()
    # Waiting for the engine it would have held 30 s (QUIET_MAX_S) later, and said "warmed".
    assert stopped_in < 5.0 and not [e for e in events if e["event"] == "warmed"], (stopped_in, events)
