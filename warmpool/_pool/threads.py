"""The fault threads of one worker: a few threads that live as long as the worker and fault the
blocks of every chunk it holds, one block per thread at a time.

Why threads: under MADV_RANDOM a fault reads only its own block and waits for it, so one thread
keeps a single read in flight; the device needs several (docs/folios.md).  madvise and pwritev
release the GIL while they fault.

Why they outlive a chunk: the worker holds the next chunk before the current one is done (the
coordinator hands out ``_pool.LOOKAHEAD`` chunks per worker), and its blocks queue behind the
current chunk's, so a thread that finds no block left in one chunk takes one of the next
instead of waiting for the slowest block, the report and the next chunk's set-up.  Threads
started and stopped per chunk cost that wait and a thread start at every chunk edge
(docs/performance.md, "Pool size and start-up").
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["FaultThreads"]


class _Batch:
    """One chunk's blocks: ``left`` still to fault, the first error, what to call at the end."""

    __slots__ = ("error", "left", "on_done", "target")

    def __init__(self, target: Any, n: int, on_done: Callable[[BaseException | None], None]) -> None:
        self.target, self.left, self.on_done, self.error = target, n, on_done, None


class FaultThreads:
    """``n`` threads applying ``fault(target, rel, length)`` to the spans handed to ``submit``.

    ``progress(length)`` is called, under the pool's lock, after each span that faulted.  When
    every span of a batch has been tried, its ``on_done(first error or None)`` runs in the thread
    that finished the last one; after a span fails, the batch's other spans are dropped."""

    def __init__(self, n: int, fault: Callable[[Any, int, int], None], progress: Callable[[int], None]) -> None:
        self.n, self.fault, self.progress = n, fault, progress
        self.cond = threading.Condition()
        self.todo: deque[tuple[_Batch, int, int]] = deque()
        self.open_batches = 0
        self.threads: list[threading.Thread] = []

    def submit(self, target: Any, spans: list[tuple[int, int]], on_done: Callable[[BaseException | None], None]) -> None:
        """Queue the (rel, length) spans of one chunk behind those already queued."""
        if not spans:
            on_done(None)
            return
        batch = _Batch(target, len(spans), on_done)
        with self.cond:
            self.open_batches += 1
            self.todo.extend((batch, rel, n) for rel, n in spans)
            self.cond.notify_all()
        while len(self.threads) < self.n:
            thread = threading.Thread(target=self._work, daemon=True, name=f"fault-{len(self.threads)}")
            thread.start()
            self.threads.append(thread)

    def drain(self) -> None:
        """Wait until every submitted batch is done (its ``on_done`` has returned)."""
        with self.cond:
            self.cond.wait_for(lambda: self.open_batches == 0)

    def _work(self) -> None:
        # Daemon threads: the worker leaves through os._exit once its work is reported, so
        # nothing joins them (a thread blocked here holds no resource the kernel does not free).
        while True:
            with self.cond:
                self.cond.wait_for(lambda: bool(self.todo))
                batch, rel, n = self.todo.popleft()
            error = None
            if batch.error is None:
                try:
                    self.fault(batch.target, rel, n)
                except BaseException as e:  # noqa: BLE001 - handed to the batch's on_done
                    error = e
            with self.cond:
                if error is None and batch.error is None:
                    self.progress(n)
                elif batch.error is None:
                    batch.error = error
                batch.left -= 1
                last = batch.left == 0
            if last:
                try:
                    batch.on_done(batch.error)
                finally:
                    with self.cond:
                        self.open_batches -= 1
                        self.cond.notify_all()
