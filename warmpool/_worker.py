"""What one worker process does: fault the pages of the chunks it is handed into the cache.

A worker opens each model file read-only once, and for each chunk maps it, skips the pages
already resident (mincore), faults the rest in with the chosen strategy, adds its progress to
its own slot of the shared-memory segment every ``STEP`` bytes, and unmaps the chunk again:
no mapping or buffer outlives a chunk except the one pread buffer it reuses.

Kept to the standard library plus ``_platform``/``_progress`` so that a worker forked from the
forkserver costs a few MB of private memory (numpy is imported only by the ``touch`` strategy).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection

from . import _platform
from ._errors import FileChangedError, WarmpoolError
from ._progress import WorkerCounter

__all__ = ["STEP", "STRATEGIES", "nonresident_runs", "serve", "worker_main"]

STEP = 8 * 1024 * 1024  # progress grain, and the most one populate/touch/pread call covers
STRATEGIES = ("populate", "touch", "read", "willneed")


def nonresident_runs(vector: bytes) -> Iterator[tuple[int, int]]:
    """(first page, end page) of each run of non-resident pages in a mincore vector."""
    start = vector.find(0)
    while start != -1:
        end = vector.find(1, start)
        if end == -1:
            end = len(vector)
        yield start, end
        start = vector.find(0, end)


class _ChunkWarmer:
    """Applies one strategy to the non-resident runs of a chunk, reporting as it goes."""

    def __init__(self, strategy: str, counter: WorkerCounter) -> None:
        self.strategy = strategy
        self.counter = counter
        self.buffer = bytearray(STEP) if strategy == "read" else None
        self.page = _platform.PAGE_SIZE

    def warm(self, fd: int, offset: int, length: int) -> tuple[int, int]:
        """Warm [offset, offset+length); return (bytes faulted in, bytes already resident)."""
        with _platform.FileWindow(fd, offset, length) as window:
            vector = window.resident()
            runs = [(s * self.page, min(e * self.page, length)) for s, e in nonresident_runs(vector)]
            cold = sum(end - start for start, end in runs)
            already = length - cold
            self.counter.add(already)
            for start, end in runs:
                self._warm_run(fd, window, start, end)
        return cold, already

    def _warm_run(self, fd: int, window: _platform.FileWindow, rel: int, rel_end: int) -> None:
        if self.strategy in ("populate", "touch"):
            # Queue the whole run's reads at once (exact, async), then fault: the faults find the
            # pages arriving and readahead never spills past the selection (REFERENCE §7).
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
                slot: int, strategy: str, conn: Connection) -> None:
    """Serve chunk indices from ``conn`` until it sends None; answer each with a report.

    Reports: ("done", index, faulted, already) or ("error", index, WarmpoolError).
    """
    # Ctrl-C reaches the whole process group; the coordinator decides how to stop, so a worker
    # must not die half-way through a report with a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    counter = WorkerCounter.attach(shm_name, slot)
    fds = _open_files(paths)
    if strategy == "read":
        for fd in fds:
            _platform.advise_random(fd)  # pread reads exactly the range, no readahead past it
    warmer = _ChunkWarmer(strategy, counter)
    try:
        while (index := conn.recv()) is not None:
            file, offset, length = chunks[index]
            try:
                faulted, already = warmer.warm(fds[file], offset, length)
            except WarmpoolError as e:
                e.path = e.path or paths[file]
                conn.send(("error", index, e))
                return
            conn.send(("done", index, faulted, already))
    except (EOFError, BrokenPipeError):
        pass  # the coordinator went away: nothing left to report to
    finally:
        counter.close()
        for fd in fds:
            os.close(fd)


def serve(fd: int) -> None:
    """Entry point of ``python -I -S -c ...`` (see ``_pool``): read the job, then work."""
    conn = Connection(fd)
    try:
        paths, chunks, shm_name, slot, strategy = conn.recv()
    except EOFError:
        return
    worker_main(paths, chunks, shm_name, slot, strategy, conn)
