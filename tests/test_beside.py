"""A warm beside an engine that loads the model itself (``warm(beside_engine=True)``).

The "engine" is a real process reading the evicted file with ``pread``, at full speed or paced;
the warm watches the page cache grow (cachestat) and must step aside from the fast reader, and
warm from the far end beside the slow one or none.  Real page cache, real workers, mincore.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import warmpool
from conftest import evict_file, warm_watched
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


def _order_sampler(first_running: list[int]):
    def sample(view) -> None:
        states = view.chunk_states()
        for i, s in enumerate(states):
            if s != "pending" and i not in first_running:
                first_running.append(i)
    return sample


def test_steps_aside_from_an_engine_reading_at_device_speed(pagecache_model):
    evict_file(pagecache_model)
    engine = Engine(pagecache_model, 0.0)
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
    seen: list[int] = []
    started = time.monotonic()
    result = warm_watched(pagecache_model, _order_sampler(seen), beside_engine=True)
    assert time.monotonic() - started >= 0.2  # it watched first
    assert "not seen reading" in result.reason and "far end" in result.reason, result.reason
    assert result.workers >= 1 and result.resident_fraction == 1.0
    n = len(warmpool.plan_model(pagecache_model).chunks)
    assert n >= 2 and seen and seen[0] == n - 1, (seen, n)  # the last chunk in plan order went first


def test_warms_from_the_far_end_beside_a_slow_engine(pagecache_model, monkeypatch):
    # A reader paced at ~50 MB/s: under DEVICE_RATE, so the workers help, from the other end.
    monkeypatch.setattr(_beside, "DEVICE_RATE", 150e6)
    evict_file(pagecache_model)
    engine = Engine(pagecache_model, 0.02)
    seen: list[int] = []
    try:
        engine.go()
        result = warm_watched(pagecache_model, _order_sampler(seen), beside_engine=True)
        engine_done = engine.proc.poll() is not None
    finally:
        engine.close()
    assert "MB/s; warmed from the far end" in result.reason, result.reason
    assert result.workers >= 1 and result.resident_fraction == 1.0
    assert not engine_done  # the warm finished the file before the slow engine reached its end
    n = len(warmpool.plan_model(pagecache_model).chunks)
    assert seen and seen[0] == n - 1, (seen, n)


def test_without_beside_engine_nothing_is_watched(pagecache_model):
    evict_file(pagecache_model)
    seen: list[int] = []
    result = warm_watched(pagecache_model, _order_sampler(seen))
    assert "beside the engine" not in result.reason
    assert seen and seen[0] == 0  # plan order
