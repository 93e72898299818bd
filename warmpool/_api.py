"""The public operations: warm, residency, evict, built on layout -> plan -> policy -> pool.

A warm measures what is already resident first (cachestat/mincore, no data read), lets the
policy choose the chunks, and only then starts worker processes.  So a warm of a model that is
already resident costs a header walk and a few hundred syscalls: the worker pool and the
progress bar are imported only when there is something to read.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable, Collection
from typing import NamedTuple

from . import _platform
from ._errors import CancelledError, FileChangedError, PlatformError, WarmpoolError
from ._log import logger
from ._plan import DEFAULT_CHUNK_SIZE, Plan, contiguous_runs, layer_key, make_plan
from ._pool.strategy import check_priority, check_strategy
from ._select import Selection
from ._stores import model_file, read_layout  # re-exported: the API's names
from ._units import format_bytes

__all__ = ["FileResidency", "LayerResidency", "Residency", "WarmResult", "evict", "model_file", "plan_model",
           "read_layout", "residency", "residency_hidden", "resolve_strategy", "warm"]


# What a reader is told when the kernel hides a file's residency (docs/design.md).
HIDDEN = "residency hidden by the kernel (not the owner, not writable)"
HIDDEN_FIX = "run as the file's owner, or with CAP_FOWNER or write permission on it, to see it"


class FileResidency(NamedTuple):
    path: str
    bytes_selected: int  # page-rounded bytes of the selection in this file
    bytes_resident: int | None  # None: the kernel hides this file's residency
    hidden: bool


class WarmResult(NamedTuple):
    path: str
    bytes_selected: int  # page-rounded bytes of the selected tensors
    bytes_already_resident: int | None  # of those, resident before the warm; None when hidden
    bytes_warmed: int  # read in by this warm (hidden files: what its workers faulted in)
    bytes_left_cold: int  # not resident after it (budget, skip, failure; hidden files: not faulted in)
    seconds: float
    workers: int
    strategy: str
    resident_fraction: float | None  # of the selection, measured after the warm; None when hidden
    skipped: bool
    reason: str  # the policy's decision and why
    residency_hidden: bool = False  # the kernel hides residency of some file of the model
    files: tuple[FileResidency, ...] = ()  # per file, after the warm

    def summary(self) -> str:
        rate = self.bytes_warmed / self.seconds / 1e9 if self.seconds else 0.0
        if self.skipped:
            head = f"skipped: {self.reason}"
        else:
            already = ("" if self.bytes_already_resident is None
                       else f" ({format_bytes(self.bytes_already_resident)} already resident)")
            head = (f"warmed {format_bytes(self.bytes_warmed)} of {format_bytes(self.bytes_selected)} selected"
                    f"{already} in {self.seconds:.2f} s, {rate:.2f} GB/s, {self.workers} workers, {self.strategy}")
            if self.bytes_left_cold >= self.bytes_selected / 1000:  # not a few stray pages
                why = f" ({self.reason})" if "left cold" in self.reason else ""
                head += f"; {format_bytes(self.bytes_left_cold)} left cold{why}"
        if self.resident_fraction is None:
            return f"{head}; {hidden_note(self.files)}"
        return f"{head}; {self.resident_fraction:.1%} resident"

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (``files`` as objects)."""
        return {**self._asdict(), "files": [f._asdict() for f in self.files]}


def hidden_note(files: tuple[FileResidency, ...]) -> str:
    """One clause: residency unknown, which files, and what would reveal it."""
    hidden = [f.path for f in files if f.hidden]
    which = "" if len(hidden) == len(files) else f" for {', '.join(os.path.basename(p) for p in hidden)}"
    return f"{HIDDEN}{which}: {HIDDEN_FIX}"


class LayerResidency(NamedTuple):
    layer: int  # layer key: -1 input, 0..n-1 blocks, n output
    bytes_selected: int
    bytes_resident: int | None  # None: some of it lies in a file whose residency is hidden


class Residency(NamedTuple):
    path: str
    bytes_selected: int
    bytes_resident: int | None  # None when the kernel hides residency for any file of the model
    resident_fraction: float | None
    layers: tuple[LayerResidency, ...]
    residency_hidden: bool = False
    files: tuple[FileResidency, ...] = ()


def plan_model(path: str | os.PathLike[str], *, n_gpu_layers: int | None = None, cpu_moe: bool = False,
               n_cpu_moe: int = 0, overrides: tuple[tuple[str, str], ...] = (),
               chunk_size: int = DEFAULT_CHUNK_SIZE, profile: str | os.PathLike[str] | None = None) -> Plan:
    """Read the layout and plan the warm of what llama.cpp with these flags keeps on the CPU.

    ``profile``: an expert profile (docs/profile.md); the plan then warms the tensors that are
    not experts first, then the experts hottest first (ProfileError if the file cannot be used)."""
    selection = Selection(n_gpu_layers, cpu_moe, n_cpu_moe, tuple(overrides)).validate()
    plan = make_plan(read_layout(path), selection, chunk_size)
    if profile is not None:
        from ._experts.order import order_by_profile

        plan = order_by_profile(plan, profile)
    return plan


def _stat_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_identity(path: str) -> tuple[int, int, int, int] | None:
    """What tells a replaced or modified file from the one planned (device, inode, size,
    mtime); None when the path is gone.  The warm and the keeper both compare these."""
    try:
        return _stat_identity(os.stat(path))
    except OSError:
        return None


class _OpenFiles:
    """The model's files, open read-only, with their identity to notice a replacement."""

    def __init__(self, plan: Plan) -> None:
        self.paths = [f.path for f in plan.files]
        self.fds: list[int] = []
        try:
            for path in self.paths:
                self.fds.append(_platform.open_model(path, FileChangedError))
        except FileChangedError:
            self.close()
            raise
        self.identity = [_stat_identity(os.fstat(fd)) for fd in self.fds]
        # Asked before any residency vector is trusted: mincore lies about these files.
        self.hidden = [_platform.residency_hidden(fd) for fd in self.fds]

    def check_unchanged(self) -> None:
        for path, before in zip(self.paths, self.identity):
            if file_identity(path) != before:
                raise FileChangedError("the file was replaced or modified while it was being warmed", path)

    def resident(self, plan: Plan, *, quick: bool = False, settled: Collection[int] = ()) -> list[int | None]:
        """Resident bytes of each chunk (page granular); None in a file whose residency is hidden.

        ``quick`` uses cachestat where the kernel has it: one syscall per chunk and no mapping,
        orders of magnitude cheaper than mincore (docs/design.md, "Residency: mincore and cachestat"), which is what keeps a
        warm of an already-resident model fast.  It also counts pages whose read is still in
        flight, so the verdict after a warm uses mincore, which counts only pages that have
        arrived, except for the ``settled`` chunks: those a warm faulted or read in whole and
        whose workers have all ended.  Each of their pages arrived before its worker's fault or
        touch returned, and no read of this warm is left in flight, so there cachestat counts
        what mincore would, at a fraction of the cost (0.13 s of mincore for 6.9 GB).
        """
        sizes: list[int | None] = []
        for i, c in enumerate(plan.chunks):
            if self.hidden[c.file]:
                sizes.append(None)
                continue
            cached = _platform.cached_bytes(self.fds[c.file], c.offset, c.length) if quick or i in settled else None
            sizes.append(cached if cached is not None else _platform.resident_bytes(self.fds[c.file], c.offset, c.length))
        return sizes

    def per_file(self, plan: Plan, resident: list[int | None]) -> tuple[FileResidency, ...]:
        rows = [[0, 0] for _ in self.paths]
        for c, r in zip(plan.chunks, resident):
            rows[c.file][0] += c.length
            rows[c.file][1] += r or 0
        return tuple(FileResidency(path, selected, None if hidden else got, hidden)
                     for path, (selected, got), hidden in zip(self.paths, rows, self.hidden))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> _OpenFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_noted: set[str] = set()


def resolve_strategy(strategy: str) -> str:
    """``auto`` is MADV_POPULATE_READ where the kernel has it (Linux >= 5.14), else touch.

    Raises WarmError for a name that is not ``auto`` or one of ``STRATEGIES``."""
    check_strategy(strategy, allow_auto=True)
    if strategy != "auto":
        return strategy
    if _platform.supports_populate():
        return "populate"
    for note in _platform.platform_notes():
        if note not in _noted:  # say each fallback once per process
            _noted.add(note)
            logger.warning(note)
    return "touch"


def warm(path: str | os.PathLike[str], *, workers: int | None = None, strategy: str = "auto",
         chunk_size: int = DEFAULT_CHUNK_SIZE, budget: int | None = None, force: bool = False,
         env: dict | None = None, memory=None, on_start: Callable[[object], None] | None = None,
         should_stop=None, linger: float = 0.0, plan: Plan | None = None, require_name: bool = False,
         priority: str = "normal", beside_engine: bool = False, engine_pid: int | None = None,
         engine_watch=None, **selection) -> WarmResult:
    """Fault the selected tensors of a GGUF model into the page cache and verify with mincore.

    ``selection`` takes llama.cpp's flags (``n_gpu_layers``, ``cpu_moe``, ``n_cpu_moe``,
    ``overrides``) and ``profile`` (an expert profile: the hottest experts are warmed first, see
    ``plan_model``).  ``on_start(segment)`` is called with the progress segment once workers are
    about to start; ``should_stop`` (a callable or threading.Event) cancels.  ``require_name``:
    the segment must have a /dev/shm name (a reader in another process will look for it);
    otherwise an unnamed one serves when /dev/shm is full, read-only or missing.
    ``priority``: ``"normal"``, or ``"idle"`` to run the workers at the lowest CPU priority
    (Linux SCHED_IDLE, else nice 19): for a warm beside an engine that is loading the same
    model, so that the workers use only CPU time the engine leaves (docs/design.md, "Worker
    processes").  ``beside_engine``: an engine is loading this model itself right now (llama.cpp
    reads the whole file at start-up); the warm first watches it read, steps aside where it reads
    at device speed and otherwise warms from the far end of its path (``_beside``;
    docs/beside-engine.md).  The reason then says which, and ``bytes_warmed`` leaves out what the
    engine read while the warm stood aside.  ``engine_pid``: the engine's process (``run``'s
    child, the adapter's own), whose storage reads tell its progress from the warm's: an engine
    not reading yet is then warmed for first, and the warm steps aside once it reads at device
    speed (``_beside.EngineGuard``).  ``engine_watch``: that engine already watched before the
    plan (``warmpool.watch_engine``, what the adapter does so that only the watch runs beside an
    engine in its own process); the warm acts on its verdict instead of watching again, and the
    reason says it even when nothing is left cold.

    A file whose residency the kernel hides (``residency_hidden``) is warmed whole and the result
    says so: ``residency_hidden`` True, ``resident_fraction`` and ``bytes_already_resident`` None.
    """
    from ._policy import decide

    check_strategy(strategy, allow_auto=True)
    check_priority(priority)
    if engine_watch is not None:
        beside_engine, engine_pid = True, engine_watch.engine_pid
    plan = plan or plan_model(path, chunk_size=chunk_size, **selection)
    started = time.perf_counter()
    with _OpenFiles(plan) as files:
        measured = files.resident(plan, quick=True)
        # A file whose residency is hidden counts as cold: warm every selected page of it.
        before = [r or 0 for r in measured]
        cold = [c.length - r for c, r in zip(plan.chunks, before)]
        decision = decide(cold, env=env, force=force, budget=budget, memory=memory)
        hidden = any(files.hidden)
        reason = f"{decision.reason} (residency hidden: counted all cold)" if hidden else decision.reason
        if engine_watch is not None:
            reason = f"{reason}; {engine_watch.describe()}"
        logger.info("%s: %s", plan.files[0].path, reason)
        result = dict(path=plan.files[0].path, bytes_selected=plan.bytes_planned,
                      bytes_already_resident=None if hidden else sum(before), seconds=0.0, workers=0,
                      reason=reason, residency_hidden=hidden)
        if not decision.chunks:
            resident = sum(before)
            return WarmResult(**result, bytes_warmed=0, bytes_left_cold=plan.bytes_planned - resident,
                              strategy=strategy, resident_fraction=_fraction(resident, plan, hidden),
                              skipped=decision.action == "skip", files=files.per_file(plan, measured))
        strategy = resolve_strategy(strategy)
        from ._pool.coordinator import stop_callable
        from ._pool.lifetime import run_warm

        stop = stop_callable(should_stop)
        chosen, baseline = list(decision.chunks), before
        guard, head_start_bytes = None, 0
        if beside_engine:
            watch, chosen, baseline = _beside_engine(plan, files, chosen, before, stop, engine_pid, engine_watch)
            if watch is not None and engine_watch is None:
                result["reason"] = reason = f"{reason}; {watch.describe()}"
                logger.info("%s: %s", plan.files[0].path, watch.describe())
            if watch is not None and watch.head_start:
                from ._beside import EngineGuard

                guard = EngineGuard(engine_pid)
            if not chosen:  # the engine read everything itself
                resident = sum(r or 0 for r in baseline)
                return WarmResult(**result | dict(seconds=time.perf_counter() - started), bytes_warmed=0,
                                  bytes_left_cold=plan.bytes_planned - resident, strategy=strategy,
                                  resident_fraction=_fraction(resident, plan, hidden), skipped=False,
                                  files=files.per_file(plan, baseline))
        try:
            outcome = run_warm(plan, files.paths, chosen, baseline, strategy, workers, on_start,
                               stop if guard is None else lambda: stop() or guard(), linger,
                               require_name=require_name, priority=priority)
        except CancelledError as e:
            if guard is None or not guard.tripped or stop():
                raise
            # The engine began its own sweep at device speed: step aside until it ends, then
            # warm what is still cold.  Ours so far: the chunks the pool finished.
            head_start_bytes = getattr(e, "completed_bytes", 0)
            outcome, baseline, note = _after_engine_start(plan, files, guard, chosen, e, stop, strategy, workers,
                                                          on_start, linger, require_name, priority)
            result["reason"] = reason = f"{reason}; {note}"
            logger.info("%s: %s", plan.files[0].path, note)
        files.check_unchanged()
        # A warm that ran to its end beside no engine has no read in flight (``resident``),
        # unless it only hinted (``willneed`` returns before the reads it asks for).
        settled = set() if stop() or beside_engine or strategy == "willneed" else set(chosen)
        measured = files.resident(plan, settled=settled)
        if not stop() and _fill_holes(plan, files, chosen, measured):
            measured = files.resident(plan, settled=settled)
        faulted = set(chosen)
        # Hidden files: the warm's own account (every chosen chunk faulted in), not a measurement.
        after = [r if r is not None else (c.length if i in faulted else 0)
                 for i, (c, r) in enumerate(zip(plan.chunks, measured))]
        per_file = files.per_file(plan, measured)
    resident = sum(after)
    result.update(seconds=time.perf_counter() - started, workers=outcome.workers)
    # What this warm made resident: a worker's own faults plus what readahead from a neighbouring
    # chunk brought in first (the worker then finds those pages resident and skips them).
    warmed = max(resident - sum(baseline), 0) + head_start_bytes
    return WarmResult(**result, bytes_warmed=warmed, bytes_left_cold=plan.bytes_planned - resident,
                      strategy=strategy, resident_fraction=_fraction(resident, plan, hidden), skipped=False,
                      files=per_file)


def _beside_engine(plan: Plan, files: _OpenFiles, chosen: list[int], before: list[int], stop: Callable[[], bool],
                   engine_pid: int | None, watched):
    """Watch the engine that loads the model beside this warm (``_beside``), unless ``watched``
    already: (the watch or None, the chunks to warm, far end first unless the warm goes first,
    and the residency they start from)."""
    from ._beside import watch_files

    if watched is not None:
        watch = watched
    elif any(files.hidden):
        watch = None
    else:
        watch = watch_files(files.fds, sum(f.size for f in plan.files), stop, engine_pid)
    # Stepped aside while this warm watched: what the sweep left cold is known only now.  (A
    # watch made before the plan ended before ``before`` was measured: nothing new to look at.)
    if watched is None and watch is not None and watch.stepped_aside:
        now = [r or 0 for r in files.resident(plan, quick=True)]
        chosen = [i for i in chosen if now[i] < plan.chunks[i].length]
        before = now
    return watch, chosen if watch is not None and watch.head_start else chosen[::-1], before


def _after_engine_start(plan: Plan, files: _OpenFiles, guard, chosen: list[int], cancelled: CancelledError, stop,
                        strategy: str, workers, on_start, linger: float, require_name: bool, priority: str):
    """The engine started reading at device speed while the warm went first: wait for its sweep
    to end, then warm what is still cold.  (The pool's result, the residency it starts from, what
    to add to the reason.)"""
    from ._pool.coordinator import PoolResult
    from ._pool.lifetime import run_warm

    waited = time.monotonic()
    guard.wait_for_sweep(files.fds, sum(f.size for f in plan.files), stop)
    note = (f"then it read {guard.rate / 1e6:,.0f} MB/s: stepped aside until its sweep ended "
            f"({time.monotonic() - waited:.2f} s)")
    after = [r or 0 for r in files.resident(plan, quick=True)]
    rest = [i for i in chosen if after[i] < plan.chunks[i].length]
    peak = getattr(cancelled, "workers", 0)
    if not rest or stop():
        return PoolResult(peak), after, note
    outcome = run_warm(plan, files.paths, rest, after, strategy, workers, on_start, stop, linger,
                       require_name=require_name, priority=priority)
    return PoolResult(max(peak, outcome.workers)), after, note


# More than this share of the warmed bytes gone by the end means memory cannot hold the
# selection: reading them again would only push out something else.
_HOLES_AT_MOST = 0.01


def _fill_holes(plan: Plan, files: _OpenFiles, chosen: list[int], measured: list[int | None]) -> bool:
    """Read once more the pages of the warmed chunks that are not resident at the end; True if
    any were read.  Proactive reclaim (DAMON's pageout scheme ages physical regions, not pages)
    can take a page within a second of its read, so a warm otherwise ends a few pages short now
    and then."""
    short = [i for i in chosen if measured[i] is not None and measured[i] < plan.chunks[i].length]
    missing = sum(plan.chunks[i].length - (measured[i] or 0) for i in short)
    if not short or missing > _HOLES_AT_MOST * sum(plan.chunks[i].length for i in chosen):
        return False
    from ._pool.reread import reread

    page, holes = _platform.PAGE_SIZE, []
    for i in short:
        c = plan.chunks[i]
        fd = files.fds[c.file]
        try:
            vector = _platform.resident_pages(fd, c.offset, c.length)
        except (OSError, WarmpoolError):
            return True  # the file changed under us: the residency check after this reports it
        holes += [(fd, c.offset + first * page, min(end * page, c.length) - first * page)
                  for first, end in _platform.page_runs(vector, 0)]
    reread(holes)  # a mapping under MADV_RANDOM per range: only the missing pages are read
    return True


def _fraction(resident: int, plan: Plan, hidden: bool) -> float | None:
    return None if hidden else resident / (plan.bytes_planned or 1)


def residency_hidden(path: str | os.PathLike[str]) -> bool:
    """Whether the kernel hides this file's page-cache residency from this process (Linux >= 5.2:
    not the owner and not writable; docs/design.md).  Such a file is warmed whole and its
    residency reported as None."""
    fd = _platform.open_model(path, FileChangedError)
    try:
        return _platform.residency_hidden(fd)
    finally:
        os.close(fd)


class _ResidentPages:
    """One mincore pass over a plan's chunks, then queried by byte range (no more syscalls).
    Files whose residency is hidden are not asked (mincore would say "all resident")."""

    def __init__(self, files: _OpenFiles, plan: Plan) -> None:
        self.page = _platform.PAGE_SIZE
        self.chunks: dict[int, list[tuple[int, bytes]]] = {}
        # bytes per chunk; the page holding EOF counts only its real bytes, like resident_bytes
        self.per_chunk: list[int | None] = [None] * len(plan.chunks)
        for i, c in sorted(enumerate(plan.chunks), key=lambda ic: (ic[1].file, ic[1].offset)):
            if files.hidden[c.file]:
                continue
            vector = _platform.resident_pages(files.fds[c.file], c.offset, c.length)
            self.chunks.setdefault(c.file, []).append((c.offset, vector))
            past_eof = len(vector) * self.page - c.length if vector[-1:] == b"\x01" else 0
            self.per_chunk[i] = vector.count(1) * self.page - past_eof
        self.starts = {file: [offset for offset, _ in chunks] for file, chunks in self.chunks.items()}

    def pages(self, file: int, start: int, end: int) -> int:
        """Resident pages in [start, end); the chunks cover every selected page."""
        chunks, count = self.chunks.get(file, []), 0
        for offset, vector in chunks[max(bisect.bisect_right(self.starts.get(file, []), start) - 1, 0):]:
            if offset >= end:
                break
            lo, hi = max(start, offset) - offset, min(end, offset + len(vector) * self.page) - offset
            if hi > lo:
                count += vector[lo // self.page : -(-hi // self.page)].count(1)
        return count


def residency(path: str | os.PathLike[str], *, plan: Plan | None = None, **selection) -> Residency:
    """How much of the selection is resident now, in total and per layer (no data is read)."""
    plan = plan or plan_model(path, **selection)
    page = _platform.PAGE_SIZE
    per_layer: dict[int, list] = {}
    with _OpenFiles(plan) as files:
        resident = _ResidentPages(files, plan)
        per_file = files.per_file(plan, resident.per_chunk)
        hidden = any(files.hidden)
    for t in plan.selected:
        first, end = t.offset // page, -(-(t.offset + t.nbytes) // page)
        row = per_layer.setdefault(layer_key(t, plan.n_layers), [0, 0])
        row[0] += (end - first) * page
        if row[1] is not None:
            row[1] = None if per_file[t.file].hidden else row[1] + resident.pages(t.file, first * page, end * page) * page
    layers = tuple(LayerResidency(k, s, r) for k, (s, r) in sorted(per_layer.items()))
    total = None if hidden else sum(resident.per_chunk)
    fraction = None if total is None else total / (plan.bytes_planned or 1)
    return Residency(plan.files[0].path, plan.bytes_planned, total, fraction, layers, hidden, per_file)


def evict(path: str | os.PathLike[str], *, plan: Plan | None = None, **selection) -> int | None:
    """Drop the selection's pages from the page cache (POSIX_FADV_DONTNEED).

    ``_platform.evict_ranges`` does it (flush, then DONTNEED; a file system that cannot write
    back is fine).  Pages that a live process maps or locks stay.  Returns the bytes still
    resident afterwards, or None when the kernel hides residency for a file of the model.
    """
    plan = plan or plan_model(path, **selection)
    # One call per run of adjacent chunks: DONTNEED keeps a large folio that straddles the
    # range's edge, so evicting chunk by chunk would keep one folio per chunk boundary.
    runs = contiguous_runs(plan.chunks)
    with _OpenFiles(plan) as files:
        for file, fd in enumerate(files.fds):
            try:
                _platform.evict_ranges(fd, [(start, end - start) for start, end in runs.get(file, [])])
            except PlatformError as e:
                e.path = e.path or files.paths[file]
                raise
        left = files.resident(plan)
        return None if None in left else sum(left)
