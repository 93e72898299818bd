"""The pool's growth rule (``_pool._Growth``), fed measured byte counts at chosen times: it
doubles while a doubling pays and enough of the warm is left for one to pay, goes back to the
half when one did not, and never moves with a fixed worker count."""

from __future__ import annotations

from conftest import evict_file

import warmpool
from warmpool._pool import coordinator as _pool
from warmpool._pool.coordinator import (
    AUTO_GAIN,
    AUTO_MIN_REST_S,
    AUTO_START,
    AUTO_START_IDLE,
    AUTO_WINDOW_S,
    _Growth,
)

MB = 10**6


def _window(growth: _Growth, done: int, now: float) -> int:
    growth.update(done, now)
    return growth.target


def test_it_doubles_while_doubling_pays_and_much_is_left():
    growth = _Growth(None, n_chunks=640, total_bytes=10_000 * MB)
    growth.target = start = 1  # as on one CPU, so that two doublings stay under AUTO_MAX anywhere
    growth.update(0, 0.0)  # the first chunk done: the first window opens
    assert _window(growth, 300 * MB, 0.3) == 2 * start  # 1 GB/s, 32 s of work left
    assert _window(growth, 900 * MB, 0.6) == 4 * start  # 2 GB/s: it paid (>= AUTO_GAIN)
    rate = 2000 * MB * AUTO_GAIN * 0.9  # less than AUTO_GAIN over the last window's rate
    assert _window(growth, 900 * MB + int(rate * 0.3), 0.9) == 2 * start  # back to the half
    assert not growth.growing
    assert _window(growth, 9000 * MB, 5.0) == 2 * start  # and it stays there


def test_it_does_not_grow_when_too_little_is_left_for_a_doubling_to_pay():
    growth = _Growth(None, n_chunks=64, total_bytes=400 * MB)
    start = growth.target
    growth.update(0, 0.0)
    done = 300 * MB  # 1 GB/s over AUTO_WINDOW_S: 0.1 s of work left
    assert (400 * MB - done) / (done / AUTO_WINDOW_S) < AUTO_MIN_REST_S
    assert _window(growth, done, AUTO_WINDOW_S) == start
    assert not growth.growing


def test_a_fixed_worker_count_never_moves():
    growth = _Growth(3, n_chunks=640, total_bytes=10_000 * MB)
    assert growth.target == 3 and not growth.growing
    growth.update(0, 0.0)
    assert _window(growth, 300 * MB, 0.3) == 3


def test_past_one_worker_per_cpu_a_doubling_needs_proportionally_more_work_left(monkeypatch):
    """Each new worker's start-up then takes CPU from workers already faulting, so the bar of
    AUTO_MIN_REST_S rises with the workers per CPU."""
    monkeypatch.setattr(_pool, "_CPUS", 2)  # as on the 2-core VM, whatever runs the test
    rest = 1.5 * AUTO_MIN_REST_S  # enough for the plain bar, not for twice it
    for per_cpu, grows in ((1, True), (2, False)):
        growth = _Growth(None, n_chunks=640, total_bytes=10_000 * MB)
        growth.target = start = per_cpu * 2
        growth.growing = True
        growth.update(0, 0.0)
        done = 1000 * MB  # 1 GB over 0.5 s: 2 GB/s
        growth.total_bytes = done + int(rest * done / 0.5)
        assert _window(growth, done, 0.5) == (2 * start if grows else start), per_cpu
        assert growth.growing == grows


def test_an_idle_priority_warm_starts_one_worker_per_cpu(private_model):
    """Beside an engine that is loading (priority "idle"), each worker's interpreter starts at
    normal priority before it lowers its own, so such a pool starts smaller; a real warm of a
    plan too short to grow shows the start."""
    plan = warmpool.plan_model(private_model, chunk_size=64 * 1024)
    assert len(plan.chunks) >= AUTO_START
    for priority, start in (("idle", AUTO_START_IDLE), ("normal", AUTO_START)):
        evict_file(private_model)
        result = warmpool.warm(private_model, plan=plan, priority=priority)
        assert result.workers == start, (priority, result.workers)
