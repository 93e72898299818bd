"""One model a keeper keeps: its plan, open files, held mappings, locks and counters.

The keeper thread (``keeper``) decides when to warm, check, re-warm and back off; this module
owns what it holds between those decisions and measures residency the same way every time.
Rows handed to ``status()`` are read under ``guard`` so an HTTP scrape never sees half an update.

What is held is ``kept``: the plan itself, or where the selection does not fit the room a plan
of part of it (``set_budget``): the dense chunks (mapped by runs, like a whole selection), then
the held experts (``hot``), one mapping per expert range so that one expert is let go by
closing its mappings.  Everything that measures, re-warms, maps or locks works on ``kept``.
"""

from __future__ import annotations

import errno
import os
import threading
import time

from .. import _platform
from .._api import file_identity as identity
from .._api import residency_hidden
from .._errors import FileChangedError
from .._plan import Chunk, Plan, contiguous_runs, make_plan
from .hot import HotExperts

__all__ = ["MEMLOCK_FIX", "KeptModel", "identity"]

MEMLOCK_FIX = ("raise the memlock limit: systemd LimitMEMLOCK=infinity, docker --ulimit memlock=-1 "
               "or --cap-add IPC_LOCK, Kubernetes securityContext.capabilities.add: [IPC_LOCK]")


class KeptModel:
    def __init__(self, plan: Plan, name: str) -> None:
        self.plan, self.name = plan, name
        self.guard = threading.Lock()
        self.fds: list[int] = []
        self.identity: list[tuple | None] = []
        self.held: list[tuple[int, int, _platform.HeldMapping]] = []  # (file, start, mapping)
        self.chunk_resident: list[int] = []
        self.bytes_resident: int | None = None
        self.hidden = False
        self.bytes_locked = self.bytes_rewarmed_total = self.rewarms_total = 0
        self.sheds_total, self.shed_cpu_seconds_total = 0, 0.0  # drops of unmapped read-ahead (``shed``)
        self.state = "starting"
        self.warmed = False
        self.last_rewarmed: frozenset[int] = frozenset()
        self.undone = 0  # consecutive checks that re-warmed what the previous one had
        self.backoff_steps, self.backoff_until = 0, 0.0
        self.next_rerank = 0.0  # monotonic time of this model's next re-ranking (set when it is fitted)
        self.kept = plan  # what is held: the plan, or under a budget its dense part and the held experts
        self.n_dense = len(plan.chunks)  # kept.chunks[:n_dense] are held by runs, the rest one mapping each
        self.hot: HotExperts | None = None
        self.experts: list[tuple[int, int]] = []  # held experts, in the order their chunks follow the dense ones
        self.chunk_maps: list[tuple[_platform.HeldMapping, int] | None] = []  # per kept chunk: its mapping, offset
        self.expert_maps: dict[tuple[int, int], list[_platform.HeldMapping]] = {}
        self.held_score_share: float | None = None
        self._locked: dict[int, int] = {}  # id of a held mapping -> bytes locked in it

    @property
    def path(self) -> str:
        return self.plan.files[0].path

    def unheld_ranges(self) -> list[tuple[int, int, int]]:
        """(file, offset, length) of every range of the model's files outside what is held."""
        runs = contiguous_runs(self.kept.chunks)
        ranges = []
        for file, model_file in enumerate(self.plan.files):
            at = 0
            for start, end in runs.get(file, []):
                if start > at:
                    ranges.append((file, at, start - at))
                at = max(at, end)
            if at < model_file.size:
                ranges.append((file, at, model_file.size - at))
        return ranges

    def shed(self) -> None:
        """Drop the model's cached pages outside what is held that no process maps: the
        read-ahead an engine's faults brought in around what they needed.  The kernel keeps every
        folio someone maps (POSIX_FADV_DONTNEED, ``mapping_evict_folio`` in mm/truncate.c skips
        a folio with references beyond the cache's), so what the engine reads stays; a dirty
        page stays too.  docs/keep.md, "Read-ahead it did not ask for"."""
        started = time.thread_time()
        for file, offset, length in self.unheld_ranges():
            _platform.evict(self.fds[file], offset, length)
        self.sheds_total += 1
        self.shed_cpu_seconds_total += time.thread_time() - started

    def row(self) -> dict:
        with self.guard:
            selected, kept = self.plan.bytes_planned, self.kept.bytes_planned
            resident = None if self.hidden else self.bytes_resident
            return {"model": self.name, "path": self.path, "bytes_selected": selected, "bytes_kept": kept,
                    "bytes_resident": resident,
                    "bytes_locked": self.bytes_locked, "bytes_rewarmed_total": self.bytes_rewarmed_total,
                    "rewarms_total": self.rewarms_total, "sheds_total": self.sheds_total,
                    "shed_cpu_seconds_total": round(self.shed_cpu_seconds_total, 3),
                    # Of the selection: a keeper holding part of it (bytes_kept) is not ready.
                    "resident_fraction": None if resident is None else resident / (selected or 1),
                    "residency_hidden": self.hidden, "state": self.state,
                    "experts_held": len(self.experts) if self.hot else None,
                    "experts_total": self.hot.total if self.hot else None,
                    "expert_held_score_share": self.held_score_share}

    def set(self, **fields) -> None:
        with self.guard:
            for name, value in fields.items():
                setattr(self, name, value)

    def changed(self) -> bool:
        return [identity(f.path) for f in self.plan.files] != self.identity

    def replan(self) -> None:
        """Plan the file now under the same name with the same selection and chunk size."""
        from .._gguf.layout import read_layout

        plan = make_plan(read_layout(self.path), self.plan.selection, self.plan.chunk_size)
        self.set(plan=plan, state="starting", kept=plan, n_dense=len(plan.chunks), hot=None, experts=[])

    def set_budget(self, room: int | None, hot: HotExperts | None, experts=None) -> None:
        """Hold the whole plan when it fits ``room`` bytes (None: no limit); else its dense part
        and ``experts`` (default: the ranking's first that fit), or, for a model without
        experts, its chunks in plan order while they fit.  Call before ``hold``."""
        plan = self.plan
        if room is None or plan.bytes_planned <= room:
            self.set(kept=plan, n_dense=len(plan.chunks), hot=None, experts=[])
            return
        if hot is None:
            chunks, total = [], 0
            for chunk in plan.chunks:
                if total + chunk.length > room:
                    break
                chunks.append(chunk)
                total += chunk.length
            self.set(kept=plan._replace(chunks=tuple(chunks)), n_dense=len(chunks), hot=None, experts=[])
            return
        experts = list(hot.fill(room) if experts is None else experts)
        self.set(hot=hot, n_dense=len(hot.dense), experts=experts, kept=self._kept_plan(hot.dense, experts, hot))

    def _kept_plan(self, dense, experts, hot: HotExperts) -> Plan:
        return self.plan._replace(chunks=tuple(dense) + tuple(c for k in experts for c in hot.chunks(k)))

    def note_identity(self) -> None:
        self.identity = [identity(f.path) for f in self.plan.files]
        self.hidden = residency_hidden(self.path)

    def hold(self, mapped: bool) -> None:
        """Open the files and, if ``mapped``, map the selection (one mapping per run of adjacent
        chunks), fault it into the mapping (minor faults: the warm just read it) and read one
        byte of each page once: on a VM the first CPU read of a page the disk just filled costs
        the engine several times its steady request (docs/keep.md); paid here, once, instead."""
        self.fds = [_platform.open_model(f.path, FileChangedError) for f in self.plan.files]
        for fd in self.fds:
            # The refresh's reads (sendfile, pread) go through these: a page evicted meanwhile is
            # read back alone, not with the device's read-ahead around it (see HeldMapping).
            _platform.advise_random(fd)
        if not mapped:
            return
        dense = self.kept.chunks[:self.n_dense]
        for file, runs in contiguous_runs(dense).items():
            for start, end in runs:
                held = _platform.HeldMapping(self.fds[file], start, end - start)
                self.held.append((file, start, held))
                held.populate(0, end - start)
                held.touch(0, end - start)
        self.chunk_maps = [self._find(chunk) for chunk in dense]
        self._map_experts(self.experts)

    def _map_experts(self, experts) -> None:
        """One mapping per range of each expert, populated and touched (as ``hold`` does)."""
        maps = []
        for key in experts:
            mine = self.expert_maps[key] = []
            for chunk in self.hot.chunks(key):
                held = _platform.HeldMapping(self.fds[chunk.file], chunk.offset, chunk.length)
                self.held.append((chunk.file, chunk.offset, held))
                mine.append(held)
                maps.append((held, 0))
                held.populate(0, chunk.length)
                held.touch(0, chunk.length)
        with self.guard:
            self.chunk_maps.extend(maps)

    def _find(self, chunk: Chunk) -> tuple[_platform.HeldMapping, int] | None:
        for file, start, held in self.held:
            if file == chunk.file and start <= chunk.offset < start + held.length:
                return held, chunk.offset - start
        return None

    def mapping_of(self, index: int) -> tuple[_platform.HeldMapping, int] | None:
        """The held mapping of kept chunk ``index`` and the chunk's offset in it; None when unmapped."""
        return self.chunk_maps[index] if index < len(self.chunk_maps) else None

    def swap(self, add, drop, lock: bool) -> None:
        """Let the ``drop`` experts go (unmapping unlocks them) and map ``add`` (the caller warmed
        them); locks the added ones when ``lock`` (``bytes_locked`` says what is locked now)."""
        gone = set(drop)
        for key in drop:
            maps = self.expert_maps.pop(key, [])
            closing = {id(m) for m in maps}
            with self.guard:
                self.held = [h for h in self.held if id(h[2]) not in closing]
            for m in maps:
                self._locked.pop(id(m), None)
                m.close()
        experts = [k for k in self.experts if k not in gone]
        dense = self.kept.chunks[:self.n_dense]
        with self.guard:
            self.experts = experts
            self.chunk_maps = self.chunk_maps[:self.n_dense] + [
                (m, 0) for k in experts for m in self.expert_maps[k]]
            self.kept = self._kept_plan(dense, experts, self.hot)
        start = len(self.kept.chunks)
        self._map_experts(add)
        with self.guard:
            self.experts = experts + list(add)
            self.kept = self._kept_plan(dense, self.experts, self.hot)
            self.chunk_resident, self.last_rewarmed = [], frozenset()
            self.bytes_locked = sum(self._locked.values())
        if lock:
            self._lock_from(start)

    def remap(self, indices) -> None:
        """Map re-read chunks into the held mapping again (reclaim unmapped them) and touch them."""
        for i in indices:
            where = self.mapping_of(i)
            if where is not None:
                where[0].populate(where[1], self.kept.chunks[i].length)
                where[0].touch(where[1], self.kept.chunks[i].length)

    def refresh(self) -> int:
        """Mark the held selection's resident pages accessed (``HeldMapping.refresh``)."""
        return sum(held.refresh() for _, _, held in self.held)

    def held_bytes(self) -> int:
        return sum(held.length for _, _, held in self.held)

    def touch_resident(self, position: int, n: int) -> None:
        """Read one byte of every resident page in bytes [position, position + n) of the held
        selection (its mappings end to end), which sets the accessed bit of each page's table
        entry; nothing that is not resident is read (but a page evicted between the mincore and
        the load, which is read back)."""
        page = _platform.PAGE_SIZE
        for _, _, held in self.held:
            lo, hi = max(position, 0), min(position + n, held.length)
            if hi > lo:
                for start, end in _platform.page_runs(held.resident(lo, hi - lo)):
                    held.touch(lo + start * page, (end - start) * page)
            position -= held.length

    def lock(self) -> dict:
        """mlock in plan order until the kernel says no, then what the limit still allows of the
        refused chunk; returns the ``locked`` event's fields."""
        locked, refused, limit = self._lock_from(0)
        fields = dict(model=self.name, bytes_locked=locked, bytes_selected=self.plan.bytes_planned,
                      vm_locked=_platform.locked_bytes())
        if refused is not None:
            fields.update(partial=True, memlock_limit=limit, error=os.strerror(refused), fix=MEMLOCK_FIX)
        return fields

    def _lock_from(self, first: int) -> tuple[int, int | None, int | None]:
        """mlock kept chunks from index ``first`` on (bytes_locked counts on from what is locked
        before it); (bytes locked, the errno that stopped it or None, RLIMIT_MEMLOCK)."""
        limit, page = _platform.memlock_limit(), _platform.PAGE_SIZE
        if not first:
            self._locked.clear()
        refused = None
        for i, chunk in enumerate(self.kept.chunks[first:], first):
            where = self.mapping_of(i)
            if where is None:
                continue
            held, rel = where
            err = held.lock(rel, chunk.length)
            if err in (errno.ENOMEM, errno.EAGAIN, errno.EPERM) and limit is not None:
                room = limit - (_platform.locked_bytes() or 0)  # what RLIMIT_MEMLOCK still allows
                room -= room % page
                if room > 0 and held.lock(rel, room) == 0:
                    self._locked[id(held)] = self._locked.get(id(held), 0) + room
            if err:
                refused = err
                break
            self._locked[id(held)] = self._locked.get(id(held), 0) + -(-chunk.length // page) * page
        locked = sum(self._locked.values())
        self.set(bytes_locked=locked)
        return locked, refused, limit

    def unlock(self) -> None:
        """munlock everything held; the mappings stay."""
        for _, _, held in self.held:
            held.unlock()
        with self.guard:
            self._locked, self.bytes_locked = {}, 0

    def measure(self) -> None:
        """Resident bytes per chunk: cachestat (one syscall per chunk); without it, mincore on
        the held mapping, or on a fresh mapping of the chunk when nothing is held."""
        sizes, hidden = [], self.hidden
        for i, chunk in enumerate(self.kept.chunks):
            fd = self.fds[chunk.file]
            cached = _platform.cached_bytes(fd, chunk.offset, chunk.length)
            if cached is None and _platform.supports_cachestat():
                hidden = True  # cachestat refused this file: so would mincore, by lying
            sizes.append(cached if cached is not None else self._mincore(fd, i, chunk))
        self.set(chunk_resident=sizes, hidden=hidden, bytes_resident=None if hidden else sum(sizes))

    def _mincore(self, fd: int, index: int, chunk: Chunk) -> int:
        where = self.mapping_of(index)
        if where is None:
            return _platform.resident_bytes(fd, chunk.offset, chunk.length)
        held, rel = where
        pages = held.resident(rel, chunk.length).count(1)
        return min(pages * _platform.PAGE_SIZE, chunk.length)  # the page at EOF counts its bytes only

    def cold_chunks(self) -> list[int]:
        return [i for i, (c, r) in enumerate(zip(self.kept.chunks, self.chunk_resident)) if r < c.length]

    def release(self) -> None:
        """Unlock, unmap, close; safe to call twice and from two threads."""
        with self.guard:  # take them first: stop() and the thread may both get here
            held, fds = self.held, self.fds
            self.held, self.fds, self.bytes_locked = [], [], 0
            self.chunk_maps, self.expert_maps = [], {}
            self._locked = {}
        for _, _, mapping in held:
            mapping.unlock()
            mapping.close()
        for fd in fds:
            os.close(fd)
