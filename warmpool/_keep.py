"""The keeper: warm once, then keep the selection resident for as long as an engine runs.

One background thread per keeper.  It warms each model with the ordinary warm (same pool,
policy and progress segment), then holds the selection (``hold``: a mapping of its own whose
pages are mapped, see docs/keep.md for why that is what keeps them here) and, if asked, mlocks
it in plan order.  Every ``interval`` it asks the kernel per chunk what is still resident
(cachestat, mincore where the kernel lacks it), re-warms evicted chunks through the same
``warm`` restricted to them (real faults in worker processes, never a WILLNEED hint, which
lands on the inactive list and is reclaimed first), and re-maps them.  It backs off instead of
fighting the kernel when memory is really short (PSI) or the budget says no.  A model file
replaced or deleted while kept is reported and re-planned from the new file.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence

from . import _platform
from ._errors import CancelledError, FileChangedError, WarmpoolError
from ._plan import Plan, contiguous_runs, make_plan

__all__ = ["HOLD_MODES", "Keeper", "PSI_BACKOFF"]

HOLD_MODES = ("map", "touch", "none")
# PSI memory "some" avg10 (percent) from which re-warming is postponed: at that level tasks
# already stall on memory a tenth of the time, and our reads would only evict someone else's.
PSI_BACKOFF = 10.0
BACKOFF_MAX = 32  # at most this many intervals between tries while backing off
UNDONE_LIMIT = 3  # consecutive checks that re-warm the same chunks before backing off
_POLL = 0.1  # how often the thread looks at the stop flag and --for-pid while it waits


class _Model:
    """One kept model: its plan, open files, held mappings and counters."""

    def __init__(self, source: str | os.PathLike | Plan, plan: Plan, name: str) -> None:
        self.source, self.plan, self.name = source, plan, name
        self.fds: list[int] = []
        self.identity: list[tuple | None] = []
        self.held: list[tuple[int, int, _platform.HeldMapping]] = []  # (file, start, mapping)
        self.chunk_resident: list[int | None] = []
        self.bytes_resident: int | None = None
        self.hidden = False
        self.bytes_locked = 0
        self.bytes_rewarmed_total = 0
        self.rewarms_total = 0
        self.state = "starting"
        self.warmed = False
        self.last_rewarmed: frozenset[int] = frozenset()
        self.undone = 0

    @property
    def path(self) -> str:
        return self.plan.files[0].path

    def row(self) -> dict:
        selected = self.plan.bytes_planned
        resident = None if self.hidden else self.bytes_resident
        return {"model": self.name, "path": self.path, "bytes_selected": selected, "bytes_resident": resident,
                "bytes_locked": self.bytes_locked, "bytes_rewarmed_total": self.bytes_rewarmed_total,
                "rewarms_total": self.rewarms_total,
                "resident_fraction": None if resident is None else resident / (selected or 1),
                "residency_hidden": self.hidden, "state": self.state}


def _identity(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _hidden(path: str) -> bool:
    """Whether the kernel hides this file's residency from us (issue 8's helper where it exists)."""
    import warmpool

    helper = getattr(warmpool, "residency_hidden", None)
    return bool(helper(path)) if helper is not None else False


class Keeper:
    """Keep the selection of one or more models resident while an engine runs.

    ``models`` are paths (or plans); ``**selection`` takes llama.cpp's flags as ``warm`` does.
    ``hold`` chooses how pages are kept from looking idle between checks: ``map`` (default) holds
    a populated mapping, ``touch`` also reads one byte per page every interval, ``none`` only
    checks and re-warms.  ``on_warm_start(segment)`` is called when a first warm starts its
    workers (a progress bar reads the segment); ``for_pid`` ends the keeper when that process
    does.  Events go to ``on_event`` as dicts with an ``"event"`` key.
    """

    def __init__(self, models: Sequence[str | os.PathLike | Plan], *, interval: float = 10.0,
                 lock: bool = False, min_resident: float = 0.99, listen: str | None = None,
                 workers: int | None = None, strategy: str = "auto", budget: int | None = None,
                 force: bool = False, on_event: Callable[[dict], None] | None = None,
                 hold: str = "map", for_pid: int | None = None,
                 on_warm_start: Callable[[str], None] | None = None, **selection) -> None:
        from ._warm import plan_model

        if interval <= 0:
            raise WarmpoolError(f"interval must be positive, got {interval}")
        if not 0 <= min_resident <= 1:
            raise WarmpoolError(f"min_resident must be in [0, 1], got {min_resident}")
        if hold not in HOLD_MODES:
            raise WarmpoolError(f"hold must be one of {', '.join(HOLD_MODES)}, got {hold!r}")
        if not models:
            raise WarmpoolError("no model to keep")
        self.interval, self.lock, self.min_resident, self.hold = interval, lock, min_resident, hold
        self.workers, self.strategy, self.budget, self.force = workers, strategy, budget, force
        self.for_pid, self.on_warm_start, self._on_event = for_pid, on_warm_start, on_event
        self.models: list[_Model] = []
        for source in models:
            plan = source if isinstance(source, Plan) else plan_model(source, **selection)
            name = plan.files[0].path if isinstance(source, Plan) else os.fspath(source)
            self.models.append(_Model(source, plan, name))
        self._listen = listen
        self._server = None
        self._stop = threading.Event()
        self._warm_done = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the models' rows while the thread updates them
        self.check_observers: list[Callable[[float], None]] = []
        self.exit_reason: str | None = None

    # -- public --------------------------------------------------------------------------

    def start(self) -> Keeper:
        if self._thread is not None:
            return self
        if self._listen is not None:
            from ._keep_http import serve

            self._server = serve(self, self._listen)  # binds now: a taken port is the caller's error
        self._emit("started", models=[m.path for m in self.models], interval=self.interval, lock=self.lock,
                   hold=self.hold, address=self.address and f"{self.address[0]}:{self.address[1]}")
        self._thread = threading.Thread(target=self._run, name="warmpool-keeper", daemon=True)
        self._thread.start()
        return self

    def wait_warm(self, timeout: float | None = None) -> bool:
        """True once the first warm of every model finished (or the keeper ended)."""
        return self._warm_done.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """True once the keeper ended (stopped, or the ``for_pid`` process exited)."""
        return self._finished.wait(timeout)

    def status(self) -> list[dict]:
        with self._lock:
            return [m.row() for m in self.models]

    def ready(self) -> bool:
        rows = self.status()
        return all(r["resident_fraction"] is not None and r["resident_fraction"] >= self.min_resident for r in rows)

    @property
    def address(self) -> tuple[str, int] | None:
        return self._server.server_address[:2] if self._server is not None else None

    def stop(self, timeout: float = 3.0) -> None:
        """Stop checking, cancel a running warm, release locks and mappings, close the port."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is None or not thread.is_alive():
            self._release_all()  # the thread did it already; this covers a keeper never started
        if not self._finished.is_set():
            self._finished.set()
            self._warm_done.set()
            self._emit("stopped", reason=self.exit_reason or "stopped")

    def __enter__(self) -> Keeper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the thread ----------------------------------------------------------------------

    def _emit(self, event: str, **fields) -> None:
        if self._on_event is not None:
            try:
                self._on_event({"event": event, "time": round(time.time(), 3), **fields})
            except Exception:  # noqa: BLE001 - a caller's callback must not stop the keeper
                pass

    def _run(self) -> None:
        backoff_until = {id(m): 0.0 for m in self.models}
        backoff_steps = {id(m): 0 for m in self.models}
        try:
            for model in self.models:
                if self._stop.is_set():
                    return
                self._guard(model, lambda m=model: self._first_warm(m))
            self._warm_done.set()
            while not self._wait(self.interval):
                for model in self.models:
                    if self._stop.is_set():
                        break
                    if model.state == "missing" or not model.warmed:
                        self._guard(model, lambda m=model: self._first_warm(m))
                        continue
                    now = time.monotonic()
                    self._guard(model, lambda m=model: self._check(m, now >= backoff_until[id(m)], backoff_until, backoff_steps))
        finally:
            self._warm_done.set()
            self._release_all()
            if self.exit_reason is not None:  # ended on its own (--for-pid): say so once
                self._finished.set()
                self._emit("stopped", reason=self.exit_reason)

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when the keeper should end."""
        deadline = time.monotonic() + seconds
        while True:
            if self.for_pid is not None and not _platform.pid_alive(self.for_pid):
                self.exit_reason = f"process {self.for_pid} exited"
                self._stop.set()
            left = deadline - time.monotonic()
            if self._stop.is_set() or left <= 0:
                return self._stop.is_set()
            self._stop.wait(min(_POLL, left))

    def _guard(self, model: _Model, step: Callable[[], None]) -> None:
        """Run one step; a replaced file re-plans, any other failure is reported, never fatal."""
        try:
            step()
        except CancelledError:
            pass
        except FileChangedError:
            self._replaced(model)
        except (WarmpoolError, OSError) as e:
            if _identity(model.path) != (model.identity[0] if model.identity else None):
                self._replaced(model)
            else:
                self._emit("error", model=model.name, message=str(e))
        except Exception as e:  # noqa: BLE001 - a service survives what it can and says so
            self._emit("error", model=model.name, message=f"{type(e).__name__}: {e}")

    def _first_warm(self, model: _Model) -> None:
        if model.state == "missing":
            if _identity(model.path) is None:
                return  # still gone: try again next interval
            model.plan = make_plan(_read_layout(model.path), model.plan.selection, model.plan.chunk_size)
            with self._lock:
                model.state = "starting"
            self._emit("replaced", model=model.name, path=model.path, replanned=True,
                       bytes_selected=model.plan.bytes_planned)
        self._release(model)
        model.identity = [_identity(f.path) for f in model.plan.files]
        model.hidden = _hidden(model.path)
        with self._lock:
            model.state = "warming"
        result = self._warm(model, model.plan, self.on_warm_start if not model.warmed else None)
        self._hold(model)
        model.warmed = True
        self._measure(model)
        with self._lock:
            model.state = "kept"
        self._emit("warmed", model=model.name, bytes_selected=result.bytes_selected,
                   bytes_warmed=result.bytes_warmed, seconds=round(result.seconds, 3), workers=result.workers,
                   reason=result.reason, resident_fraction=self.status()[self.models.index(model)]["resident_fraction"])
        if self.lock:
            self._lock_selection(model)

    def _warm(self, model: _Model, plan: Plan, on_start=None):
        from ._warm import warm

        return warm(model.path, plan=plan, workers=self.workers, strategy=self.strategy, budget=self.budget,
                    force=self.force, on_start=on_start, should_stop=self._stop)

    def _hold(self, model: _Model) -> None:
        """Map the selection (one mapping per run of adjacent chunks), fault it into the mapping
        (minor faults only: the warm just read it) and read one byte of each page once: on a VM
        the first CPU read of a page the disk just filled costs the engine ~5x its steady
        request (docs/keep.md), and it is cheaper paid here, once, than in a request."""
        model.fds = [os.open(f.path, os.O_RDONLY) for f in model.plan.files]
        if self.hold == "none" and not self.lock:
            return
        for file, runs in contiguous_runs(model.plan.chunks).items():
            for start, end in runs:
                held = _platform.HeldMapping(model.fds[file], start, end - start)
                model.held.append((file, start, held))
                held.populate(0, end - start)
                held.touch(0, end - start)  # the first CPU read of each page, see docs/keep.md

    def _mapping_of(self, model: _Model, chunk) -> tuple[_platform.HeldMapping, int] | None:
        for file, start, held in model.held:
            if file == chunk.file and start <= chunk.offset < start + held.length:
                return held, chunk.offset - start
        return None

    def _lock_selection(self, model: _Model) -> None:
        """mlock in plan order until the kernel says no; then lock what the limit still allows."""
        import errno

        limit = _platform.memlock_limit()
        locked, refused = 0, None
        page = _platform.PAGE_SIZE
        for chunk in model.plan.chunks:
            where = self._mapping_of(model, chunk)
            if where is None:
                continue
            held, rel = where
            size = -(-chunk.length // page) * page
            err = held.lock(rel, chunk.length)
            if err in (errno.ENOMEM, errno.EAGAIN, errno.EPERM) and limit is not None:
                # Over RLIMIT_MEMLOCK: lock the part of this chunk that still fits, then stop.
                room = limit - (_platform.locked_bytes() or 0)
                room -= room % page
                if room > 0 and held.lock(rel, room) == 0:
                    locked += room
                refused = err
                break
            if err:
                refused = err
                break
            locked += size
        with self._lock:
            model.bytes_locked = locked
        fields = dict(model=model.name, bytes_locked=locked, bytes_selected=model.plan.bytes_planned,
                      vm_locked=_platform.locked_bytes())
        if refused is not None:
            fields.update(partial=True, memlock_limit=limit, error=os.strerror(refused),
                          fix="raise the memlock limit: systemd LimitMEMLOCK=infinity, docker --ulimit memlock=-1 "
                              "or --cap-add IPC_LOCK, Kubernetes securityContext.capabilities.add: [IPC_LOCK]")
        self._emit("locked", **fields)

    def _measure(self, model: _Model) -> None:
        """Resident bytes per chunk: cachestat (one syscall per chunk), mincore without it."""
        sizes: list[int | None] = []
        hidden = model.hidden
        for chunk in model.plan.chunks:
            fd = model.fds[chunk.file]
            cached = _platform.cached_bytes(fd, chunk.offset, chunk.length)
            if cached is None and _platform.supports_cachestat():
                hidden = True  # cachestat refused this file: so would mincore, by lying
            sizes.append(cached if cached is not None else _platform.resident_bytes(fd, chunk.offset, chunk.length))
        with self._lock:
            model.chunk_resident = sizes
            model.hidden = hidden
            model.bytes_resident = None if hidden else sum(sizes)

    def _check(self, model: _Model, may_rewarm: bool, backoff_until: dict, backoff_steps: dict) -> None:
        if [_identity(f.path) for f in model.plan.files] != model.identity:
            raise FileChangedError("the model file was replaced or deleted while kept", model.path)
        started = time.perf_counter()
        self._measure(model)
        seconds = time.perf_counter() - started
        for observe in self.check_observers:
            observe(seconds)
        if self.hold == "touch":
            for _, _, held in model.held:
                held.touch(0, held.length)
        if model.hidden:
            return  # nothing to compare against: unknown is not cold
        evicted = [i for i, (c, r) in enumerate(zip(model.plan.chunks, model.chunk_resident))
                   if r is not None and r < c.length]
        if not evicted:
            model.undone, backoff_steps[id(model)] = 0, 0
            return
        if not may_rewarm:
            return
        why = self._backoff_reason(model, evicted)
        if why is not None:
            steps = backoff_steps[id(model)] = min(max(backoff_steps[id(model)] * 2, 1), BACKOFF_MAX)
            backoff_until[id(model)] = time.monotonic() + steps * self.interval
            with self._lock:
                model.state = "backoff"
            self._emit("backoff", model=model.name, reason=why, seconds=round(steps * self.interval, 3),
                       bytes_cold=sum(model.plan.chunks[i].length - model.chunk_resident[i] for i in evicted))
            return
        self._rewarm(model, evicted)

    def _backoff_reason(self, model: _Model, evicted: list[int]) -> str | None:
        pressure = _platform.memory_pressure()
        if pressure is not None and pressure >= PSI_BACKOFF:
            return f"memory pressure: PSI some avg10 {pressure:.1f}% >= {PSI_BACKOFF:.0f}%"
        model.undone = model.undone + 1 if model.last_rewarmed & set(evicted) else 0
        if model.undone >= UNDONE_LIMIT:
            model.undone = 0
            return f"the last {UNDONE_LIMIT} re-warms were undone by the kernel"
        return None

    def _rewarm(self, model: _Model, evicted: list[int]) -> None:
        sub = model.plan._replace(chunks=tuple(model.plan.chunks[i] for i in evicted))
        before = sum(model.chunk_resident[i] for i in evicted)
        result = self._warm(model, sub)
        for i in evicted:  # map the re-read pages into our mapping again
            where = self._mapping_of(model, model.plan.chunks[i])
            if where is not None:
                where[0].populate(where[1], model.plan.chunks[i].length)
                where[0].touch(where[1], model.plan.chunks[i].length)
        self._measure(model)
        after = sum(model.chunk_resident[i] or 0 for i in evicted)
        rewarmed = max(after - before, 0)
        with self._lock:
            model.bytes_rewarmed_total += rewarmed
            model.rewarms_total += 1
            model.state = "kept"
        model.last_rewarmed = frozenset(evicted)
        self._emit("rewarmed", model=model.name, chunks=len(evicted), bytes_rewarmed=rewarmed,
                   seconds=round(result.seconds, 3), reason=result.reason,
                   resident_fraction=self.status()[self.models.index(model)]["resident_fraction"])
        if result.bytes_left_cold and "exceeds" in result.reason:
            self._emit("backoff", model=model.name, reason=result.reason, seconds=round(self.interval, 3),
                       bytes_cold=result.bytes_left_cold)

    def _replaced(self, model: _Model) -> None:
        gone = _identity(model.path) is None
        self._release(model)
        with self._lock:
            model.state, model.bytes_resident, model.chunk_resident = "missing", None, []
        self._emit("replaced", model=model.name, path=model.path, deleted=gone, replanned=False)

    def _release(self, model: _Model) -> None:
        with self._lock:  # take them first: stop() and the thread may both get here
            held, fds = model.held, model.fds
            model.held, model.fds, model.bytes_locked = [], [], 0
        for _, _, mapping in held:
            mapping.unlock()
            mapping.close()
        for fd in fds:
            os.close(fd)

    def _release_all(self) -> None:
        for model in self.models:
            self._release(model)


def _read_layout(path: str):
    from ._layout import read_layout

    return read_layout(path)
