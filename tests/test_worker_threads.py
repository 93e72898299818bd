"""A worker's fault threads (``_worker_threads.FaultThreads``) and the chunks a worker holds at
once (``_pool.LOOKAHEAD``): a thread with no block left in one chunk takes the next chunk's
instead of waiting for the slowest block, each chunk is reported once, in the order handed out,
and the first error of a chunk ends that chunk alone."""

from __future__ import annotations

import threading

import pytest
from conftest import evict_file, warm_watched

import warmpool
from warmpool._errors import FileChangedError
from warmpool._pool.coordinator import LOOKAHEAD
from warmpool._pool.threads import FaultThreads
from warmpool._pool.worker import _Reports


def _pool(n: int, slow: dict[int, threading.Event] | None = None, fail: set[int] = frozenset()):
    faulted: list[int] = []
    progress: list[int] = []

    def fault(target, rel, length):
        faulted.append(rel)
        if slow and rel in slow:
            assert slow[rel].wait(10), "the test's gate never opened"
        if rel in fail:
            raise OSError(f"span {rel} failed")

    return FaultThreads(n, fault, progress.append), faulted, progress


def test_a_thread_takes_the_next_chunk_while_a_block_of_the_last_one_is_slow():
    gate = threading.Event()
    pool, faulted, progress = _pool(2, slow={0: gate})
    done: dict[str, object] = {}
    finished = threading.Event()

    def on_done(name):
        def record(error):
            done[name] = error
            if name == "b":
                finished.set()
        return record

    pool.submit("a", [(0, 10), (1, 10)], on_done("a"))  # span 0 blocks until the gate opens
    pool.submit("b", [(2, 5), (3, 5), (4, 5)], on_done("b"))
    assert finished.wait(10), "chunk b waited for chunk a's slow block"
    assert "a" not in done  # a's slow block is still being faulted
    gate.set()
    pool.drain()
    assert done == {"a": None, "b": None}
    assert sorted(faulted) == [0, 1, 2, 3, 4]
    assert sum(progress) == 35


def test_the_first_error_ends_its_chunk_only():
    gate = threading.Event()
    pool, faulted, progress = _pool(1, slow={0: gate}, fail={1})
    done: dict[str, BaseException | None] = {}
    pool.submit("a", [(0, 10), (1, 10), (2, 10)], lambda error: done.__setitem__("a", error))
    pool.submit("b", [(3, 7)], lambda error: done.__setitem__("b", error))
    gate.set()
    pool.drain()
    assert isinstance(done["a"], OSError) and "span 1 failed" in str(done["a"])
    assert done["b"] is None
    assert 2 not in faulted, "a span of a failed chunk was still faulted"
    assert sum(progress) == 10 + 7  # span 0 and chunk b; the failed span counts nothing


def test_an_empty_chunk_is_done_at_once_and_drain_returns():
    pool, faulted, _ = _pool(2)
    done = []
    pool.submit("a", [], done.append)
    pool.drain()
    assert done == [None] and faulted == [] and pool.threads == []


@pytest.mark.pagecache
@pytest.mark.xdist_group("pagecache")
def test_a_worker_holds_the_next_chunk_and_reports_in_plan_order(pagecache_model):
    """During a real one-worker warm, watch the chunk states: the coordinator hands the worker
    LOOKAHEAD chunks at once, and they still turn done in plan order."""
    plan = warmpool.plan_model(pagecache_model, chunk_size=256 << 10)
    assert len(plan.chunks) > 4
    seen_running: list[int] = []
    order_errors: list[str] = []

    def sample(view):
        states = view.chunk_states()
        seen_running.append(sum(state == "running" for state in states))
        done = [i for i, state in enumerate(states) if state == "done"]
        if done != list(range(len(done))):
            order_errors.append(f"done out of plan order: {done}")

    evict_file(pagecache_model)
    warm_watched(pagecache_model, sample, interval=0.0002, plan=plan, workers=1)
    assert not order_errors, order_errors[0]
    assert 2 <= max(seen_running) <= LOOKAHEAD, f"running chunks seen at once: {sorted(set(seen_running))}"
    assert seen_running[-1] == 0


class _Sent(list):
    send = list.append


def test_a_chunk_done_early_is_reported_after_the_one_handed_out_before_it():
    sent = _Sent()
    reports = _Reports(sent, ["model.gguf"])
    first, second, third = (reports.on_done(i, 0) for i in (7, 8, 9))
    second(None)
    assert sent == []  # chunk 8 waits for chunk 7
    first(None)
    assert sent == [("done", 7), ("done", 8)]
    third(FileChangedError("file shrank"))
    assert sent[-1][:2] == ("error", 9) and sent[-1][2].path == "model.gguf" and reports.failed
