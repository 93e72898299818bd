"""Beside an engine that loads the model itself: watch its reads, then step aside or warm from the far end.

llama.cpp's loader maps the whole file with MAP_POPULATE and faults it in from one thread before
it serves (docs/design.md, "What llama.cpp keeps on the CPU").  Where that one reader already
reads at device speed (a local disk), workers started beside it have nothing to add and take
CPU from it; behind latency-bound storage each of its requests waits the latency, and workers
pay.  Which of the two the engine meets is seen in the page cache: the file's cached bytes
(cachestat, one syscall per look, no mapping) grow at the engine's read rate.  So a warm beside
an engine (``warm(beside_engine=True)``) first watches (docs/beside-engine.md):

1. until the engine starts reading (the files' cached bytes grew by ``START_BYTES``), at most
   ``ENGINE_START_S``;
2. then its rate over ``WATCH_S``.  At ``DEVICE_RATE`` or more the warm steps aside: it starts no
   worker and waits until the engine's sweep ends (no growth for ``STALL_S``, or every file
   cached), then warms only what is still cold;
3. slower, or not started at all: the warm starts now, with its chunks in reverse plan order
   (from the far end of the engine's path), so its workers and the engine's sweep from the
   front meet once, in the middle, instead of on the same folios.

With the engine's process known (``engine_pid``: ``warmpool run``'s child, the adapter's own
process), its reads are its own storage reads (``read_bytes`` of /proc/PID/io), not the files'
cached bytes, which the warm's workers also grow; then step 1 waits only ``GRACE_S``.  An
engine not reading by then is still starting (a Python server's imports take most of a second):
the warm goes first, in plan order, where the engine's sweep will begin, and ``EngineGuard``
stops it once the engine reads at ``DEVICE_RATE``; it then waits for the sweep to end and warms
what is still cold, as in step 2.

An engine in the warm's own process (the adapter: ``Llama()`` loads while the warm's thread
runs) shares the interpreter's lock with it: the plan's header walk and imports, ~20 ms of
Python, would run between the engine's own Python steps.  ``watch_engine`` therefore watches the
engine's reads before there is a plan (``warm(engine_watch=...)`` then acts on its verdict), and
a stepped-aside warm plans only once the sweep has ended.

Once the engine has loaded, what a keeper does next for it (``hold``: map the selection, fault
it into its own mapping, read a byte per page; tens of milliseconds of CPU for a 1.7 GB model)
can wait until the engine is between requests: ``wait_until_quiet`` returns once the engine used
under ``QUIET_SHARE`` of a core over ``QUIET_S`` (at most ``QUIET_MAX_S``), so that the work does
not land on the first request, which comes right after the load.

Where cachestat is missing or the kernel hides the files' residency, nothing is watched and the
warm goes from the far end at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from . import _platform

__all__ = ["DEVICE_RATE", "ENGINE_START_S", "GRACE_S", "QUIET_S", "EngineGuard", "EngineWatch", "wait_until_quiet",
           "watch_engine", "watch_files"]

START_BYTES = 16 * 1024 * 1024  # more than a header walk reads: the engine is reading tensors
ENGINE_START_S = 1.0  # llama.cpp's MAP_POPULATE starts within ~0.1 s of Llama(); a server's imports take longer
# With the engine's own reads in view, how long it may take to begin: llama.cpp reads within
# ~0.1 s of Llama() (the adapter's warm saw it reading within this in each of 9 rounds,
# docs/beside-engine.md); an engine that has not begun by then is still starting.
GRACE_S = 0.25
WATCH_S = 0.2  # long enough for a few readahead windows at any rate worth stepping aside for
POLL_S = 0.02
CACHED_LOOK_S = 0.1  # with the engine's own reads in view, "every file cached" is a shortcut: looked at less often
STALL_S = 0.3  # no growth this long: the engine's sweep has ended
# 200 MB/s: far above what one reader gets behind 5 ms of latency per request (~25-50 MB/s
# with the kernel's readahead), well below one reader on a local SSD or this VM's virtio disk
# (1.3-1.6 GB/s).  Figures and commands: docs/beside-engine.md.
DEVICE_RATE = 200e6
# Quiet: under 5% of a core over half a second (a few of /proc's 10-ms ticks).  An engine between
# requests uses none; one answering a request uses every core it was given.
QUIET_S = 0.5
QUIET_SHARE = 0.05
QUIET_MAX_S = 30.0  # an engine busy for this long gets the work anyway (at the keeper's idle priority)


class EngineWatch(NamedTuple):
    started: bool  # the engine was seen reading the model
    rate: float | None  # bytes/s it read during the watch window; None if not seen
    stepped_aside: bool  # it read at device speed and the warm waited for its sweep to end
    seconds: float  # time spent watching (and waiting while stepped aside)
    head_start: bool = False  # not reading within GRACE_S: the warm goes first, under an EngineGuard
    engine_pid: int | None = None  # the process whose own reads were watched; None: the files' cache

    def describe(self) -> str:
        if self.head_start:
            return f"beside the engine: it was not reading within {GRACE_S:g} s; warmed first, in its order"
        if not self.started:
            return ("beside the engine: it was not seen reading within "
                    f"{ENGINE_START_S:g} s; warmed from the far end")
        how = "stepped aside until its sweep ended" if self.stepped_aside else "warmed from the far end"
        return f"beside the engine: it read {self.rate / 1e6:,.0f} MB/s; {how} ({self.seconds:.2f} s watching)"


def _cached(fds: Sequence[int]) -> int | None:
    total = 0
    for fd in fds:
        n = _platform.cached_bytes(fd, 0, 0)
        if n is None:
            return None
        total += n
    return total


def _reads(pid: int) -> Callable[[], int]:
    """The engine's own storage reads so far, as the watch asks for them (0 once unreadable)."""
    return lambda: _platform.storage_read_bytes(pid) or 0


def watch_engine(engine_pid: int, should_stop: Callable[[], bool] | None = None) -> EngineWatch | None:
    """Watch the engine (``engine_pid``) read before the warm has a plan or open files: its own
    storage reads alone, so that nothing but a read of /proc/PID/io every ``POLL_S`` runs beside
    its load.  Steps 1-3 of the module doc, with ``GRACE_S`` for step 1, and the end of a sweep
    seen only as no growth of its reads for ``STALL_S``.  ``should_stop()`` True ends the watch
    early.  None where its reads cannot be seen (no such process, another user's,
    no task I/O accounting).  Pass the result to ``warm(engine_watch=...)``."""
    if _platform.storage_read_bytes(engine_pid) is None:
        return None
    return _watch(_reads(engine_pid), lambda: False, should_stop or (lambda: False), GRACE_S, engine_pid)


def watch_files(fds: Sequence[int], file_bytes: int, should_stop: Callable[[], bool],
                engine_pid: int | None = None) -> EngineWatch | None:
    """Watch the engine read the files ``fds`` (``file_bytes`` in all); None where the page cache
    cannot be watched (no cachestat, hidden residency).  See the module doc."""
    if _cached(fds) is None:
        return None
    if engine_pid is not None and _platform.storage_read_bytes(engine_pid) is not None:
        return _watch(_reads(engine_pid), _AllCached(fds, file_bytes), should_stop, GRACE_S, engine_pid)
    seen = [0]

    def cached() -> int:
        seen[0] = _cached(fds) or 0
        return seen[0]

    def all_cached() -> bool:  # the last look's total: one cachestat per poll, not two
        return seen[0] >= file_bytes

    return _watch(cached, all_cached, should_stop, ENGINE_START_S, None)


def _watch(progress: Callable[[], int], all_cached: Callable[[], bool], should_stop: Callable[[], bool],
           start_s: float, engine_pid: int | None) -> EngineWatch:
    """Steps 1-3 of the module doc on ``progress`` (the engine's bytes read so far); an engine
    not reading within ``start_s`` is warmed for first when its own reads are in view."""
    started_at = now = time.monotonic()
    base = done = progress()
    # 1. wait for the engine's first reads
    while done - base < START_BYTES and not all_cached():  # all cached: the engine read it at once
        if now - started_at >= start_s or should_stop():
            return EngineWatch(False, None, False, now - started_at, engine_pid is not None, engine_pid)
        time.sleep(POLL_S)
        now, done = time.monotonic(), progress()
    # 2. its rate over a window
    mark, mark_at = done, now
    while now - mark_at < WATCH_S and not all_cached() and not should_stop():
        time.sleep(POLL_S)
        now, done = time.monotonic(), progress()
    rate = (done - mark) / max(now - mark_at, 1e-6)
    if rate < DEVICE_RATE and not all_cached():
        return EngineWatch(True, rate, False, now - started_at, False, engine_pid)
    # 3. stepped aside: wait for the sweep to end
    _wait_for_sweep(progress, all_cached, should_stop)
    return EngineWatch(True, rate, True, time.monotonic() - started_at, False, engine_pid)


class _AllCached:
    """Whether every file is cached, asked at most every ``CACHED_LOOK_S``: cachestat walks the
    file's cached pages, 5.9 ms per call on a resident 1.76 GB model here: up to 30% of a core
    at one look per 20-ms poll, beside the engine it watches."""

    def __init__(self, fds: Sequence[int], file_bytes: int) -> None:
        self.fds, self.file_bytes = fds, file_bytes
        self.next_look, self.answer = 0.0, False

    def __call__(self) -> bool:
        now = time.monotonic()
        if now >= self.next_look:
            self.next_look = now + CACHED_LOOK_S
            self.answer = (_cached(self.fds) or 0) >= self.file_bytes
        return self.answer


def _wait_for_sweep(progress: Callable[[], int], all_cached: Callable[[], bool], should_stop: Callable[[], bool]) -> None:
    """Until the engine's reads stop growing for ``STALL_S`` or every file is cached."""
    last, last_growth = progress(), time.monotonic()
    while not all_cached() and time.monotonic() - last_growth < STALL_S and not should_stop():
        time.sleep(POLL_S)
        done = progress()
        if done > last:
            last, last_growth = done, time.monotonic()


class EngineGuard:
    """While the warm goes first (``EngineWatch.head_start``): a stop condition for its pool that
    trips once the engine (``pid``) reads ``START_BYTES`` and then ``DEVICE_RATE`` over
    ``WATCH_S``.  Slower, the warm goes on (storage where more readers pay).  Looks at most
    every ``POLL_S``, one read of /proc/PID/io."""

    def __init__(self, pid: int) -> None:
        self.reads = _reads(pid)
        self.base = self.reads()
        self.mark: tuple[int, float] | None = None
        self.next_look = 0.0
        self.rate: float | None = None  # the engine's rate when it tripped
        self.tripped = False

    def wait_for_sweep(self, fds: Sequence[int], file_bytes: int, should_stop: Callable[[], bool]) -> None:
        """Once tripped: until the engine's reads stop growing for ``STALL_S`` or the files
        (``fds``, ``file_bytes`` in all) are all cached."""
        _wait_for_sweep(self.reads, _AllCached(fds, file_bytes), should_stop)

    def __call__(self) -> bool:
        now = time.monotonic()
        if self.tripped or now < self.next_look:
            return self.tripped
        self.next_look = now + POLL_S
        done = self.reads()
        if self.mark is None:
            if done - self.base >= START_BYTES:
                self.mark = (done, now)
        elif now - self.mark[1] >= WATCH_S:
            rate = (done - self.mark[0]) / (now - self.mark[1])
            if rate >= DEVICE_RATE:
                self.tripped, self.rate = True, rate
            else:
                self.mark = (done, now)
        return self.tripped


def wait_until_quiet(pid: int, should_stop: Callable[[], bool]) -> bool:
    """Until the engine ``pid`` has used under ``QUIET_SHARE`` of a core over ``QUIET_S`` (True),
    or it has gone, its CPU time cannot be read, ``QUIET_MAX_S`` has passed or ``should_stop()``
    (False).  See the module doc."""
    deadline = time.monotonic() + QUIET_MAX_S
    mark = (time.monotonic(), _platform.process_cpu_seconds(pid))
    if mark[1] is None:
        return False
    while time.monotonic() < deadline and not should_stop():
        time.sleep(POLL_S)
        now, used = time.monotonic(), _platform.process_cpu_seconds(pid)
        if used is None:
            return False
        if now - mark[0] >= QUIET_S:
            if (used - mark[1]) / (now - mark[0]) < QUIET_SHARE:
                return True
            mark = (now, used)
    return False
