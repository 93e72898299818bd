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

Where cachestat is missing or the kernel hides the files' residency, nothing is watched and the
warm goes from the far end at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from . import _platform

__all__ = ["DEVICE_RATE", "ENGINE_START_S", "EngineWatch", "watch_engine"]

START_BYTES = 16 * 1024 * 1024  # more than a header walk reads: the engine is reading tensors
ENGINE_START_S = 1.0  # llama.cpp's MAP_POPULATE starts within ~0.1 s of Llama(); a server's imports take longer
WATCH_S = 0.2  # long enough for a few readahead windows at any rate worth stepping aside for
POLL_S = 0.02
STALL_S = 0.3  # no growth this long: the engine's sweep has ended
# 200 MB/s: far above what one reader gets behind 5 ms of latency per request (~25-50 MB/s
# with the kernel's readahead), well below one reader on a local SSD or this VM's virtio disk
# (1.3-1.6 GB/s).  Figures and commands: docs/beside-engine.md.
DEVICE_RATE = 200e6


class EngineWatch(NamedTuple):
    started: bool  # the engine was seen reading the model
    rate: float | None  # bytes/s it read during the watch window; None if not seen
    stepped_aside: bool  # it read at device speed and the warm waited for its sweep to end
    seconds: float  # time spent watching (and waiting while stepped aside)

    def describe(self) -> str:
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


def watch_engine(fds: Sequence[int], file_bytes: int, should_stop: Callable[[], bool]) -> EngineWatch | None:
    """Watch the engine read the files ``fds`` (``file_bytes`` in all); None where the page cache
    cannot be watched (no cachestat, hidden residency).  See the module doc."""
    started_at = time.monotonic()
    base = _cached(fds)
    if base is None:
        return None
    now = started_at
    # 1. wait for the engine's first reads
    cached = base
    while cached - base < START_BYTES and cached < file_bytes:  # all cached: the engine read it at once
        if now - started_at >= ENGINE_START_S or should_stop():
            return EngineWatch(False, None, False, now - started_at)
        time.sleep(POLL_S)
        now, cached = time.monotonic(), _cached(fds) or 0
    # 2. its rate over a window
    mark, mark_at = cached, now
    while now - mark_at < WATCH_S and cached < file_bytes and not should_stop():
        time.sleep(POLL_S)
        now, cached = time.monotonic(), _cached(fds) or 0
    rate = (cached - mark) / max(now - mark_at, 1e-6)
    if rate < DEVICE_RATE and cached < file_bytes:
        return EngineWatch(True, rate, False, now - started_at)
    # 3. stepped aside: wait for the sweep to end
    last, last_growth = cached, now
    while cached < file_bytes and now - last_growth < STALL_S and not should_stop():
        time.sleep(POLL_S)
        now, cached = time.monotonic(), _cached(fds) or 0
        if cached > last:
            last, last_growth = cached, now
    return EngineWatch(True, rate, True, now - started_at)
