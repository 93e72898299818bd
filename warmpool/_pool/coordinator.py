"""The coordinator: hand chunks, in plan order, to a pool of worker processes.

Why processes: a fault-in loop holds the GIL between syscalls, and MADV_POPULATE_READ /
pread block a whole thread; separate processes fault concurrently and keep the caller (an
engine's start-up thread) responsive.

Launch: workers are forks of one ``python -I -S`` started with ``subprocess`` and the caller's
``sys.path`` (``forkserver``), not ``multiprocessing`` processes.  Forking the caller copies
whatever threads it has (an engine has many; a child can deadlock on a lock held by a thread
that no longer exists), and ``spawn``/``forkserver`` re-run the caller's ``__main__`` script in
every child (multiprocessing's main-module fixup): an engine script without a ``__main__`` guard
would start again in each worker.  The fork server is a fresh, isolated interpreter without
``site``, imports only the stdlib and ``warmpool._pool.worker``, and runs in its own session
(and so do its workers), so the terminal's Ctrl-C goes to the coordinator alone, which then
stops the workers itself.

Each worker has its own socket pair (``_wire.Channel``, framed like ``multiprocessing``'s);
a worker that dies without a word (SIGKILL, the OOM killer, SIGBUS from a truncated file
under ``touch``) closes its end, so the coordinator sees EOF at once and names the chunk it
held, rather than hanging the way ``multiprocessing.Pool`` does (docs/design.md, "Worker
processes").  The coordinator is the only writer of chunk states in the progress segment; each
worker writes only its own byte counter.

Worker count: ``workers=None`` grows the pool while it pays.  It starts with
``AUTO_START`` workers (``AUTO_START_IDLE`` at priority idle) and doubles, up to
``AUTO_MAX``, each time a measurement window shows the throughput still rising by ``AUTO_GAIN`` while ``AUTO_MIN_REST_S`` of work is left at
that rate, and undoes the last doubling when it did not pay
(the extra workers stop after their chunk): on a local disk one reader already saturates the
device and the pool stays small; on latency-bound storage (network block devices, NFS, FUSE)
throughput keeps rising with concurrency and the pool grows (docs/design.md; figures:
docs/performance.md, "Pool size and start-up").
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .._errors import CancelledError, FileChangedError, WarmError, WorkerDiedError
from .._plan import Chunk
from .._progress.segment import ProgressSegment
from . import forkserver
from .forkserver import Forked, ForkServer
from .strategy import check_priority, check_strategy
from .wire import Channel, wait

__all__ = ["AUTO_MAX", "AUTO_START", "PoolResult", "run_pool"]

# The pool's size (measurements: docs/performance.md, "Pool size and start-up").  A worker costs
# an interpreter's start-up and a few MB, and one worker already keeps many requests in flight,
# so the pool grows only while that pays.  It starts with two per CPU (at most 4): each worker
# also reads every page once with the CPU, so a warm waits on the CPUs, and workers started
# mid-warm start on CPUs already busy.  Past 16 the CLI and its workers outgrow a 200 MB bound.
_CPUS = os.cpu_count() or 1
AUTO_START, AUTO_MAX = max(1, min(2 * _CPUS, 4)), 16
# At priority "idle" the warm runs beside a loading engine: one per CPU there, chosen when each
# worker was an interpreter that started at normal priority (now the fork server alone is; the
# choice was not measured again with forks).
AUTO_START_IDLE = max(1, min(_CPUS, 4))
AUTO_GAIN = 1.15  # grow again only while a doubling bought at least 15% more throughput
# Grow only while the rest of the warm, at the rate measured, would take at least this long: a
# doubling is judged one window later (>= AUTO_WINDOW_S) and costs the new workers' start-up
# meanwhile, so near the end it cannot pay.  Once the workers outnumber the CPUs the bar rises in
# proportion (``_Growth.rest_needed``): each start-up then takes CPU from the workers faulting.
AUTO_MIN_REST_S = 0.5
# A measurement window spans at least 64 MiB and 16 MiB (one default chunk) per worker, and at
# least 0.25 s: 64 MiB alone passes in tens of ms, mostly scheduling noise on a busy machine.
AUTO_WINDOW, AUTO_WINDOW_PER_WORKER, AUTO_WINDOW_S = 64 * 1024 * 1024, 16 * 1024 * 1024, 0.25
POLL = 0.1  # seconds between checks of the stop flag: Ctrl-C/cancel answer well within 2 s
# Chunks a worker holds at once: the one its fault threads work on, and the next, which it sets
# up meanwhile and whose blocks its threads take as soon as the current chunk has none left
# (``threads``).  With one, every chunk ended with threads waiting for the slowest block and
# for the round trip.
LOOKAHEAD = 2
# A worker takes consecutive chunks that touch in the file as one run of up to this many bytes,
# in order, so its faults stream through the run (``worker._ChunkWarmer._stream``): the
# kernel's readahead windows reach a chunk or more ahead, and workers taking alternate 16 MiB
# chunks met in each other's windows (1.9 s for 6.9 GB against 1.6 s in runs of 64 MiB;
# docs/performance.md, "Streaming the inside of an extent").  Near the end of a warm the runs
# shrink to a fair share of what is left, so that no worker waits while another holds a run.
RUN_BYTES = 64 * 1024 * 1024


class PoolResult(NamedTuple):
    workers: int  # most workers that ran at once


class _Worker(NamedTuple):
    process: Forked
    conn: Channel
    slot: int


def _launch(server: ForkServer, slot: int, job: tuple) -> _Worker:
    """Fork one worker from ``server`` and send it its job (files, chunk table, segment, slot,
    strategy, the indices of the chunks this warm will fault, its CPU priority)."""
    ours, theirs = _socketpair()
    try:
        process = server.fork(theirs)
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the server died (killed, out of memory)
        os.close(ours)
        raise WarmError("cannot start a worker process: the fork server is gone") from None
    except OSError as e:  # the fork was refused (memory, process limit)
        os.close(ours)
        raise WarmError(f"cannot start a worker process: {e.strerror or e}") from None
    except BaseException:
        os.close(ours)
        raise
    finally:
        os.close(theirs)
    worker = _Worker(process, Channel(ours), slot)
    try:
        worker.conn.send((*job[:3], slot, *job[3:]))
    except OSError:
        # It died at once (killed, out of memory).  It is in the pool all the same: the first
        # chunk handed to it fails to send or reads EOF, which reaps it and names the chunk,
        # and shutdown() reaps it in any case.
        pass
    return worker


def _start_server(name: str, shared_fds: tuple[int, ...]) -> ForkServer:
    if not shared_fds:  # a prestarted server has no fd of this segment to pass on
        server = forkserver.take_prestarted()
        if server is not None:
            return server
    try:
        return ForkServer(name, shared_fds)
    except OSError as e:  # fork or exec refused (memory, process limit): nothing started, nothing leaked
        raise WarmError(f"cannot start a worker process: {e.strerror or e}") from None


def _socketpair() -> tuple[int, int]:
    import socket

    a, b = socket.socketpair()
    return a.detach(), b.detach()


class _Growth:
    """Decides when to add workers: while throughput keeps rising (see module doc)."""

    def __init__(self, fixed: int | None, n_chunks: int, total_bytes: int, start: int = AUTO_START) -> None:
        self.limit = min(fixed or AUTO_MAX, max(n_chunks, 1))
        self.target = self.limit if fixed else min(start, self.limit)
        self.growing = fixed is None and self.target < self.limit
        self.total_bytes = total_bytes
        self.mark_bytes, self.mark_time, self.last_rate = 0, None, 0.0

    def rest_needed(self) -> float:
        """Seconds of work that must be left for the next doubling: ``AUTO_MIN_REST_S``, times
        the workers per CPU once they outnumber the CPUs."""
        return AUTO_MIN_REST_S * max(1.0, self.target / _CPUS)

    def update(self, done_bytes: int, now: float | None = None) -> None:
        if not self.growing:
            return
        now = time.monotonic() if now is None else now
        if self.mark_time is None:
            # The first window opens when the first chunk is done, not when the pool starts:
            # measured from the start it included the workers' start-up, so the first rate
            # came out low and the first doubling always looked like a gain.
            self.mark_bytes, self.mark_time = done_bytes, now
            return
        window = max(AUTO_WINDOW, AUTO_WINDOW_PER_WORKER * self.target)
        if done_bytes - self.mark_bytes < window or now - self.mark_time < AUTO_WINDOW_S:
            return
        rate = (done_bytes - self.mark_bytes) / (now - self.mark_time)
        if self.last_rate and rate < self.last_rate * AUTO_GAIN:
            # The last doubling did not pay: go back to the half.  Extra workers that do not add
            # throughput cost time, not only CPU (their reads compete with the others').
            self.growing = False
            self.target = max(self.target // 2, 1)
        elif (self.total_bytes - done_bytes) / rate < self.rest_needed():
            self.growing = False  # too little left for a doubling to pay (AUTO_MIN_REST_S)
        else:
            self.target = min(self.target * 2, self.limit)
            self.growing = self.target < self.limit
        self.mark_bytes, self.mark_time, self.last_rate = done_bytes, now, rate


class _Coordinator:
    def __init__(self, paths, chunks, order, strategy, segment, workers, should_stop, priority="normal") -> None:
        self.paths = list(paths)
        self.chunks = [(c.file, c.offset, c.length) for c in chunks]
        self.plan_chunks = chunks
        self.order = tuple(order)
        self.queue = list(reversed(order))  # pop() from the end = plan order
        self.strategy, self.segment, self.should_stop = strategy, segment, should_stop
        self.priority = priority
        self.growth = _Growth(workers, len(order), sum(self.chunks[i][2] for i in order),
                              AUTO_START if priority == "normal" else AUTO_START_IDLE)
        self.workers: list[_Worker] = []
        self.server: ForkServer | None = None  # started with the first worker
        self.retired: set[int] = set()  # slots told to stop: the pool shrank back, or every chunk is done
        self.busy: dict[int, list[int]] = {}  # slot -> the chunks it holds, in the order handed out
        self.runs: dict[int, list[int]] = {}  # slot -> the rest of its run, not handed out yet
        self.completed_bytes = 0
        self.peak = 0

    def _start_worker(self) -> None:
        # The chunks to be warmed travel with the job: a worker keeps fault readahead out of the
        # rest (over the budget, or already resident), see _worker.Guards.
        job = (self.paths, self.chunks, self.segment.name, self.strategy, self.order, self.priority)
        if self.server is None:
            self.server = _start_server(self.segment.name, self.segment.shared_fds)
        self.workers.append(_launch(self.server, len(self.workers), job))
        self.peak = max(self.peak, len(self.workers))
        self._dispatch(self.workers[-1])

    def _take_run(self) -> list[int]:
        """The next chunks in plan order that follow one another in a file, up to RUN_BYTES and
        to a fair share of the queue among the workers wanted."""
        share = max(1, len(self.queue) // max(self.growth.target, 1))
        run = [self.queue.pop()]
        size = self.chunks[run[0]][2]
        while self.queue and len(run) < share:
            file, offset, length = self.chunks[run[-1]]
            nxt = self.chunks[self.queue[-1]]
            if nxt[0] != file or nxt[1] != offset + length or size + nxt[2] > RUN_BYTES:
                break
            run.append(self.queue.pop())
            size += nxt[2]
        return run

    def _dispatch(self, worker: _Worker) -> None:
        held = self.busy.setdefault(worker.slot, [])
        run = self.runs.setdefault(worker.slot, [])
        while (run or self.queue) and len(held) < LOOKAHEAD:
            if not run:
                run += self._take_run()
            index = run.pop(0)
            held.append(index)
            self.segment.set_chunk_state(index, "running")  # handed to a worker
            try:
                worker.conn.send(index)
            except OSError:  # it died after its last report: a death, like EOF on receive
                self._on_death(worker)
        if not held:
            del self.busy[worker.slot]

    def _describe(self, index: int) -> str:
        c = self.plan_chunks[index]
        return f"chunk {index} (bytes {c.offset}..{c.offset + c.length}, layers {c.layer_lo}..{c.layer_hi})"

    def _on_report(self, worker: _Worker) -> None:
        try:
            report = worker.conn.recv()
        except (EOFError, OSError):  # the worker died: its end of the socket closed
            self._on_death(worker)
        index = report[1]
        held = self.busy[worker.slot]
        held.remove(index)
        if report[0] == "error":
            self.segment.set_chunk_state(index, "failed")
            raise report[2]
        self.completed_bytes += self.chunks[index][2]
        self.segment.set_chunk_state(index, "done")
        self.growth.update(self.completed_bytes)
        if worker.slot not in self.retired and len(self.workers) - len(self.retired) > self.growth.target:
            self._retire(worker)  # the pool shrank back: this one stops after what it holds
        if worker.slot not in self.retired:
            self._dispatch(worker)
        elif not held:
            del self.busy[worker.slot]  # retired, and every chunk it held is done (shutdown reaps it)

    def _retire(self, worker: _Worker) -> None:
        """Tell ``worker`` to stop after the chunks it holds; the rest of its run goes back to the
        head of the queue."""
        self.retired.add(worker.slot)
        self.queue += reversed(self.runs.pop(worker.slot, []))
        try:
            worker.conn.send(None)
        except OSError:
            pass

    def _on_death(self, worker: _Worker) -> None:
        try:
            code = worker.process.wait(timeout=2)
        except subprocess.TimeoutExpired:  # closed its socket but lives on: stop it
            worker.process.kill()
            code = worker.process.wait()
        held = self.busy.get(worker.slot) or []
        # Its fault threads may have been in either chunk it held: name each.
        where = " or ".join(self._describe(i) for i in held) or "no chunk"
        for i in held:
            self.segment.set_chunk_state(i, "failed")
        index = held[0] if held else None
        path = self.paths[self.chunks[index][0]] if index is not None else None
        if code == -signal.SIGBUS:
            raise FileChangedError(f"file shrank under the mapping: SIGBUS in worker {worker.slot} on {where}", path)
        how = (f"killed by signal {-code}" if code < 0 else f"exit status {code}") if code is not None else "how unknown"
        raise WorkerDiedError(f"worker {worker.slot} (pid {worker.process.pid}) died, {how}, on {where}", path)

    def run(self) -> PoolResult:
        while self.queue or self.busy:
            while len(self.workers) < self.growth.target and self.queue:
                self._start_worker()
            if self.should_stop():
                cancelled = CancelledError("warm cancelled")
                # How many ran and what they finished, for a caller that goes on (``_api``).
                cancelled.workers, cancelled.completed_bytes = self.peak, self.completed_bytes
                raise cancelled
            live = [w for w in self.workers if w.slot in self.busy]
            ready = set(wait([w.conn for w in live], POLL))
            for worker in live:
                if worker.conn in ready:  # a report, or EOF when the worker died
                    self._on_report(worker)
        self._finish()
        return PoolResult(self.peak)

    def _finish(self) -> None:
        """Every chunk is done: tell the workers, and wait while each runs its ``finish`` (a
        last pass over what it read, part of the warm: ``_worker._ChunkWarmer.finish``).  A
        worker that dies there fails nothing, and a stop asked for now ends the wait (shutdown
        stops them): every chunk was reported done."""
        waiting = []
        for w in self.workers:
            if w.slot not in self.retired:
                self.retired.add(w.slot)  # told: shutdown does not tell it again
                try:
                    w.conn.send(None)
                    waiting.append(w)
                except OSError:
                    pass
        while waiting and not self.should_stop():
            for conn in wait([w.conn for w in waiting], POLL):
                try:
                    conn.recv()  # ("finished",)
                except (EOFError, OSError):
                    pass
                waiting = [w for w in waiting if w.conn is not conn]

    def shutdown(self) -> None:
        """Stop every worker, politely if it is idle, by force otherwise; never leave one."""
        for w in self.workers:
            if w.slot in self.retired:
                continue  # told already
            try:
                w.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 1.0
        for w in self.workers:
            if w.slot in self.busy:
                w.process.kill()
            try:
                w.process.wait(max(deadline - time.monotonic(), 0.05))
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()
            w.conn.close()
            w.process.close()
        if self.server is not None:
            self.server.close()


def stop_callable(should_stop) -> Callable[[], bool]:
    """``should_stop`` (None, a callable or a threading.Event) as a callable."""
    return should_stop.is_set if hasattr(should_stop, "is_set") else (should_stop or (lambda: False))


def run_pool(paths: Sequence[str], chunks: Sequence[Chunk], order: Sequence[int], strategy: str,
             segment: ProgressSegment, workers: int | None = None,
             should_stop: Callable[[], bool] | threading.Event | None = None, priority: str = "normal") -> PoolResult:
    """Warm ``chunks[i]`` for i in ``order`` (plan order); raise WarmError on any failure.
    ``priority`` (``PRIORITIES``): the workers' CPU priority."""
    if workers is not None and workers < 1:
        raise WarmError(f"workers must be at least 1, got {workers}")
    check_strategy(strategy, allow_auto=False)  # a worker would otherwise fall through to its last branch
    check_priority(priority)
    stop = stop_callable(should_stop)
    coordinator = _Coordinator(paths, chunks, order, strategy, segment, workers, stop, priority)
    try:
        return coordinator.run()
    finally:
        coordinator.shutdown()
