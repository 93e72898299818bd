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

Where the selection does not fit the budget or the room the memory cgroup and RAM leave
(``room``), it holds the dense tensors and the hottest experts (``hot``), samples which
experts the engine reads (without a profile it holds the dense part alone until it has learned,
then fills with the hottest), re-ranks every RERANK_PERIOD in bounded steps, shrinks when the
room does, and can set the model's device read-ahead for the run (``readahead``), putting it
back on every way out.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence

from .. import _platform
from .._errors import CancelledError, FileChangedError, WarmpoolError
from .._plan import Plan
from .._units import format_bytes
from .model import KeptModel, identity
from .readahead import DeviceReadAhead, readahead_note
from .room import room

__all__ = ["HOLD_MODES", "Keeper", "PSI_BACKOFF", "reporting_note"]

HOLD_MODES = ("map", "touch", "none")
# PSI memory "some" avg10 (percent) from which re-warming is postponed: at that level tasks
# already stall on memory a tenth of the time, and our reads would only evict someone else's.
PSI_BACKOFF = 10.0
BACKOFF_MAX = 32  # at most this many intervals between tries while backing off
UNDONE_LIMIT = 3  # consecutive checks that re-warm the same chunks before backing off
# The refresh may use at most this share of one core: when one pass costs more than this share
# of ``refresh`` seconds (a huge selection in 4 KiB folios), the passes are spaced out instead.
REFRESH_CPU_SHARE = 0.02
_POLL = 0.1  # how often the thread looks at the stop flag and --for-pid while it waits
# ``hold="touch"`` spreads each pass over the period in steps this far apart, so that no step
# keeps a CPU from the engine for long: whole passes at once were most of the slow requests
# left with the touch (docs/keep.md, "Reads of idle pages under pressure").
TOUCH_TICK = 0.02
# Expert residency samples (``Ranker.sample``) at most this often, and spaced out so that they
# cost at most SAMPLE_CPU_SHARE of a core once the ranking is learned (it then moves by a
# 128-sample half-life: a pass every few seconds follows it), LEARN_CPU_SHARE before.
SAMPLE_PERIOD = 1.0
SAMPLE_CPU_SHARE = 0.01
# When the selection does not fit, the engine's misses each read a device read-ahead window
# (8 MiB here) of which it uses a few pages; what it does not map is dropped this often, at
# most SHED_CPU_SHARE of a core (``KeptModel.shed``; docs/keep.md, "Read-ahead it did not ask for").
SHED_PERIOD = 0.25
SHED_CPU_SHARE = 0.15
# ... and only while the CPUs sat idle or waited for the disk at least this many cores' worth
# since the last look: an engine that thrashes waits on its reads, and one that computes (llama.cpp
# on every core, its model nearly fitting) needs the CPU more than the pages (docs/keep.md).
SHED_IDLE_CORES = 0.5
ROOM_PERIOD = 1.0  # seconds between looks at the room (a memory.stat read, ~0.1 ms)
# A shrink waits for the room to fall this far below what is held, and a re-rank grows into the
# room only this far below it: no flapping on the engine's memory coming and going.  At most a
# quarter of the headroom, so that a small cgroup still shrinks before it is full.
ROOM_SLACK = 64 << 20
PROFILE_PERIOD = 60.0  # seconds between writes of --profile
# Seconds between re-rankings: each swap reads new experts through the pool, and re-ranking at
# every check kept a keeper reading 0.15-0.18 GB per token beside a thrashing engine
# (docs/keep.md, "Measured").
RERANK_PERIOD = 30.0
# Without a profile the keeper first holds the dense part alone and learns: experts held from the
# start (a guess) shrink the engine's page cache until residency says little more than which
# layers it passed last (docs/keep.md, "Measured").  It fills with the hottest experts once the
# ranking rests on LEARN_PASSES samples spanning LEARN_SECONDS, sampling at up to
# LEARN_CPU_SHARE of a core meanwhile.
LEARN_PASSES = 12
FILL_BATCH = 256 << 20  # bytes of experts read, then held, at a time when a re-ranking takes many
LEARN_SECONDS = 20.0
LEARN_CPU_SHARE = 0.04
# Learned, it fills only while the engine reads again what it lost: at least REFAULT_SHARE_MIN
# of the sampled pages refaulted per sample over the last ASIDE_PASSES samples.  Without
# refaults every expert the engine ever read stays resident, scores alike, and the ranking says
# only what is resident, not what is used; filling the room then holds whatever came first.
# Until refaults show, the keeper stands aside, holding the dense part and sampling at
# SAMPLE_CPU_SHARE.  Beside the thrashing stand-in engine the share was 0.13 per sample, beside
# llama.cpp in a cgroup it nearly fit 0.09-0.11 (docs/keep.md, "When what the engine reads fits").
ASIDE_PASSES = 4
REFAULT_SHARE_MIN = 0.01


def _batches(keys: list, nbytes: Callable[[object], int], limit: int) -> list[list]:
    """``keys`` in order, cut into runs of at most ``limit`` bytes (at least one key each)."""
    out: list[list] = []
    size = limit
    for key in keys:
        if size + nbytes(key) > limit:
            out.append([])
            size = 0
        out[-1].append(key)
        size += nbytes(key)
    return out


def reporting_note(order: int) -> str:
    """What keeping cannot fix on a guest that hands free memory back to its host
    (``_platform.free_page_reporting``; docs/keep.md, "Reads of idle pages under pressure")."""
    return (f"this VM hands free memory back to its host (free page reporting, order {order}); under memory "
            "pressure an engine's first read of pages idle for a while can take several times as long, and "
            "keeping them resident does not prevent that")


class Keeper:
    """Keep the selection of one or more models resident while an engine runs.

    ``models`` are paths (or plans); ``**selection`` takes llama.cpp's flags as ``warm`` does.
    ``hold`` chooses how pages are kept from looking idle between checks: ``map`` (default) holds
    a populated mapping and marks its resident pages accessed every ``refresh`` seconds (at
    most ``REFRESH_CPU_SHARE`` of a core; 0: never), ``touch`` also reads one byte of every
    resident page once per ``refresh`` seconds, paced (``_touch_step``), ``none`` only checks
    and re-warms.  ``beside_engine``: the first warm runs beside an engine that is loading the
    model itself (``warm(beside_engine=True)``, as ``warmpool run`` does; ``engine_pid``, that
    engine's process, lets the warm go first while it is still starting: ``warm``).
    ``on_warm_start(segment)`` is called when a first warm starts its
    workers (a progress bar reads the segment); ``for_pid`` ends the keeper when that process
    does.  Events go to ``on_event`` as dicts with an ``"event"`` key.
    """

    def __init__(self, models: Sequence[str | os.PathLike | Plan], *, interval: float = 10.0,
                 lock: bool = False, min_resident: float = 0.99, listen: str | None = None,
                 workers: int | None = None, strategy: str = "auto", budget: int | None = None,
                 force: bool = False, on_event: Callable[[dict], None] | None = None,
                 hold: str = "map", refresh: float = 1.0, for_pid: int | None = None,
                 on_warm_start: Callable[[str], None] | None = None, beside_engine: bool = False,
                 engine_pid: int | None = None, headroom: int | None = None, profile: str | os.PathLike | None = None,
                 readahead: int | None = None, **selection) -> None:
        from .._api import plan_model

        if interval <= 0:
            raise WarmpoolError(f"interval must be positive, got {interval}")
        if not 0 <= min_resident <= 1:
            raise WarmpoolError(f"min_resident must be in [0, 1], got {min_resident}")
        if refresh < 0:
            raise WarmpoolError(f"refresh must be 0 (off) or positive, got {refresh}")
        if hold not in HOLD_MODES:
            raise WarmpoolError(f"hold must be one of {', '.join(HOLD_MODES)}, got {hold!r}")
        if not models:
            raise WarmpoolError("no model to keep")
        self.interval, self.lock, self.min_resident, self.hold = interval, lock, min_resident, hold
        self.refresh = refresh if hold != "none" else 0.0
        # Seconds between refresh passes in effect: ``refresh``, or more where the CPU cap spaces
        # them out; None until the first pass (and while refresh is off).
        self.refresh_period: float | None = None
        self._next_refresh = 0.0
        # hold="touch": where the paced pass is (model index, byte in its held selection), when
        # it last stepped, the thread CPU time of the pass so far and of the last whole pass.
        self._touch_at, self._touch_last, self._touch_cpu, self._touch_cost = (0, 0), None, 0.0, 0.0
        self.workers, self.strategy, self.budget, self.force = workers, strategy, budget, force
        self.for_pid, self.on_warm_start, self._on_event = for_pid, on_warm_start, on_event
        self.beside_engine = beside_engine  # the first warm runs beside an engine loading the model
        self.engine_pid = engine_pid
        self.models: list[KeptModel] = []
        for source in models:
            plan = source if isinstance(source, Plan) else plan_model(source, **selection)
            self.models.append(KeptModel(plan, plan.files[0].path if isinstance(source, Plan) else os.fspath(source)))
        self._listen = listen
        self._server = None
        self._stop = threading.Event()
        self._warm_done = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self.check_observers: list[Callable[[float], None]] = []
        self.exit_reason: str | None = None
        if readahead is not None and readahead < 0:
            raise WarmpoolError(f"readahead must be 0 or more bytes, got {readahead}")
        self.headroom, self.readahead = headroom, readahead
        self.profile_path = os.fspath(profile) if profile is not None else None
        self._profile = None  # the profile read at start, seeding the first model's ranking
        self._readahead = DeviceReadAhead(self._emit)  # what --readahead changed, to put back
        self._next_sample = self._next_room = self._next_shed = 0.0
        self._idle_mark: tuple[float, float | None] | None = None  # (time, cpu_idle_seconds) at the last look
        self._next_profile = time.monotonic() + PROFILE_PERIOD
        self._slack = ROOM_SLACK

    # -- public --------------------------------------------------------------------------

    def start(self) -> Keeper:
        if self._thread is not None:
            return self
        if self.profile_path is not None and os.path.exists(self.profile_path):
            from .._experts.profile import check_profile, read_profile

            self._profile = read_profile(self.profile_path)  # a bad file is the caller's error, now
            check_profile(self._profile, self.models[0].plan.layout, self.profile_path)
        if self.readahead is not None:
            self._readahead.set([m.path for m in self.models], self.readahead)
        if self._listen is not None:
            from .http import serve

            self._server = serve(self, self._listen)  # binds now: a taken port is the caller's error
        self._emit("started", models=[m.path for m in self.models], interval=self.interval, lock=self.lock,
                   hold=self.hold, refresh=self.refresh, address=self.address and f"{self.address[0]}:{self.address[1]}",
                   free_page_reporting=_platform.free_page_reporting())
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
        return [m.row() for m in self.models]

    def ready(self) -> bool:
        rows = self.status()
        return all(r["resident_fraction"] is not None and r["resident_fraction"] >= self.min_resident for r in rows)

    @property
    def address(self) -> tuple[str, int] | None:
        return self._server.server_address[:2] if self._server is not None else None

    def stop(self, timeout: float = 3.0) -> None:
        """Stop checking, cancel a running warm, release locks and mappings, close the port, write
        the profile, put the read-ahead back."""
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
        self._readahead.restore()
        if not self._finished.is_set():
            self._finished.set()
            self._warm_done.set()
            if thread is not None:  # a keeper that never started has nothing to report
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
        if self.beside_engine:
            # Beside an engine this thread's work (the hold's populate and page reads right after
            # the engine's load, the checks, the refresh) must not take the engine's CPU; the
            # workers it starts inherit the policy.  docs/beside-engine.md.
            _platform.lower_priority()
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
                    else:
                        self._guard(model, lambda m=model: self._check(m))
        finally:
            self._warm_done.set()
            self._write_profile()
            self._release_all()
            self._readahead.restore()
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
            now = time.monotonic()
            if self.refresh and now >= self._next_refresh and self._warm_done.is_set() and not self._stop.is_set():
                self._refresh_all(now)
            if self._warm_done.is_set() and not self._stop.is_set():
                self._experts_step(now)
            touching = self.hold == "touch" and self._warm_done.is_set()
            if touching and not self._stop.is_set():
                self._touch_step(time.monotonic())
            left = deadline - time.monotonic()
            if self._stop.is_set() or left <= 0:
                return self._stop.is_set()
            self._stop.wait(min(TOUCH_TICK if touching else _POLL, left))

    def _refresh_all(self, now: float) -> None:
        """Mark every kept model's resident pages accessed, so LRU reclaim finds them referenced
        (docs/keep.md); spaced so that it costs at most ``REFRESH_CPU_SHARE`` of a core."""
        started = time.thread_time()
        for model in self.models:
            # It reads nothing that is not resident, so it goes on while re-warms back off; where
            # the kernel hides residency it cannot tell what is resident, and would read on a guess.
            if model.state in ("kept", "backoff") and model.held and not model.hidden:
                self._guard(model, model.refresh)
        cost = time.thread_time() - started
        self.refresh_period = max(self.refresh, cost / REFRESH_CPU_SHARE)
        self._next_refresh = now + self.refresh_period

    def _touch_step(self, now: float) -> int:
        """``hold="touch"``: one byte of every resident page of every kept selection per pass,
        each pass spread evenly over ``refresh`` seconds (``interval`` with the refresh off) in
        steps ``TOUCH_TICK`` apart, and passes spaced out so that they cost at most
        ``REFRESH_CPU_SHARE`` of a core.  A page read every second this way keeps an engine's
        next read of it at steady speed under the pressure where a refresh alone does not
        (docs/keep.md, "Reads of idle pages").  Returns the bytes this step covered."""
        models = [m for m in self.models if m.state in ("kept", "backoff") and m.held and not m.hidden]
        sizes = [m.held_bytes() for m in models]
        total, page = sum(sizes), _platform.PAGE_SIZE
        elapsed, self._touch_last = (now - self._touch_last if self._touch_last is not None else TOUCH_TICK), now
        if not total:
            return 0
        period = max(self.refresh or self.interval, self._touch_cost / REFRESH_CPU_SHARE)
        budget = min(max(int(total * min(elapsed, period) / period) // page * page, page), total)
        started, covered = time.thread_time(), 0
        index, position = self._touch_at if self._touch_at[0] < len(models) else (0, 0)
        while covered < budget:
            if position >= sizes[index]:  # this model's selection is done (or shrank: re-planned)
                index, position = index + 1, 0
                if index == len(models):  # a pass ended: its cost sets the next pass's pace
                    index = 0
                    self._touch_cost, self._touch_cpu = self._touch_cpu + time.thread_time() - started, 0.0
                    started = time.thread_time()
                continue
            n = min(budget - covered, sizes[index] - position)
            self._guard(models[index], lambda m=models[index], p=position, k=n: m.touch_resident(p, k))
            covered, position = covered + n, position + n
        self._touch_at = (index, position)
        self._touch_cpu += time.thread_time() - started
        return covered

    def _guard(self, model: KeptModel, step: Callable[[], None]) -> None:
        """Run one step; a replaced file re-plans, any other failure is reported, never fatal."""
        try:
            step()
        except CancelledError:
            pass
        except FileChangedError:
            self._replaced(model)
        except (WarmpoolError, OSError) as e:
            if identity(model.path) != (model.identity[0] if model.identity else None):
                self._replaced(model)
            else:
                self._emit("error", model=model.name, message=str(e))
        except Exception as e:  # noqa: BLE001 - a service survives what it can and says so
            self._emit("error", model=model.name, message=f"{type(e).__name__}: {e}")

    def _first_warm(self, model: KeptModel) -> None:
        if model.state == "missing":
            if identity(model.path) is None:
                return  # still gone: try again next interval
            model.replan()
            self._emit("replaced", model=model.name, path=model.path, replanned=True,
                       bytes_selected=model.plan.bytes_planned)
        model.release()
        model.note_identity()
        model.set(state="warming")
        self._fit(model)
        beside = self.beside_engine and not model.warmed
        result = self._warm(model, model.kept, self.on_warm_start if not model.warmed else None, beside_engine=beside)
        quiet_wait = None
        if beside and self.engine_pid is not None:
            # The engine has loaded; its first request comes next.  The hold's CPU work waits
            # until it is between requests (``_beside.wait_until_quiet``).
            from .._beside import wait_until_quiet

            started = time.monotonic()
            wait_until_quiet(self.engine_pid, self._stop.is_set)
            quiet_wait = round(time.monotonic() - started, 3)
            if self._stop.is_set():
                return  # stopped while it waited: no hold to make and release at once
        model.hold(mapped=self.hold != "none" or self.lock)
        model.warmed = True
        model.measure()
        model.set(state="kept")
        self._emit("warmed", model=model.name, bytes_selected=result.bytes_selected,
                   bytes_warmed=result.bytes_warmed, seconds=round(result.seconds, 3), workers=result.workers,
                   reason=result.reason, resident_fraction=model.row()["resident_fraction"],
                   **({} if quiet_wait is None else {"engine_quiet_wait_s": quiet_wait}))
        if self.lock:
            self._emit("locked", **model.lock())

    # -- when the selection does not fit ----------------------------------------------------

    def _room(self) -> tuple[int | None, str]:
        """Bytes all kept models may hold now (the budget, and the room; None: no limit), why."""
        ours = sum(m.bytes_locked for m in self.models)
        free = room(ours, self.headroom)
        self._slack = min(ROOM_SLACK, (free.headroom or ROOM_SLACK * 4) // 4)
        limits = [(b, w) for b, w in ((self.budget, f"--budget {format_bytes(self.budget or 0)}"),
                                      (free.bytes, f"memory: {free.why}")) if b is not None]
        return min(limits) if limits else (None, "")

    def _share(self, model: KeptModel, total: int | None) -> int | None:
        """``model``'s part of ``total``: what the models before it leave (plan order of -m)."""
        if total is None:
            return None
        before = sum(m.kept.bytes_planned for m in self.models[:self.models.index(model)])
        return max(total - before, 0)

    def _fit(self, model: KeptModel) -> None:
        """Choose what to hold before the first warm: everything where it fits, else the dense
        part and the hottest experts (a profile's ranking; without one, the dense part alone
        until the ranking is learned)."""
        total, why = self._room()
        share = self._share(model, total)
        if share is None or model.plan.bytes_planned <= share:
            model.set_budget(None, None)
            return
        from .hot import HotExperts

        profile = self._profile if model is self.models[0] else None
        hot = HotExperts.of(model.plan, profile)
        if hot is not None and profile is None:
            # What is resident now was read recently (an engine already running): a first
            # ranking better than layer order, for the price of one pass.
            fds = [_platform.open_model(f.path, FileChangedError) for f in model.plan.files]
            try:
                hot.ranker.sample(fds)
            finally:
                for fd in fds:
                    os.close(fd)
        # No profile: hold the dense part, learn, then fill (``_learned``).
        model.set_budget(share, hot, experts=[] if hot is not None and hot.provisional else None)
        model.next_rerank = time.monotonic() + RERANK_PERIOD  # the first fill stands a while
        fields = dict(model=model.name, bytes_selected=model.plan.bytes_planned, bytes_kept=model.kept.bytes_planned,
                      reason=why)
        if hot is not None:
            fields.update(experts_held=len(model.experts), experts_total=hot.total,
                          bytes_dense=hot.dense_bytes, profile=self._profile is not None and model is self.models[0])
        self._emit("partial", **fields)
        note = readahead_note(model, set_by_keeper=self.readahead is not None)
        if note is not None:
            self._emit("readahead", model=model.name, **note)

    def _experts_step(self, now: float) -> None:
        """Between checks: sample expert residency (paced), drop the read-ahead no one maps (when
        the selection does not fit), watch the room, write the profile."""
        hot_models = [m for m in self.models if m.hot is not None and m.fds and m.state in ("kept", "backoff")]
        if hot_models and now >= self._next_sample:
            started = time.thread_time()
            for model in hot_models:
                self._guard(model, lambda m=model: m.hot.ranker.sample(m.fds, held=m.experts))
            cost = time.thread_time() - started
            learning = any(m.hot.provisional and not m.hot.aside for m in hot_models)
            share = LEARN_CPU_SHARE if learning else SAMPLE_CPU_SHARE
            self._next_sample = now + max(SAMPLE_PERIOD, cost / share)
        # Only once it holds experts for an engine that loses what it reads (learned, not aside):
        # while it learns, a drop would itself make the refaults it waits for, from an engine
        # that reads with read() and maps nothing.
        shedding = [m for m in hot_models if m.warmed and not m.hot.provisional and not m.hot.aside]
        if shedding and now >= self._next_shed:
            self._next_shed = now + SHED_PERIOD
            if self._cpus_idle(now):
                started = time.thread_time()
                for model in shedding:
                    self._guard(model, model.shed)
                cost = time.thread_time() - started
                self._next_shed = now + max(SHED_PERIOD, cost / SHED_CPU_SHARE)
        if now >= self._next_room:
            self._next_room = now + ROOM_PERIOD
            self._shrink_to_room()
        if now >= self._next_profile:
            self._next_profile = now + PROFILE_PERIOD
            self._write_profile()

    def _cpus_idle(self, now: float) -> bool:
        """Whether the CPUs were idle or waiting for I/O ``SHED_IDLE_CORES`` or more since the
        last look (True where /proc/stat is unreadable: nothing says they were busy)."""
        idle = _platform.cpu_idle_seconds()
        last, self._idle_mark = self._idle_mark, (now, idle)
        if idle is None or last is None or last[1] is None or now <= last[0]:
            return idle is None
        return (idle - last[1]) / (now - last[0]) >= SHED_IDLE_CORES

    def _shrink_to_room(self) -> None:
        """Let the coldest held experts go (then unlock the rest) when what is held no longer
        fits the room: the engine's anonymous memory grew, or someone locked memory."""
        total, why = self._room()
        if total is None:
            return
        held = sum(m.kept.bytes_planned for m in self.models if m.held)
        if held <= total + self._slack:
            return
        excess = held - total
        for model in reversed(self.models):
            if excess <= 0:
                break
            if not model.held:
                continue
            before, locked = model.kept.bytes_planned, model.bytes_locked
            if model.hot is not None and model.experts:
                drop = model.hot.over(excess, model.experts)
                model.swap([], drop, self.lock)
                excess -= before - model.kept.bytes_planned
                dropped = len(drop)
            else:
                dropped = 0
            if excess > 0 and model.bytes_locked:
                model.unlock()  # still over: pages stay held, but reclaim may take them
                excess -= locked
            self._emit("shrunk", model=model.name, reason=why, bytes_kept_before=before,
                       bytes_kept=model.kept.bytes_planned, bytes_locked_before=locked, bytes_locked=model.bytes_locked,
                       experts_dropped=dropped, experts_held=len(model.experts) if model.hot else None)

    def _rerank(self, model: KeptModel) -> None:
        """Follow the ranking within the room: swap a bounded number of experts (``hot.rerank``),
        warming the new ones through the pool before mapping them."""
        total, _ = self._room()
        share = self._share(model, total)
        if share is None:
            share = model.plan.bytes_planned
        current = model.kept.bytes_planned
        # Grow into the room only with margin to spare; shrinking is _shrink_to_room's job.
        limit = share - self._slack if share >= current + 2 * self._slack else max(share, current)
        if model.hot.provisional and not self._learned(model.hot):
            return  # still learning: nothing to fill with yet
        refaults = model.hot.ranker.refault_share(ASIDE_PASSES)
        if model.hot.provisional and refaults < REFAULT_SHARE_MIN:
            if not model.hot.aside:
                model.hot.aside = True
                self._emit("aside", model=model.name, experts_held=0, bytes_kept=model.kept.bytes_planned,
                           refault_share=round(refaults, 5),
                           reason="the engine reads again little that it had lost: what it reads fits")
            return
        model.hot.aside = False
        add, drop = model.hot.rerank(max(limit, model.hot.dense_bytes), model.experts,
                                     bounded=not model.hot.provisional)
        if add:
            model.hot.provisional = False  # else nothing showed use yet: go on learning
        if drop:
            model.swap([], drop, self.lock)
        taken = []
        for batch in _batches(add, model.hot.nbytes, FILL_BATCH):
            if self._stop.is_set():
                break
            # Each batch is mapped (and locked) right after its read: beside an engine that
            # thrashes, experts read long before they are held are evicted again meanwhile.
            chunks = tuple(c for k in batch for c in model.hot.chunks(k))
            # An engine is running (the ranking was learned from its reads): the fill's workers
            # take only CPU time it leaves (docs/keep.md, "When what the engine reads fits").
            self._warm(model, model.plan._replace(chunks=chunks), priority="idle")
            if self._stop.is_set():
                break  # the warm was cut short: mapping now would read the rest page by page
            model.swap(batch, [], self.lock)
            taken += batch
        add = taken
        if add or drop:
            self._emit("reranked", model=model.name, refault_share=round(refaults, 5),
                       experts_added=len(add), experts_dropped=len(drop),
                       experts_held=len(model.experts), bytes_kept=model.kept.bytes_planned,
                       bytes_locked=model.bytes_locked)
        model.set(held_score_share=model.hot.held_score_share(model.experts))

    @staticmethod
    def _learned(hot) -> bool:
        """Still learning (no experts held yet), and the ranking now rests on enough samples."""
        ranker = hot.ranker
        return (hot.provisional and ranker.passes >= LEARN_PASSES and ranker.first_sample is not None
                and ranker.last_sample - ranker.first_sample >= LEARN_SECONDS)

    def _write_profile(self) -> None:
        if self.profile_path is None:
            return
        model = next((m for m in self.models if m.hot is not None), None)
        if model is None:
            return
        from .._experts.profile import model_identity, write_profile

        try:
            write_profile(self.profile_path, model.hot.ranker.to_profile(model_identity(model.plan.layout)))
        except (WarmpoolError, OSError) as e:
            self._emit("error", model=model.name, message=f"--profile {self.profile_path}: {e}")

    def _warm(self, model: KeptModel, plan: Plan, on_start=None, beside_engine: bool = False,
              priority: str = "normal"):
        from .._api import warm

        return warm(model.path, plan=plan, workers=self.workers, strategy=self.strategy, budget=self.budget,
                    force=self.force, on_start=on_start, should_stop=self._stop, beside_engine=beside_engine,
                    engine_pid=self.engine_pid if beside_engine else None, priority=priority)

    def _check(self, model: KeptModel) -> None:
        if model.changed():
            raise FileChangedError("the model file was replaced or deleted while kept", model.path)
        started = time.perf_counter()
        model.measure()
        seconds = time.perf_counter() - started
        for observe in self.check_observers:
            observe(seconds)
        if model.hidden:
            return  # nothing to compare against: unknown is not cold
        if model.hot is not None and (time.monotonic() >= model.next_rerank or self._learned(model.hot)):
            model.next_rerank = time.monotonic() + RERANK_PERIOD
            self._rerank(model)
            model.measure()
        evicted = model.cold_chunks()
        if not evicted:
            model.undone = model.backoff_steps = 0
            model.set(state="kept")
            return
        if time.monotonic() < model.backoff_until:
            return
        if model.hot is not None and model.hot.provisional:
            # Learning: every token reads the dense part anyway, and a re-warm under the memory
            # pressure that made the selection not fit takes seconds, during which no sample is
            # taken (it runs on this thread; docs/keep.md, "Measured").
            return
        why = self._backoff_reason(model, evicted)
        if why is None:
            self._rewarm(model, evicted)
            return
        model.backoff_steps = min(max(model.backoff_steps * 2, 1), BACKOFF_MAX)
        model.backoff_until = time.monotonic() + model.backoff_steps * self.interval
        model.set(state="backoff")
        self._emit("backoff", model=model.name, reason=why, seconds=round(model.backoff_steps * self.interval, 3),
                   bytes_cold=sum(model.kept.chunks[i].length - model.chunk_resident[i] for i in evicted))

    def _backoff_reason(self, model: KeptModel, evicted: list[int]) -> str | None:
        pressure = _platform.memory_pressure()
        if pressure is not None and pressure >= PSI_BACKOFF:
            return f"memory pressure: PSI some avg10 {pressure:.1f}% >= {PSI_BACKOFF:.0f}%"
        model.undone = model.undone + 1 if model.last_rewarmed & set(evicted) else 0
        if model.undone >= UNDONE_LIMIT:
            model.undone = 0
            return f"the last {UNDONE_LIMIT} re-warms were undone by the kernel"
        return None

    def _rewarm(self, model: KeptModel, evicted: list[int]) -> None:
        sub = model.plan._replace(chunks=tuple(model.kept.chunks[i] for i in evicted))
        result = self._warm(model, sub)
        model.remap(evicted)
        model.measure()
        rewarmed = result.bytes_warmed or 0  # what the warm measured it read in (None: unknown)
        model.set(bytes_rewarmed_total=model.bytes_rewarmed_total + rewarmed, rewarms_total=model.rewarms_total + 1,
                  state="kept", last_rewarmed=frozenset(evicted))
        self._emit("rewarmed", model=model.name, chunks=len(evicted), bytes_rewarmed=rewarmed,
                   seconds=round(result.seconds, 3), reason=result.reason, resident_fraction=model.row()["resident_fraction"])
        if result.bytes_left_cold and "exceeds" in result.reason:
            self._emit("backoff", model=model.name, reason=result.reason, seconds=round(self.interval, 3),
                       bytes_cold=result.bytes_left_cold)

    def _replaced(self, model: KeptModel) -> None:
        gone = identity(model.path) is None
        model.release()
        model.set(state="missing", bytes_resident=None, chunk_resident=[])
        self._emit("replaced", model=model.name, path=model.path, deleted=gone, replanned=False)

    def _release_all(self) -> None:
        for model in self.models:
            model.release()
