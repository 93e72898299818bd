"""The progress segment, checked through real shared memory and real processes."""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmpool._errors import ProgressError
from warmpool._progress import segment as _progress
from warmpool._progress.segment import ProgressSegment, ProgressView, WorkerCounter

SHM = "/dev/shm"
REPO = Path(_progress.__file__).resolve().parents[2]
needs_dev_shm = pytest.mark.skipif(not os.path.isdir(SHM), reason="inspects /dev/shm (Linux)")


class Chunk(NamedTuple):  # the fields ProgressSegment.create reads from warmpool._plan.Chunk
    file: int
    offset: int
    length: int
    layer_lo: int
    layer_hi: int


CHUNKS = (
    Chunk(0, 0, 8192, -1, -1),
    Chunk(0, 8192, 4096, -1, 1),
    Chunk(1, 0, 4096, 2, 4),
    Chunk(1, 4096, 12288, 4, 4),
)
TOTAL = sum(c.length for c in CHUNKS)
CHUNK_STATES = ["pending", "running", "done", "failed", "skipped"]


@pytest.fixture
def segment():
    with ProgressSegment.create(TOTAL, n_workers=3, chunks=CHUNKS, n_layers=4) as seg:
        yield seg


@pytest.fixture
def shm_file():
    """Write a foreign object under /dev/shm; removed afterwards."""
    made = []

    def write(content: bytes) -> str:
        name = f"/warmpool-test-{os.getpid()}-{len(made)}"
        Path(SHM + name).write_bytes(content)
        made.append(SHM + name)
        return name

    yield write
    for path in made:
        os.unlink(path)


def python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


# --- round trip and states ------------------------------------------------------------


def test_create_attach_snapshot_round_trip(segment):
    assert re.fullmatch(rf"/warmpool-{os.getpid()}-[0-9a-f]{{8}}", segment.name)
    with ProgressView.attach(segment.name.lstrip("/")) as view:
        snap = view.snapshot()
        assert snap == segment.snapshot()
        assert (snap.done_bytes, snap.total_bytes, snap.state) == (0, TOTAL, "starting")
        assert (snap.n_workers, snap.coordinator_pid, snap.end_time_ns) == (3, os.getpid(), 0)
        assert abs(snap.start_time_ns - time.time_ns()) < 60 * 10**9
        assert not snap.finished
        assert (view.name, view.n_layers, view.n_chunks) == (segment.name, 4, len(CHUNKS))
        assert view.chunk_states() == ["pending"] * len(CHUNKS)


def test_states_and_end_time(segment):
    view = ProgressView.attach(segment.name)
    segment.set_state("running")
    assert (view.snapshot().state, view.snapshot().end_time_ns) == ("running", 0)
    segment.set_chunk_state(2, "failed")
    segment.set_chunk_state(3, "running")
    assert view.chunk_states() == ["pending", "pending", "failed", "running"]
    segment.set_state("skipped")
    snap = view.snapshot()
    assert snap.finished and snap.state == "skipped"
    assert snap.end_time_ns >= snap.start_time_ns
    view.close()
    view.close()  # idempotent
    with pytest.raises(ProgressError, match="closed"):
        view.snapshot()


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.set_state("finished"),
        lambda s: s.set_chunk_state(0, "done!"),
        lambda s: s.set_chunk_state(len(CHUNKS), "done"),
        lambda s: s.set_chunk_state(-1, "done"),
        lambda s: s.layer_ready(-2),
        lambda s: s.layer_ready(6),
    ],
)
def test_bad_arguments_raise_progress_error(segment, call):
    with pytest.raises(ProgressError):
        call(segment)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(total_bytes=-1, n_workers=1, chunks=(), n_layers=0),
        dict(total_bytes=1, n_workers=-1, chunks=(), n_layers=0),
        dict(total_bytes=1, n_workers=1, chunks=(Chunk(0, -4096, 4096, 0, 0),), n_layers=0),
        dict(total_bytes=1, n_workers=1, chunks=(Chunk(0, 0, 4096, 2**31, 0),), n_layers=0),
    ],
)
def test_values_outside_the_layout_raise_progress_error(kwargs):
    with pytest.raises(ProgressError, match="does not fit"):
        ProgressSegment.create(**kwargs)


# --- worker counters in real processes ----------------------------------------------------


def add_in_worker(name: str, slot: int, times: int, nbytes: int) -> None:
    counter = WorkerCounter.attach(name, slot)
    for _ in range(times):
        counter.add(nbytes)
    counter.close()


def test_counters_from_spawned_processes(segment):
    ctx = multiprocessing.get_context("spawn")
    jobs = [(slot, 2000, 4096 * (slot + 1)) for slot in range(3)]
    procs = [ctx.Process(target=add_in_worker, args=(segment.name, *job)) for job in jobs]
    for proc in procs:
        proc.start()
    seen = [0]
    with ProgressView.attach(segment.name) as view:
        while any(proc.is_alive() for proc in procs):
            seen.append(view.snapshot().done_bytes)
            time.sleep(0.001)  # leave the CPUs to the workers (2-core CI)
        for proc in procs:
            proc.join()
        assert [proc.exitcode for proc in procs] == [0, 0, 0]
        assert view.snapshot().done_bytes == sum(times * nbytes for _, times, nbytes in jobs)
    assert seen == sorted(seen)  # done_bytes never goes backwards
    assert os.path.exists(SHM + segment.name)  # no worker unlinked it at exit


def test_replacement_worker_continues_its_slot(segment):
    first = WorkerCounter.attach(segment.name, 1)
    first.add(10_000)
    first.close()
    second = WorkerCounter.attach(segment.name, 1)
    second.add(5)
    assert second.done_bytes == 10_005 == segment.snapshot().done_bytes
    with pytest.raises(ProgressError):
        second.add(-1)
    second.close()
    with pytest.raises(ProgressError, match="closed"):
        second.add(1)


@pytest.mark.parametrize("slot", [-1, 3])
def test_worker_slot_out_of_range(segment, slot):
    with pytest.raises(ProgressError, match="slot"):
        WorkerCounter.attach(segment.name, slot)


def cross_word_boundaries(name: str, times: int) -> None:
    counter = WorkerCounter.attach(name, 0)
    for _ in range(times):
        counter.add(2**32 - 1)  # low word all ones, then ...
        counter.add(1)  # ... low word zero and the high word moves


def test_readers_never_see_a_torn_counter():
    # Each store flips all 32 bits of one word; a reader that saw half of a store would
    # read a value off the 2**32 grid or a value lower than the one before.
    with ProgressSegment.create(0, n_workers=1, chunks=(), n_layers=0) as seg:
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=cross_word_boundaries, args=(seg.name, 100_000))
        proc.start()
        values = [0]
        with ProgressView.attach(seg.name) as view:
            while proc.is_alive():
                values.append(view.snapshot().done_bytes)
        proc.join()
        assert proc.exitcode == 0
    assert all(v % 2**32 in (0, 2**32 - 1) for v in values)
    assert values == sorted(values)


@needs_dev_shm
def test_attaching_processes_leave_no_trace(segment):
    code = (
        "import sys\n"
        "from warmpool._progress.segment import ProgressView, WorkerCounter\n"
        f"c = WorkerCounter.attach({segment.name!r}, 2); c.add(123); c.close()\n"
        f"v = ProgressView.attach({segment.name!r}); v.snapshot(); v.close()\n"
        "print('multiprocessing.resource_tracker' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env())
    assert (run.returncode, run.stderr, run.stdout) == (0, "", "False\n")
    assert os.path.exists(SHM + segment.name)
    assert segment.snapshot().done_bytes == 123


# --- per-layer readiness ----------------------------------------------------------------

LAYER_CASES = [
    # (chunks as (layer_lo, layer_hi, state), n_layers, readiness of keys -1..n_layers)
    ((), 2, [True, True, True, True]),
    (((-1, 2, "pending"),), 2, [False, False, False, False]),
    (((-1, 2, "running"),), 2, [False, False, False, False]),
    (((-1, 2, "failed"),), 2, [False, False, False, False]),
    (((-1, 2, "done"),), 2, [True, True, True, True]),
    (((-1, 2, "skipped"),), 2, [True, True, True, True]),
    (((-1, 1, "done"), (1, 2, "pending")), 2, [True, True, False, False]),
    (((0, 0, "done"), (2, 2, "pending")), 3, [True, True, True, False, True]),
    (((-1, 0, "skipped"), (0, 1, "done"), (1, 1, "failed")), 1, [True, True, False]),
    (((3, 3, "done"), (3, 3, "done"), (3, 3, "running")), 3, [True, True, True, True, False]),
]


def segment_for(case) -> ProgressSegment:
    ranges, n_layers, _ = case
    chunks = [Chunk(0, i * 4096, 4096, lo, hi) for i, (lo, hi, _) in enumerate(ranges)]
    return ProgressSegment.create(len(chunks) * 4096, 1, chunks, n_layers)


def apply_states(seg: ProgressSegment, case) -> None:
    for index, (_, _, state) in enumerate(case[0]):
        seg.set_chunk_state(index, state)


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_ready(case):
    ranges, n_layers, expected = case
    with segment_for(case) as seg, ProgressView.attach(seg.name) as view:
        keys = range(-1, n_layers + 1)
        # Ask once while everything is pending, so cached lookups must see later states.
        uncovered = [not any(lo <= k <= hi for lo, hi, _ in ranges) for k in keys]
        assert [view.layer_ready(k) for k in keys] == uncovered
        apply_states(seg, case)
        assert [view.layer_ready(k) for k in keys] == expected
        assert [seg.layer_ready(k) for k in keys] == expected


@settings(max_examples=200)  # each example maps a real segment
@given(data=st.data())
def test_layer_ready_follows_interleaved_updates(data):
    # The per-layer offsets are cached on first use; later state changes must still show.
    n_layers = data.draw(st.integers(0, 6))
    key = st.integers(-1, n_layers)
    ranges = data.draw(st.lists(st.tuples(key, key).map(sorted), max_size=8))
    states = ["pending"] * len(ranges)
    chunks = [Chunk(0, i * 4096, 4096, lo, hi) for i, (lo, hi) in enumerate(ranges)]
    with ProgressSegment.create(0, 1, chunks, n_layers) as seg, ProgressView.attach(seg.name) as view:
        for _ in range(data.draw(st.integers(1, 12))):
            if ranges and data.draw(st.booleans()):
                index = data.draw(st.integers(0, len(ranges) - 1))
                states[index] = data.draw(st.sampled_from(CHUNK_STATES))
                seg.set_chunk_state(index, states[index])
            k = data.draw(key)
            covering = [s for (lo, hi), s in zip(ranges, states) if lo <= k <= hi]
            assert view.layer_ready(k) is all(s in ("done", "skipped") for s in covering)
        assert view.chunk_states() == states
