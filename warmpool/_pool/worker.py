"""What one worker process does: fault the pages of the chunks it is handed into the cache.

A worker opens each model file read-only once, and for each chunk maps it, skips the pages
already resident (cachestat, then mincore), faults the rest in with the chosen strategy, adds its
progress to its own slot of the shared-memory segment every ``STEP`` bytes, and unmaps the chunk
again: no mapping or buffer outlives a chunk except the one pread buffer it reuses.  In the
default huge-folio path this thread streams the inside of each extent (``_ChunkWarmer._stream``)
and its fault threads (``threads``) fault the blocks at the extent's edges, while this thread
goes on with the next chunk the coordinator handed out (``coordinator.LOOKAHEAD``).  Once every
chunk of the warm is done, it reads once more the pages it found resident in the chunks it
warmed (``reread``).

Kept to the standard library plus ``_platform``/``warmpool._progress`` so that a worker started
with ``python -I -S`` costs a few MB of private memory and tens of milliseconds of imports.
"""

from __future__ import annotations

import bisect
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .. import _platform
from .._errors import FileChangedError, WarmpoolError
from .._plan import contiguous_runs
from .._progress.segment import WorkerCounter
from .reread import Marks, reread
from .strategy import STRATEGIES  # re-exported: the names _ChunkWarmer implements
from .threads import FaultThreads
from .wire import Channel

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
    The inside of a long extent (``interior``) is read without MADV_RANDOM, as a stream whose
    readahead runs ahead of it, and the margins it keeps from the edges bound where that
    readahead can reach.

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

    def interior(self, file: int, offset: int, length: int, ra: int, huge: int) -> tuple[int, int] | None:
        """The part of [offset, offset + length) that may be streamed (see ``_ChunkWarmer``):
        far enough inside its extent that no fault readahead from it crosses the extent's
        edges, whole blocks only; None where there is none.  A fault under MADV_HUGEPAGE alone
        reads from its block's aligned start, and its readahead windows reach at most ``2 * ra``
        past the page faulted (one window, and the one its last folio's mark starts)."""
        start, end = self.extent(file, offset)
        lo = -(-(start + max(ra, huge)) // huge) * huge
        hi = end - 2 * ra - huge
        hi -= hi % huge
        lo, hi = max(lo, offset), min(hi, offset + length)
        return (lo, hi) if lo < hi else None

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
        self.lock = threading.Lock()  # the counter and the marks, shared with the fault threads
        self.counter = counter
        self.guards = guards
        self.buffer = bytearray(STEP) if strategy == "read" else None
        self.page = _platform.PAGE_SIZE
        self.huge = _platform.huge_folio_size() if strategy in ("populate", "touch") else None
        self.threads: FaultThreads | None = None
        self.marks = Marks(paths, self.huge) if self.huge else None
        self.hidden: set[int] = set()  # files whose mincore vector is made up: trust none of it
        self.warmed: list[tuple[int, int, int]] = []  # (fd, offset, length): what ``finish`` reads again
        self.streamed = 0  # bytes ``_stream`` read

    def warm(self, fd: int, file: int, offset: int, length: int,
             on_done: Callable[[BaseException | None], None]) -> None:
        """Warm [offset, offset+length); resident pages count as done at once.  ``on_done(None)``
        runs once it is warm: here, or in a fault thread once its blocks are faulted (then with
        the first error instead, if one failed).  Errors before any block is queued raise."""
        window = _platform.FileWindow(fd, offset, length)
        try:
            span = self._advise_huge(fd, file, window)
            lo, hi = span or (length, length)
            # A stream reads every page of [lo, hi), resident or not (a resident page costs a
            # mapping, no read), so residency is looked up only outside it.  cachestat first:
            # a cold chunk costs one call instead of a page-cache lookup per page; it also
            # counts reads in flight, so where it sees any, mincore tells which have arrived.
            cold = (file in self.hidden or lo == 0 and hi == length
                    or _platform.cached_bytes(fd, offset, length) == 0)
            vector = bytes(-(-length // self.page)) if cold else window.resident(skip=(lo, hi))
            runs = [(s * self.page, min(e * self.page, length)) for s, e in _platform.page_runs(vector, 0)]
            self._add(length - sum(end - start for start, end in runs))
            if runs and self.strategy in ("populate", "touch"):
                # Every page of ``runs`` is read by this worker's own pass right after its fault;
                # the pages found resident here are the ones no CPU of this warm may have read
                # (see ``reread``), so only they are read again at the end.
                self.warmed += [(fd, offset + s * self.page, min(e * self.page, length) - s * self.page)
                                for s, e in _platform.page_runs(vector, 1)]
            if runs and span is not None:
                self._stream(window, [(max(a, lo), min(b, hi)) for a, b in runs if max(a, lo) < min(b, hi)])
                rest = [(a, b) for start, end in runs for a, b in ((start, min(end, lo)), (max(start, hi), end)) if a < b]
                self._queue_blocks(fd, window, file, rest, on_done)
                window = None  # the fault threads close it once its blocks are done
                return
            if runs:
                hint_runs = self._hint_edges(fd, file, offset, length)
                for start, end in runs:
                    self._warm_run(fd, window, start, end, hint_runs)
        finally:
            if window is not None:
                window.close()
        on_done(None)

    def _add(self, n: int) -> None:
        with self.lock:
            self.counter.add(n)

    def _advise_huge(self, fd: int, file: int, window: _platform.FileWindow) -> tuple[int, int] | None:
        """Advise the window for the huge-folio path (see Guards) and return the part of it to
        stream, relative (empty where none); None where this strategy, kernel or device does
        not take that path (then nothing was changed).  The streamed part carries
        MADV_HUGEPAGE alone, the rest MADV_RANDOM too, and the unaligned edges of an extent
        neither."""
        if self.strategy not in ("populate", "touch") or not self.huge:
            return None
        ra = _platform.readahead_size(fd)
        if ra < FAULT_READAHEAD_MIN or not window.advise(0, window.length, "hugepage"):
            return None  # small readahead, or no transparent huge pages: nothing changed
        offset = window.offset
        inner = self.guards.interior(file, offset, window.length, ra, self.huge)
        lo, hi = (inner[0] - offset, inner[1] - offset) if inner else (window.length, window.length)
        if not all(window.advise(a, b - a, "random") for a, b in ((0, lo), (hi, window.length)) if a < b):
            window.advise(0, window.length, "nohugepage")
            return None
        for a, b, whole in self.guards.parts(file, offset, window.length, self.huge):
            if not whole:
                window.advise(a - offset, b - a, "nohugepage")
        return lo, hi

    def _queue_blocks(self, fd: int, window: _platform.FileWindow, file: int, runs: list[tuple[int, int]],
                      on_done: Callable[[BaseException | None], None]) -> None:
        """Queue the runs' faults in PMD-size folios, exactly (see Guards), on the fault threads;
        they close the window once its blocks are done."""
        offset, blocks, whole_blocks = window.offset, [], []
        for start, end in runs:
            for lo, hi, whole in self.guards.parts(file, offset + start, end - start, self.huge):
                if whole:  # one task per block: the threads keep several block reads in flight
                    starts = [lo, *range(lo - lo % self.huge + self.huge, hi, self.huge)]
                    blocks += [(p, min(p - p % self.huge + self.huge, hi)) for p in starts]
                    whole_blocks += [p - p % self.huge for p in starts]
                else:
                    _platform.prefetch(fd, lo, hi - lo)
                    blocks.append((lo, hi))
        extent_end, ra = self.guards.extent(file, offset)[1], _platform.readahead_size(fd)

        def done(error: BaseException | None) -> None:
            try:
                if error is None and self.marks and file not in self.hidden:  # hidden: "cached" would lie
                    with self.lock:
                        self.marks.add(file, whole_blocks, extent_end, ra)
            finally:
                window.close()
                on_done(error)

        if self.threads is None:
            strategy = self.strategy
            self.threads = FaultThreads(FAULT_THREADS, lambda w, rel, n: _fault(w, rel, n, strategy, w.fd, None),
                                        self._add)
        self.threads.submit(window, [(lo - offset, hi - lo) for lo, hi in blocks], done)

    def _stream(self, window: _platform.FileWindow, runs: list[tuple[int, int]]) -> None:
        """Fault ``runs`` (relative, inside the window's interior) in order from this thread,
        reading one byte of each page as it arrives: under MADV_HUGEPAGE alone each fault that
        misses reads its aligned block and starts readahead, whose windows then stay ahead of
        the reads, so one thread keeps the device busy with large requests, as ``vmtouch -t``
        does, at a fraction of the CPU that faulting block by block from several threads and
        reading the pages again through pwritev costs (docs/performance.md, "Streaming the
        inside of an extent").  One STEP at a time, so the fault threads get the GIL between."""
        for start, end in runs:
            for step in range(start, end, STEP):
                n = min(STEP, end - step)
                window.touch(step, n)
                self._add(n)
                self.streamed += n

    def drain(self) -> None:
        """Wait until the fault threads have finished every chunk handed to them."""
        if self.threads is not None:
            self.threads.drain()

    def finish(self) -> None:
        """Once every chunk of the warm is done (``reread``)."""
        self.drain()
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
            self._add(n)


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


def _open_files(paths: Sequence[str]) -> list[int]:
    return [_platform.open_model(path, FileChangedError, "cannot reopen for warming") for path in paths]


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
    reports = _Reports(conn, paths)
    try:
        # The coordinator hands out up to _pool.LOOKAHEAD chunks before their reports: the next
        # one is set up here while the fault threads still fault this one.
        while (index := conn.recv()) is not None and not reports.failed:
            file, offset, length = chunks[index]
            done = reports.on_done(index, file)
            try:
                warmer.warm(fds[file], file, offset, length, done)
            except WarmpoolError as e:
                done(e)
                return
        if not reports.failed:
            warmer.finish()  # the coordinator sends None once every chunk is done
            reports.send(("finished",))  # it waits for this, so the warm's time includes finish
    except (EOFError, BrokenPipeError):
        pass  # the coordinator went away: nothing left to report to
    finally:
        warmer.drain()  # no fault thread may touch the counter's mapping after it is closed
        counter.close()
        for fd in fds:
            os.close(fd)


class _Reports:
    """Reports to the coordinator, from the worker's thread or a fault thread (one at a time).

    A chunk's blocks queue behind the previous chunk's, so a chunk can be done before the one
    handed out before it; its "done" waits for that one's, so that a worker's chunks turn done
    in plan order and so do the layers they hold (``ProgressView.layer_ready``)."""

    def __init__(self, conn: Connection | Channel, paths: Sequence[str]) -> None:
        self.conn, self.paths = conn, paths
        self.lock = threading.Lock()
        self.failed = False
        self.held: deque[int] = deque()  # chunks received and not yet reported, in order
        self.done: set[int] = set()  # those of them that are done

    def send(self, message: tuple) -> None:
        with self.lock:
            self._send(message)

    def _send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except OSError:
            pass  # the coordinator went away: the worker's thread sees the end of file

    def on_done(self, index: int, file: int) -> Callable[[BaseException | None], None]:
        """What to call once chunk ``index`` is warm (None) or failed (the error)."""
        with self.lock:
            self.held.append(index)

        def done(error: BaseException | None) -> None:
            if error is None:
                with self.lock:
                    self.done.add(index)
                    while self.held and self.held[0] in self.done:
                        self.done.remove(first := self.held.popleft())
                        self._send(("done", first))
            elif isinstance(error, WarmpoolError):
                error.path = error.path or self.paths[file]
                self.failed = True
                self.send(("error", index, error))
            else:  # a bug: end as an uncaught exception would; the coordinator names the chunks held
                import traceback

                traceback.print_exception(error)
                os._exit(1)
        return done


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
    """Entry point of ``python -I -S -c ...`` (see ``coordinator``): read the job, then work."""
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
    # every warm waited for (docs/performance.md, "Pool size and start-up").
    os._exit(0)
