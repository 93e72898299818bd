"""The public operations: warm, residency, evict, built on layout -> plan -> policy -> pool.

A warm measures what is already resident first (cachestat/mincore, no data read), lets the
policy choose the chunks, and only then starts worker processes.  So a warm of a model that is
already resident costs a header walk and a few hundred syscalls: the multiprocessing machinery,
psutil and the progress bar are imported only when there is something to read.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable
from typing import NamedTuple

from . import _platform
from ._errors import FileChangedError, PlatformError
from ._layout import read_layout
from ._log import logger
from ._plan import DEFAULT_CHUNK_SIZE, Plan, contiguous_runs, layer_key, make_plan
from ._select import Selection

__all__ = ["LayerResidency", "Residency", "WarmResult", "evict", "plan_model", "residency", "resolve_strategy", "warm"]


class WarmResult(NamedTuple):
    path: str
    bytes_selected: int  # page-rounded bytes of the selected tensors
    bytes_already_resident: int  # of those, resident before the warm
    bytes_warmed: int  # read in by this warm
    bytes_left_cold: int  # not resident after it (budget, skip, failure)
    seconds: float
    workers: int
    strategy: str
    resident_fraction: float  # of the selection, measured after the warm
    skipped: bool
    reason: str  # the policy's decision and why

    def summary(self) -> str:
        gib = 2**30
        rate = self.bytes_warmed / self.seconds / 1e9 if self.seconds else 0.0
        if self.skipped:
            head = f"skipped: {self.reason}"
        else:
            head = (f"warmed {self.bytes_warmed / gib:.2f} GiB of {self.bytes_selected / gib:.2f} GiB selected "
                    f"({self.bytes_already_resident / gib:.2f} GiB already resident) in {self.seconds:.2f} s, "
                    f"{rate:.2f} GB/s, {self.workers} workers, {self.strategy}")
            if self.bytes_left_cold >= self.bytes_selected / 1000:  # not a few stray pages
                why = f" ({self.reason})" if "left cold" in self.reason else ""
                head += f"; {self.bytes_left_cold / gib:.2f} GiB left cold{why}"
        return f"{head}; {self.resident_fraction:.1%} resident"


class LayerResidency(NamedTuple):
    layer: int  # layer key: -1 input, 0..n-1 blocks, n output
    bytes_selected: int
    bytes_resident: int


class Residency(NamedTuple):
    path: str
    bytes_selected: int
    bytes_resident: int
    resident_fraction: float
    layers: tuple[LayerResidency, ...]


def plan_model(path: str | os.PathLike[str], *, n_gpu_layers: int | None = None, cpu_moe: bool = False,
               n_cpu_moe: int = 0, overrides: tuple[tuple[str, str], ...] = (),
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> Plan:
    """Read the layout and plan the warm of what llama.cpp with these flags keeps on the CPU."""
    selection = Selection(n_gpu_layers, cpu_moe, n_cpu_moe, tuple(overrides)).validate()
    return make_plan(read_layout(path), selection, chunk_size)


class _OpenFiles:
    """The model's files, open read-only, with their identity to notice a replacement."""

    def __init__(self, plan: Plan) -> None:
        self.paths = [f.path for f in plan.files]
        self.fds: list[int] = []
        try:
            for path in self.paths:
                self.fds.append(os.open(path, os.O_RDONLY))
        except OSError as e:
            self.close()
            raise FileChangedError(f"cannot open: {e.strerror}", path) from None
        self.identity = [self._identity(os.fstat(fd)) for fd in self.fds]

    @staticmethod
    def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def check_unchanged(self) -> None:
        for path, before in zip(self.paths, self.identity):
            try:
                now = self._identity(os.stat(path))
            except OSError:
                now = None
            if now != before:
                raise FileChangedError("the file was replaced or modified while it was being warmed", path)

    def resident(self, plan: Plan, *, quick: bool = False) -> list[int]:
        """Resident bytes of each chunk (page granular).

        ``quick`` uses cachestat where the kernel has it: one syscall per chunk and no mapping,
        orders of magnitude cheaper than mincore (docs/bench/platform.md), which is what keeps a
        warm of an already-resident model fast.  It also counts pages whose read is still in
        flight, so the verdict after a warm uses mincore, which counts only pages that have arrived.
        """
        sizes = []
        for c in plan.chunks:
            cached = _platform.cached_bytes(self.fds[c.file], c.offset, c.length) if quick else None
            sizes.append(cached if cached is not None else _platform.resident_bytes(self.fds[c.file], c.offset, c.length))
        return sizes

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
    """``auto`` is MADV_POPULATE_READ where the kernel has it (Linux >= 5.14), else touch."""
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
         should_stop=None, linger: float = 0.0, plan: Plan | None = None, **selection) -> WarmResult:
    """Fault the selected tensors of a GGUF model into the page cache and verify with mincore.

    ``selection`` takes llama.cpp's flags (``n_gpu_layers``, ``cpu_moe``, ``n_cpu_moe``,
    ``overrides``).  ``on_start(segment)`` is called with the progress segment once workers are
    about to start; ``should_stop`` (a callable or threading.Event) cancels.
    """
    from ._policy import decide

    plan = plan or plan_model(path, chunk_size=chunk_size, **selection)
    started = time.perf_counter()
    with _OpenFiles(plan) as files:
        before = files.resident(plan, quick=True)
        cold = [c.length - r for c, r in zip(plan.chunks, before)]
        decision = decide(cold, env=env, force=force, budget=budget, memory=memory)
        logger.info("%s: %s", plan.files[0].path, decision.reason)
        result = dict(path=plan.files[0].path, bytes_selected=plan.bytes_planned,
                      bytes_already_resident=sum(before), seconds=0.0, workers=0, reason=decision.reason)
        if not decision.chunks:
            resident = sum(before)
            return WarmResult(**result, bytes_warmed=0, bytes_left_cold=plan.bytes_planned - resident,
                              strategy=strategy, resident_fraction=resident / (plan.bytes_planned or 1),
                              skipped=decision.action == "skip")
        strategy = resolve_strategy(strategy)
        from ._run import run_warm

        outcome = run_warm(plan, files.paths, decision.chunks, before, strategy, workers, on_start, should_stop, linger)
        files.check_unchanged()
        after = files.resident(plan)
    resident = sum(after)
    result.update(seconds=time.perf_counter() - started, workers=outcome.workers)
    # What this warm made resident: a worker's own faults plus what readahead from a neighbouring
    # chunk brought in first (the worker then finds those pages resident and skips them).
    warmed = max(resident - sum(before), 0)
    return WarmResult(**result, bytes_warmed=warmed, bytes_left_cold=plan.bytes_planned - resident,
                      strategy=strategy, resident_fraction=resident / (plan.bytes_planned or 1), skipped=False)


class _ResidentPages:
    """One mincore pass over a plan's chunks, then queried by byte range (no more syscalls)."""

    def __init__(self, files: _OpenFiles, plan: Plan) -> None:
        self.page = _platform.PAGE_SIZE
        self.chunks: dict[int, list[tuple[int, bytes]]] = {}
        self.total = 0  # bytes; the page holding EOF counts only its real bytes, like resident_bytes
        for c in sorted(plan.chunks, key=lambda c: (c.file, c.offset)):
            vector = _platform.resident_pages(files.fds[c.file], c.offset, c.length)
            self.chunks.setdefault(c.file, []).append((c.offset, vector))
            past_eof = len(vector) * self.page - c.length if vector[-1:] == b"\x01" else 0
            self.total += vector.count(1) * self.page - past_eof
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
    per_layer: dict[int, list[int]] = {}
    with _OpenFiles(plan) as files:
        resident = _ResidentPages(files, plan)
    for t in plan.selected:
        first, end = t.offset // page, -(-(t.offset + t.nbytes) // page)
        row = per_layer.setdefault(layer_key(t, plan.n_layers), [0, 0])
        row[0] += (end - first) * page
        row[1] += resident.pages(t.file, first * page, end * page) * page
    layers = tuple(LayerResidency(k, s, r) for k, (s, r) in sorted(per_layer.items()))
    return Residency(plan.files[0].path, plan.bytes_planned, resident.total, resident.total / (plan.bytes_planned or 1), layers)


def evict(path: str | os.PathLike[str], *, plan: Plan | None = None, **selection) -> int:
    """Drop the selection's pages from the page cache (POSIX_FADV_DONTNEED).

    ``_platform.evict_ranges`` does it (flush, then DONTNEED; a file system that cannot write
    back is fine).  Pages that a live process maps or locks stay.  Returns the bytes still
    resident afterwards.
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
        return sum(files.resident(plan))
