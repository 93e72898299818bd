"""What one worker process does: fault the pages of the chunks it is handed into the cache.

A worker opens each model file read-only once, and for each chunk maps it, skips the pages
already resident (mincore), faults the rest in with the chosen strategy, adds its progress to
its own slot of the shared-memory segment every ``STEP`` bytes, and unmaps the chunk again:
no mapping or buffer outlives a chunk except the one pread buffer it reuses.  Once every chunk
of the warm is done, it reads each page of the chunks it warmed once more (``_worker_finish``).

Kept to the standard library plus ``_platform``/``_progress`` so that a worker forked from the
forkserver costs a few MB of private memory (numpy is imported only by the ``touch`` strategy).
"""

from __future__ import annotations

import bisect
import os
import signal
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import _platform
from ._errors import FileChangedError, WarmpoolError
from ._plan import contiguous_runs
from ._progress import WorkerCounter
from ._strategy import STRATEGIES  # re-exported: the names _ChunkWarmer implements
from ._wire import Channel
from ._worker_finish import Marks, reread

if TYPE_CHECKING:  # pragma: no cover
    from multiprocessing.connection import Connection

__all__ = ["FAULT_READAHEAD_MIN", "FAULT_THREADS", "STEP", "STRATEGIES", "Guards", "serve", "worker_main"]

STEP = 8 * 1024 * 1024  # progress grain, and the most one populate/touch/pread call covers
# From this readahead size up, populate/touch let the kernel's fault readahead read the inside
# of an extent and keep hints (WILLNEED) for the edges (see Guards).  Hints read 4 KiB folios
# (force_page_cache_ra); faults read ahead in large ones.  With a small window (FUSE/NFS and
# many disks: 128 KiB) fault readahead keeps ~2 requests in flight per process while stepped
# hints queue the whole chunk (64 in flight from one worker on latency_fs), so there the whole
# chunk is still hinted.  Measurements: docs/folios.md.
FAULT_READAHEAD_MIN = 1024 * 1024
# Threads per worker faulting PMD-size blocks at once (one read in flight each); measured on
# the local disk: docs/folios.md.
FAULT_THREADS = 4


class Guards:
    """Where reads may go, from the chunks this warm faults, so nothing unselected is read.

    Extents are the chunks to be warmed, merged where they touch; a planned chunk left out (over
    the budget, or already resident) is outside, like an unselected tensor.

    Huge folios (``parts``, the default where the kernel has them; docs/folios.md): the worker
    maps its chunk with MADV_HUGEPAGE + MADV_RANDOM.  A fault that misses then reads exactly the
    aligned PMD-size block around it, as one PMD-size folio, and starts no readahead
    (``do_sync_mmap_readahead`` reads ``HPAGE_PMD_NR`` pages at the aligned index and
    ``do_async_mmap_readahead`` returns early for VM_RAND_READ, mm/filemap.c); where some pages of
    the block are cached, ``page_cache_ra_order`` falls back to reading the block's gaps.  So an
    extent [S, E) is faulted that way over its whole blocks [A, B) (A = S rounded up, B = E
    rounded down to a block), and its unaligned head [S, A) and tail [B, E) are hinted (WILLNEED
    reads exactly the range, in 4 KiB folios) and faulted under MADV_RANDOM alone, which reads
    at most the faulted page.  No read crosses an extent's edge whatever the readahead size.

    Without huge folios (``zones``): a fault that misses reads around itself (mmap read-around:
    half a window before, half after) and every readahead window it starts can start one more
    past its end, so faults may read up to ``ra / 2`` before and ``2 * ra`` after the pages they
    fault.  Pages already in the cache are skipped by readahead but do not stop it, and carry no
    readahead mark if a WILLNEED hint put them there.  So hinting the first ``ra`` and the last
    ``2 * ra`` bytes of each extent before any fault can reach them keeps every read inside the
    extents.  Both are tested (tests/test_warm.py, tests/test_folios.py).
    """

    def __init__(self, chunks: Sequence[tuple[int, int, int]]) -> None:
        self.extents = contiguous_runs(chunks)

    def extent(self, file: int, offset: int) -> tuple[int, int]:
        """The extent [start, end) holding ``offset`` of ``file``."""
        extents = self.extents[file]
        return extents[bisect.bisect_right(extents, (offset, float("inf"))) - 1]

    def zones(self, file: int, offset: int, length: int, ra: int) -> list[tuple[int, int]]:
        """Byte ranges to hint before faulting [offset, offset + length) with window ``ra``."""
        start, end = self.extent(file, offset)
        reach_lo, reach_hi = offset - ra, offset + length + 2 * ra
        zones = [(max(lo, reach_lo), min(hi, reach_hi))
                 for lo, hi in ((start, min(start + ra, end)), (max(end - 2 * ra, start), end))]
        zones = [(lo, hi) for lo, hi in zones if lo < hi]
        if len(zones) == 2 and zones[1][0] <= zones[0][1]:  # a short extent: one zone
            zones = [(zones[0][0], max(zones[0][1], zones[1][1]))]
        return zones

    def parts(self, file: int, offset: int, length: int, huge: int) -> list[tuple[int, int, bool]]:
        """[offset, offset + length) cut at its extent's block edges: ``(start, end, whole)``,
        ``whole`` for whole aligned blocks (fault under MADV_HUGEPAGE), else an unaligned edge
        (hint, then fault under MADV_RANDOM alone)."""
        start, end = self.extent(file, offset)
        a, b = -(-start // huge) * huge, end - end % huge
        cuts = ((start, a, False), (a, b, True), (b, end, False)) if a < b else ((start, end, False),)
        chunk_end = offset + length
        return [(max(lo, offset), min(hi, chunk_end), whole) for lo, hi, whole in cuts
                if max(lo, offset) < min(hi, chunk_end)]


class _ChunkWarmer:
    """Applies one strategy to the non-resident runs of a chunk, reporting as it goes."""

    def __init__(self, strategy: str, counter: WorkerCounter, guards: Guards, paths: Sequence[str] = ()) -> None:
        self.strategy = strategy
        self.counter = counter
        self.guards = guards
        self.buffer = bytearray(STEP) if strategy == "read" else None
        self.page = _platform.PAGE_SIZE
        self.huge = _platform.huge_folio_size() if strategy in ("populate", "touch") else None
        self.threads: _FaultThreads | None = None
        self.marks = Marks(paths, self.huge) if self.huge else None
        self.hidden: set[int] = set()  # files whose mincore vector is made up: trust none of it
        self.warmed: list[tuple[int, int, int]] = []  # (fd, offset, length): chunks ``finish`` reads again

    def warm(self, fd: int, file: int, offset: int, length: int) -> None:
        """Warm [offset, offset+length); resident pages count as done at once."""
        with _platform.FileWindow(fd, offset, length) as window:
            vector = bytes(-(-length // self.page)) if file in self.hidden else window.resident()
            runs = [(s * self.page, min(e * self.page, length)) for s, e in _platform.page_runs(vector, 0)]
            self.counter.add(length - sum(end - start for start, end in runs))
            if not runs:
                return
            if self.strategy in ("populate", "touch"):
                self.warmed.append((fd, offset, length))
                if self._warm_huge(fd, window, file, runs):
                    return
            hint_runs = self._hint_edges(fd, file, offset, length)
            for start, end in runs:
                self._warm_run(fd, window, start, end, hint_runs)

    def _warm_huge(self, fd: int, window: _platform.FileWindow, file: int, runs: list[tuple[int, int]]) -> bool:
        """Fault the runs in PMD-size folios, exactly (see Guards); False where this kernel or
        device does not take that path (then nothing was done)."""
        if not self.huge or _platform.readahead_size(fd) < FAULT_READAHEAD_MIN:
            return False
        if not window.advise(0, window.length, "hugepage"):
            return False  # no transparent huge pages: nothing changed
        if not window.advise(0, window.length, "random"):
            window.advise(0, window.length, "nohugepage")
            return False
        offset, blocks, whole_blocks = window.offset, [], []
        for lo, hi, whole in self.guards.parts(file, offset, window.length, self.huge):
            if not whole:
                window.advise(lo - offset, hi - lo, "nohugepage")
        for start, end in runs:
            for lo, hi, whole in self.guards.parts(file, offset + start, end - start, self.huge):
                if whole:  # one task per block: the threads keep several block reads in flight
                    starts = [lo, *range(lo - lo % self.huge + self.huge, hi, self.huge)]
                    blocks += [(p, min(p - p % self.huge + self.huge, hi)) for p in starts]
                    whole_blocks += [p - p % self.huge for p in starts]
                else:
                    _platform.prefetch(fd, lo, hi - lo)
                    blocks.append((lo, hi))
        if self.threads is None:
            self.threads = _FaultThreads(FAULT_THREADS)
        self.threads.run(window, [(lo - offset, hi - lo) for lo, hi in blocks], self.strategy, self.counter)
        if self.marks and file not in self.hidden:  # hidden residency: the "cached" check would lie
            self.marks.add(file, whole_blocks, self.guards.extent(file, offset)[1], _platform.readahead_size(fd))
        return True

    def finish(self) -> None:
        """Once every chunk of the warm is done (``_worker_finish``)."""
        if self.marks:
            self.marks.close()
        reread(self.warmed)

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
            _fault(window, step, n, self.strategy, fd, self.buffer)
            self.counter.add(n)


def _fault(window: _platform.FileWindow, rel: int, n: int, strategy: str, fd: int, buffer) -> None:
    if strategy == "populate":
        window.populate(rel, n)
        # Populating maps pages without reading them; in a VM the first CPU read of a page the
        # disk wrote can cost microseconds, which an engine would otherwise pay in its first
        # request (docs/folios.md).
        window.read_pages(rel, n)
    elif strategy == "touch":
        window.touch(rel, n)
    elif strategy == "read":
        _platform.read_range(fd, window.offset + rel, n, buffer)
    else:
        window.willneed(rel, n)


class _FaultThreads:
    """A few threads of one worker faulting blocks of the current chunk at once.

    Under MADV_RANDOM a fault reads only its own block and waits for it, so one thread keeps a
    single read in flight; the device needs several (docs/folios.md).  madvise and numpy's
    reduction release the GIL while they fault.  The first error stops the chunk and is
    raised in the worker's thread."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.lock = threading.Lock()

    def run(self, window: _platform.FileWindow, spans: list[tuple[int, int]], strategy: str,
            counter: WorkerCounter) -> None:
        todo = list(reversed(spans))
        errors: list[BaseException] = []

        def work() -> None:
            while True:
                with self.lock:
                    if errors or not todo:
                        return
                    rel, n = todo.pop()
                try:
                    _fault(window, rel, n, strategy, window.fd, None)
                except BaseException as e:  # noqa: BLE001 - handed to the worker's thread
                    with self.lock:
                        errors.append(e)
                    return
                with self.lock:
                    counter.add(n)

        threads = [threading.Thread(target=work, daemon=True) for _ in range(min(self.n, len(spans)) - 1)]
        for t in threads:
            t.start()
        work()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


def _open_files(paths: Sequence[str]) -> list[int]:
    fds = []
    for path in paths:
        try:
            fds.append(os.open(path, os.O_RDONLY))  # never for writing: the model stays untouched
        except OSError as e:
            raise FileChangedError(f"cannot reopen for warming: {e.strerror}", path) from None
    return fds


def worker_main(paths: Sequence[str], chunks: Sequence[tuple[int, int, int]], shm_name: str,
                slot: int, strategy: str, conn: Connection | Channel, warmed: Sequence[int] | None = None) -> None:
    """Serve chunk indices from ``conn`` until it sends None; answer each with a report.

    ``warmed``: indices of the chunks this warm faults (default: all); reads stay inside them.

    Reports: ("done", index) or ("error", index, WarmpoolError); after the None, ("finished",)
    once ``finish`` is done.
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
    warmer = _ChunkWarmer(strategy, counter, Guards(to_warm), paths)
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
        warmer.finish()  # the coordinator sends None once every chunk is done
        conn.send(("finished",))  # it waits for this, so the warm's time includes finish
    except (EOFError, BrokenPipeError):
        pass  # the coordinator went away: nothing left to report to
    finally:
        counter.close()
        for fd in fds:
            os.close(fd)


def _refuse(conn: Connection | Channel, error: WarmpoolError) -> None:
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
    conn = Channel(fd)
    try:
        paths, chunks, shm_name, slot, strategy, warmed, priority = conn.recv()
    except EOFError:
        return
    if priority == "idle":
        # Before any thread starts: the fault threads inherit the policy (it is per thread).
        _platform.lower_priority()
    worker_main(paths, chunks, shm_name, slot, strategy, conn, warmed)
    # The coordinator waits for this process to end before the warm returns, and nothing is
    # left here that the kernel's exit does not release (the files, the channel and the
    # segment's mapping are closed; stdout is /dev/null): skip the interpreter's teardown, which
    # every warm waited for (docs/bench/warm_speed_phases.md, "Exit").
    os._exit(0)
