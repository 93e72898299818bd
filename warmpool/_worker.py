"""What one worker process does: fault the pages of the chunks it is handed into the cache.

A worker opens each model file read-only once, and for each chunk maps it, skips the pages
already resident (mincore), faults the rest in with the chosen strategy, adds its progress to
its own slot of the shared-memory segment every ``STEP`` bytes, and unmaps the chunk again:
no mapping or buffer outlives a chunk except the one pread buffer it reuses.

Kept to the standard library plus ``_platform``/``_progress`` so that a worker forked from the
forkserver costs a few MB of private memory (numpy is imported only by the ``touch`` strategy).
"""

from __future__ import annotations

import bisect
import os
import signal
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection

from . import _platform
from ._errors import FileChangedError, WarmpoolError
from ._plan import contiguous_runs
from ._progress import WorkerCounter
from ._strategy import STRATEGIES  # re-exported: the names _ChunkWarmer implements

__all__ = ["FAULT_READAHEAD_MIN", "STEP", "STRATEGIES", "Guards", "nonresident_runs", "serve", "worker_main"]

STEP = 8 * 1024 * 1024  # progress grain, and the most one populate/touch/pread call covers
# From this readahead size up, populate/touch let the kernel's fault readahead read the inside
# of an extent and hint (WILLNEED) only its edges (see Guards).  A WILLNEED hint reads in 2 MiB
# pieces of 4 KiB folios (force_page_cache_ra); faults read ahead in large folios.  On this
# project's 2-core VM (virtio disk, read_ahead_kb 8192), one process warming 1.65 GB in 16 MiB
# chunks, paired runs: whole chunk hinted 2.3-2.7 s (0.9 s CPU, ~1 MiB requests), faults alone
# 0.95-1.5 s (0.13 s CPU, ~3 MiB requests), vmtouch -t 1.1-1.7 s.  With a small window
# (FUSE/NFS and many disks: 128 KiB) fault readahead keeps ~2 requests in flight per process
# while the stepped hints queue the whole chunk (64 in flight from one worker on latency_fs),
# so there the whole chunk is still hinted.
FAULT_READAHEAD_MIN = 1024 * 1024


def nonresident_runs(vector: bytes) -> Iterator[tuple[int, int]]:
    """(first page, end page) of each run of non-resident pages in a mincore vector."""
    start = vector.find(0)
    while start != -1:
        end = vector.find(1, start)
        if end == -1:
            end = len(vector)
        yield start, end
        start = vector.find(0, end)


class Guards:
    """Where fault readahead could read past what this warm faults, from its chunks.

    Extents are the chunks to be warmed, merged where they touch; a planned chunk left out (over
    the budget, or already resident) is outside, like an unselected tensor.  A fault that misses
    reads around itself (mmap read-around: half a window before, half after) and every readahead
    window it starts can start one more past its end (mm/filemap.c, mm/readahead.c), so faults
    may read up to ``ra / 2`` before and ``2 * ra`` after the pages they fault.  Pages already in
    the cache are skipped by readahead but do not stop it, and carry no readahead mark if a
    WILLNEED hint put them there.  So hinting the first ``ra`` and the last ``2 * ra`` bytes of
    each extent before any fault can reach them keeps every read inside the extents: a worker
    hints the guard zones within reach of its chunk before faulting it.  Checked on the 1.65 GB
    bench model (-ngl 8; -ngl 99 --n-cpu-moe 2; -ot ffn_up_exps=CPU; half-budget warms; 1, 2 and
    4 workers, populate and touch): 0 bytes read outside the extents.
    """

    def __init__(self, chunks: Sequence[tuple[int, int, int]]) -> None:
        self.extents = contiguous_runs(chunks)

    def zones(self, file: int, offset: int, length: int, ra: int) -> list[tuple[int, int]]:
        """Byte ranges to hint before faulting [offset, offset + length) with window ``ra``."""
        extents = self.extents[file]
        start, end = extents[bisect.bisect_right(extents, (offset, float("inf"))) - 1]
        reach_lo, reach_hi = offset - ra, offset + length + 2 * ra
        zones = [(max(lo, reach_lo), min(hi, reach_hi))
                 for lo, hi in ((start, min(start + ra, end)), (max(end - 2 * ra, start), end))]
        zones = [(lo, hi) for lo, hi in zones if lo < hi]
        if len(zones) == 2 and zones[1][0] <= zones[0][1]:  # a short extent: one zone
            zones = [(zones[0][0], max(zones[0][1], zones[1][1]))]
        return zones


class _ChunkWarmer:
    """Applies one strategy to the non-resident runs of a chunk, reporting as it goes."""

    def __init__(self, strategy: str, counter: WorkerCounter, guards: Guards) -> None:
        self.strategy = strategy
        self.counter = counter
        self.guards = guards
        self.buffer = bytearray(STEP) if strategy == "read" else None
        self.page = _platform.PAGE_SIZE
        self.hidden: set[int] = set()  # files whose mincore vector is made up: trust none of it

    def warm(self, fd: int, file: int, offset: int, length: int) -> None:
        """Warm [offset, offset+length); resident pages count as done at once."""
        with _platform.FileWindow(fd, offset, length) as window:
            vector = bytes(-(-length // self.page)) if file in self.hidden else window.resident()
            runs = [(s * self.page, min(e * self.page, length)) for s, e in nonresident_runs(vector)]
            self.counter.add(length - sum(end - start for start, end in runs))
            hint_runs = self._hint_edges(fd, file, offset, length) if runs else False
            for start, end in runs:
                self._warm_run(fd, window, start, end, hint_runs)

    def _hint_edges(self, fd: int, file: int, offset: int, length: int) -> bool:
        """Where fault readahead pays, hint the extent edges within reach and return False
        (faults read the rest); else return True: each run is hinted whole."""
        if self.strategy not in ("populate", "touch"):
            return False
        ra = _platform.readahead_size(fd)
        if ra < FAULT_READAHEAD_MIN:
            return True
        for lo, hi in self.guards.zones(file, offset, length, ra):
            _platform.prefetch(fd, lo, hi - lo)
        return False

    def _warm_run(self, fd: int, window: _platform.FileWindow, rel: int, rel_end: int, hint: bool) -> None:
        if hint:
            # Queue the whole run's reads at once (exact, async), then fault: the faults find the
            # pages arriving and readahead never spills past the selection (docs/design.md,
            # "Readahead and hints").
            _platform.prefetch(fd, window.offset + rel, rel_end - rel)
        for step in range(rel, rel_end, STEP):
            n = min(STEP, rel_end - step)
            if self.strategy == "populate":
                window.populate(step, n)
            elif self.strategy == "touch":
                window.touch(step, n)
            elif self.strategy == "read":
                _platform.read_range(fd, window.offset + step, n, self.buffer)
            else:
                window.willneed(step, n)
            self.counter.add(n)


def _open_files(paths: Sequence[str]) -> list[int]:
    fds = []
    for path in paths:
        try:
            fds.append(os.open(path, os.O_RDONLY))  # never for writing: the model stays untouched
        except OSError as e:
            raise FileChangedError(f"cannot reopen for warming: {e.strerror}", path) from None
    return fds


def worker_main(paths: Sequence[str], chunks: Sequence[tuple[int, int, int]], shm_name: str,
                slot: int, strategy: str, conn: Connection, warmed: Sequence[int] | None = None) -> None:
    """Serve chunk indices from ``conn`` until it sends None; answer each with a report.

    ``warmed``: indices of the chunks this warm faults (default: all); reads stay inside them.

    Reports: ("done", index) or ("error", index, WarmpoolError).
    """
    # Ctrl-C reaches the whole process group; the coordinator decides how to stop, so a worker
    # must not die half-way through a report with a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        counter = WorkerCounter.attach(shm_name, slot)
        fds = _open_files(paths)
        if strategy == "read":
            for fd in fds:
                _platform.advise_random(fd)  # pread reads exactly the range, no readahead past it
        hidden = {file for file, fd in enumerate(fds) if _platform.residency_hidden(fd)}
    except WarmpoolError as e:
        _refuse(conn, e)  # e.g. the file vanished between the plan and this open
        return
    to_warm = chunks if warmed is None else [chunks[i] for i in warmed]
    warmer = _ChunkWarmer(strategy, counter, Guards(to_warm))
    warmer.hidden = hidden
    try:
        while (index := conn.recv()) is not None:
            file, offset, length = chunks[index]
            try:
                warmer.warm(fds[file], file, offset, length)
            except WarmpoolError as e:
                e.path = e.path or paths[file]
                conn.send(("error", index, e))
                return
            conn.send(("done", index))
    except (EOFError, BrokenPipeError):
        pass  # the coordinator went away: nothing left to report to
    finally:
        counter.close()
        for fd in fds:
            os.close(fd)


def _refuse(conn: Connection, error: WarmpoolError) -> None:
    """A start-up failure, answered to the first chunk the coordinator hands out: it then raises
    the error itself (a traceback here would only end as "worker died")."""
    try:
        index = conn.recv()
        if index is not None:
            conn.send(("error", index, error))
    except (EOFError, OSError):
        pass  # the coordinator went away: nothing left to report to


def serve(fd: int) -> None:
    """Entry point of ``python -I -S -c ...`` (see ``_pool``): read the job, then work."""
    conn = Connection(fd)
    try:
        paths, chunks, shm_name, slot, strategy, warmed = conn.recv()
    except EOFError:
        return
    worker_main(paths, chunks, shm_name, slot, strategy, conn, warmed)
