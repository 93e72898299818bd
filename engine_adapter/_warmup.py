"""A warm that runs beside an engine's start-up: one coordinating thread, worker processes.

The thread calls :func:`warmpool.warm` (layout walk, plan, policy, pool) and only waits on
its workers' sockets, so it holds the GIL for a few milliseconds per chunk; the I/O happens
in the worker processes.  The engine keeps loading and asks, layer by layer, whether the
pages it is about to use are resident (the progress segment's chunk states: a few memory
loads per call, no syscalls).

Never a hang, never a surprise exception: every way the warm can end (done, a policy
skip, nothing to do, a failure, a cancel) ends the thread and wakes every waiter; a
failure is kept in :attr:`Warmup.error` and only raised from :meth:`Warmup.wait` when the
caller asked for it (``raise_errors=True``).  Nothing outlives the warm: ``warmpool.warm``
stops its workers and unlinks the segment on every way out, and an ``atexit`` hook cancels
warms still running when the interpreter exits (a daemon thread is otherwise frozen
mid-warm at shutdown, before its ``finally`` could unlink).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, NamedTuple

import warmpool
from warmpool import CancelledError, ProfileError, ProgressError, WarmError, WarmpoolError

if TYPE_CHECKING:  # pragma: no cover
    # Names of the warm machinery: imported by the thread that warms, not by ``import
    # engine_adapter``, so that the engine's own load starts without waiting for them.
    from warmpool import EngineWatch, ProgressView, WarmResult

logger = logging.getLogger("engine_adapter")

__all__ = ["Warmup", "WarmupProgress", "start_warmup"]

LAYER_POLL = 0.001  # s: readiness is a few memory loads; the protocol suggests 1 ms for engines
CANCEL_TIMEOUT = 5.0  # s: the pool answers a stop within ~0.1 s and kills busy workers in ~1 s

_live: weakref.WeakSet[Warmup] = weakref.WeakSet()


class WarmupProgress(NamedTuple):
    done_bytes: int  # bytes of the warm found resident or faulted in so far
    total_bytes: int  # bytes the warm covers; 0 while it is still being planned
    state: str  # starting, running, done, failed, cancelled or skipped

    @property
    def finished(self) -> bool:
        return self.state not in ("starting", "running")

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else float(self.finished)


class Warmup:
    """Handle on a background warm; see :func:`start_warmup`.

    ``shm_name`` is the progress segment's name (``/warmpool-<pid>-<hex>``) for readers in
    other processes; it is None until the segment exists (:meth:`wait_started`), and stays
    None for a warm that never needed one (policy skip, everything already resident, an
    error before the pool started).  ``result`` and ``error`` are None until the warm ends.
    """

    def __init__(self, model: str | os.PathLike[str], selection: dict, workers: int | None, strategy: str,
                 raise_errors: bool, warm_kwargs: dict, priority: str = "idle",
                 profile: str | os.PathLike[str] | None = None) -> None:
        self.model = os.fspath(model)
        self.shm_name: str | None = None
        self.result: WarmResult | None = None
        self.error: WarmpoolError | None = None
        self.n_layers: int | None = None  # block count, once the layout is read
        self.profile = os.fspath(profile) if profile is not None else None
        self.profile_error: ProfileError | None = None  # why the profile was ignored, if it was
        self._selection, self._workers, self._strategy = selection, workers, strategy
        self._priority = priority
        self._raise_errors, self._warm_kwargs = raise_errors, warm_kwargs
        self._view: ProgressView | None = None
        self._stop = threading.Event()
        self._started = threading.Event()  # the segment exists, or the warm ended without one
        self._finished = threading.Event()
        self._cancel_requested = False
        self._thread = threading.Thread(target=self._run, name=f"warmpool-warmup {self.model}", daemon=True)

    # --- the coordinating thread -------------------------------------------------------------

    def _start(self) -> Warmup:
        _live.add(self)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            if self._stop.is_set():  # cancelled before the thread got going
                raise CancelledError("warm cancelled before it started", self.model)
            watch = self._watch_engine()
            if self._stop.is_set():
                raise CancelledError("warm cancelled while it watched the engine", self.model)
            chunk_size = self._warm_kwargs.get("chunk_size", warmpool.DEFAULT_CHUNK_SIZE)
            plan = self._plan(chunk_size)
            self.n_layers = plan.n_layers
            self.result = warmpool.warm(self.model, plan=plan, workers=self._workers, strategy=self._strategy,
                                        priority=self._priority, on_start=self._on_start, should_stop=self._stop,
                                        engine_watch=watch, **self._warm_kwargs)
        except WarmpoolError as e:
            self.error = e
        except Exception as e:  # a bug must still not escape into the engine's thread
            self.error = WarmError(f"unexpected {type(e).__name__}: {e}", self.model)
            self.error.__cause__ = e
        finally:
            self._finished.set()
            self._started.set()
            _live.discard(self)

    def _watch_engine(self) -> EngineWatch | None:
        """An engine loading in this process (``engine_pid`` is ours) shares the interpreter's
        lock with this thread: watch its reads first, plan only after (``warmpool.watch_engine``:
        beside a sweep at device speed, once it has ended), so that the plan's ~20 ms of Python
        does not run between the engine's own Python steps."""
        pid = self._warm_kwargs.get("engine_pid")
        if not self._warm_kwargs.get("beside_engine") or pid != os.getpid():
            return None
        return warmpool.watch_engine(pid, should_stop=self._stop.is_set)

    def _plan(self, chunk_size: int):
        if self.profile is not None:
            try:
                return warmpool.plan_model(self.model, chunk_size=chunk_size, profile=self.profile, **self._selection)
            except ProfileError as e:
                # A stale or foreign profile only costs the order: warm in layer order rather
                # than fail beside an engine that is starting.
                self.profile_error = e
                logger.warning("ignoring the expert profile, warming in layer order: %s", e)
        return warmpool.plan_model(self.model, chunk_size=chunk_size, **self._selection)

    def _on_start(self, name: str) -> None:
        # Attach before warm() can unlink: the mapping outlives the name, so progress() and
        # layer_ready() keep answering with the final values after the warm has ended.
        self._view = warmpool.ProgressView.attach(name)
        # An unnamed segment ("memfd:FD": /dev/shm full, read-only or missing) has no name that
        # another process could open: say there is none.
        self.shm_name = None if name.startswith("memfd:") else name
        self._started.set()

    # --- what the engine calls -----------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """True once the warm has ended, however it ended."""
        return self._finished.is_set()

    def wait_started(self, timeout: float | None = None) -> bool:
        """Wait until ``shm_name`` is set or the warm has ended without a segment; False on timeout."""
        return self._started.wait(timeout)

    def progress(self) -> WarmupProgress:
        """Bytes done of the total and the state; works before the start and after the end."""
        if self._view is not None:
            snap = self._view.snapshot()
            return WarmupProgress(snap.done_bytes, snap.total_bytes, snap.state)
        if not self._finished.is_set():
            return WarmupProgress(0, 0, "starting")
        return self._progress_without_segment()

    def _progress_without_segment(self) -> WarmupProgress:
        if self.result is not None:  # no pool was needed: skipped, or nothing cold
            r = self.result
            return WarmupProgress(r.bytes_selected - r.bytes_left_cold, r.bytes_selected,
                                  "skipped" if r.skipped else "done")
        return WarmupProgress(0, 0, "cancelled" if isinstance(self.error, CancelledError) else "failed")

    def layer_ready(self, layer: int) -> bool:
        """Are layer ``layer``'s selected pages resident?  Layer keys: -1 input, 0..n-1, n output.

        A layer this warm does not cover (offloaded to a GPU) is ready.  After a policy skip,
        a partial warm (budget), a failure or a cancel, a layer left cold stays not ready
        for good.  A key outside -1..n_layers raises ProgressError once the layout is read.
        """
        if self.n_layers is not None and not -1 <= layer <= self.n_layers:
            raise ProgressError(f"layer key {layer} outside -1..{self.n_layers}", self.model)
        if self._view is not None:
            return self._view.layer_ready(layer)
        r = self.result
        return self._finished.is_set() and r is not None and r.bytes_left_cold == 0

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        """Block until ``layer`` is ready or the warm has ended; False only on timeout.

        True does not promise residency: after a skip, failure or cancel the warm ends with
        the layer possibly cold, and the engine should go on (it would rather fault pages in
        itself than hang).  ``layer_ready(layer)`` tells the two apart.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.layer_ready(layer):
            if self._finished.is_set():
                return True
            wait = LAYER_POLL if deadline is None else min(LAYER_POLL, deadline - time.monotonic())
            if wait <= 0:
                return False
            self._finished.wait(wait)  # wakes at once when the warm ends
        return True

    def wait(self, timeout: float | None = None) -> WarmResult | None:
        """Wait for the end; the WarmResult, or None (timeout, failure, cancel: see ``error``).

        With ``raise_errors=True`` a failure is raised here (a cancel asked for by
        :meth:`cancel` is not a failure).
        """
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        if self.error is not None and self._raise_errors and not self._cancel_requested:
            raise self.error
        return self.result

    def cancel(self, timeout: float = CANCEL_TIMEOUT) -> None:
        """Stop the warm and wait for it: workers stopped, segment unlinked.  Idempotent."""
        if not self._finished.is_set():
            self._cancel_requested = True
            self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def keep(self, **keeper_options) -> warmpool.Keeper:
        """Once this warm has ended, keep what it warmed resident: a started
        :class:`warmpool.Keeper` over the same model and selection (its first check finds the
        pages this warm read).  ``keeper_options`` go to ``Keeper`` (``interval``, ``lock``,
        ``listen``, ``hold``...); stop it with ``stop()`` or use it as a context manager."""
        self.wait()
        passed = {k: v for k, v in self._warm_kwargs.items() if k in ("chunk_size", "budget", "force")}
        keeper = warmpool.Keeper([self.model], workers=self._workers, strategy=self._strategy,
                                 **self._selection, **passed, **keeper_options)
        return keeper.start()

    def __enter__(self) -> Warmup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __repr__(self) -> str:
        p = self.progress()
        return f"<Warmup {self.model!r} {p.state} {p.done_bytes}/{p.total_bytes} bytes shm={self.shm_name}>"


def start_warmup(model: str | os.PathLike[str], *, workers: int | None = None, strategy: str = "auto",
                 n_gpu_layers: int | None = None, cpu_moe: bool = False, n_cpu_moe: int = 0,
                 overrides: tuple[tuple[str, str], ...] = (), raise_errors: bool = False, priority: str = "idle",
                 profile: str | os.PathLike[str] | None = None, **warm_kwargs) -> Warmup:
    """Start warming what llama.cpp with these flags keeps on the CPU; return at once.

    ``priority`` defaults to ``"idle"``: the warm runs beside an engine that is loading, and
    its workers then take only CPU time the engine leaves (``warmpool.warm``; figures:
    docs/performance.md, "The engine's first request").  ``"normal"`` competes with the engine as an equal.

    The layout walk, the plan and the policy run in the background thread, so this costs
    a thread start (well under a millisecond).  ``warm_kwargs`` go to :func:`warmpool.warm`
    (``chunk_size``, ``budget``, ``force``, ``env``, ``memory``, ``linger``);
    ``WARMPOOL_PREFAULT`` is honoured (0 skips, 1 forces).

    ``profile``: an expert profile (docs/profile.md; ``warmpool keep --profile`` writes one):
    the tensors that are not experts are warmed first, then the experts hottest first.  A
    profile that cannot be used (unreadable, another version, another model) is ignored with
    a warning (logger ``engine_adapter``; ``Warmup.profile_error`` says why): the warm runs in
    layer order instead of failing beside the engine.
    """
    selection = dict(n_gpu_layers=n_gpu_layers, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, overrides=tuple(overrides))
    return Warmup(model, selection, workers, strategy, raise_errors, warm_kwargs, priority, profile)._start()


@atexit.register
def _cancel_live_warmups() -> None:
    for warmup in list(_live):
        warmup.cancel()
