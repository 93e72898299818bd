"""One model a keeper keeps: its plan, open files, held mappings, locks and counters.

The keeper thread (``keeper``) decides when to warm, check, re-warm and back off; this module
owns what it holds between those decisions and measures residency the same way every time.
Rows handed to ``status()`` are read under ``guard`` so an HTTP scrape never sees half an update.
"""

from __future__ import annotations

import errno
import os
import threading

from .. import _platform
from .._plan import Chunk, Plan, contiguous_runs, make_plan
from .._api import file_identity as identity
from .._api import residency_hidden

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
        self.state = "starting"
        self.warmed = False
        self.last_rewarmed: frozenset[int] = frozenset()
        self.undone = 0  # consecutive checks that re-warmed what the previous one had
        self.backoff_steps, self.backoff_until = 0, 0.0

    @property
    def path(self) -> str:
        return self.plan.files[0].path

    def row(self) -> dict:
        with self.guard:
            selected = self.plan.bytes_planned
            resident = None if self.hidden else self.bytes_resident
            return {"model": self.name, "path": self.path, "bytes_selected": selected, "bytes_resident": resident,
                    "bytes_locked": self.bytes_locked, "bytes_rewarmed_total": self.bytes_rewarmed_total,
                    "rewarms_total": self.rewarms_total,
                    "resident_fraction": None if resident is None else resident / (selected or 1),
                    "residency_hidden": self.hidden, "state": self.state}

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
        self.set(plan=plan, state="starting")

    def note_identity(self) -> None:
        self.identity = [identity(f.path) for f in self.plan.files]
        self.hidden = residency_hidden(self.path)

    def hold(self, mapped: bool) -> None:
        """Open the files and, if ``mapped``, map the selection (one mapping per run of adjacent
        chunks), fault it into the mapping (minor faults: the warm just read it) and read one
        byte of each page once: on a VM the first CPU read of a page the disk just filled costs
        the engine several times its steady request (docs/keep.md); paid here, once, instead."""
        self.fds = [os.open(f.path, os.O_RDONLY) for f in self.plan.files]
        if not mapped:
            return
        for file, runs in contiguous_runs(self.plan.chunks).items():
            for start, end in runs:
                held = _platform.HeldMapping(self.fds[file], start, end - start)
                self.held.append((file, start, held))
                held.populate(0, end - start)
                held.touch(0, end - start)

    def mapping_of(self, chunk: Chunk) -> tuple[_platform.HeldMapping, int] | None:
        for file, start, held in self.held:
            if file == chunk.file and start <= chunk.offset < start + held.length:
                return held, chunk.offset - start
        return None

    def remap(self, indices) -> None:
        """Map re-read chunks into the held mapping again (reclaim unmapped them) and touch them."""
        for i in indices:
            where = self.mapping_of(self.plan.chunks[i])
            if where is not None:
                where[0].populate(where[1], self.plan.chunks[i].length)
                where[0].touch(where[1], self.plan.chunks[i].length)

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
        limit, page = _platform.memlock_limit(), _platform.PAGE_SIZE
        locked, refused = 0, None
        for chunk in self.plan.chunks:
            where = self.mapping_of(chunk)
            if where is None:
                continue
            held, rel = where
            err = held.lock(rel, chunk.length)
            if err in (errno.ENOMEM, errno.EAGAIN, errno.EPERM) and limit is not None:
                room = limit - (_platform.locked_bytes() or 0)  # what RLIMIT_MEMLOCK still allows
                room -= room % page
                if room > 0 and held.lock(rel, room) == 0:
                    locked += room
            if err:
                refused = err
                break
            locked += -(-chunk.length // page) * page
        self.set(bytes_locked=locked)
        fields = dict(model=self.name, bytes_locked=locked, bytes_selected=self.plan.bytes_planned,
                      vm_locked=_platform.locked_bytes())
        if refused is not None:
            fields.update(partial=True, memlock_limit=limit, error=os.strerror(refused), fix=MEMLOCK_FIX)
        return fields

    def measure(self) -> None:
        """Resident bytes per chunk: cachestat (one syscall per chunk); without it, mincore on
        the held mapping, or on a fresh mapping of the chunk when nothing is held."""
        sizes, hidden = [], self.hidden
        for chunk in self.plan.chunks:
            fd = self.fds[chunk.file]
            cached = _platform.cached_bytes(fd, chunk.offset, chunk.length)
            if cached is None and _platform.supports_cachestat():
                hidden = True  # cachestat refused this file: so would mincore, by lying
            sizes.append(cached if cached is not None else self._mincore(fd, chunk))
        self.set(chunk_resident=sizes, hidden=hidden, bytes_resident=None if hidden else sum(sizes))

    def _mincore(self, fd: int, chunk: Chunk) -> int:
        where = self.mapping_of(chunk)
        if where is None:
            return _platform.resident_bytes(fd, chunk.offset, chunk.length)
        held, rel = where
        pages = held.resident(rel, chunk.length).count(1)
        return min(pages * _platform.PAGE_SIZE, chunk.length)  # the page at EOF counts its bytes only

    def cold_chunks(self) -> list[int]:
        return [i for i, (c, r) in enumerate(zip(self.plan.chunks, self.chunk_resident)) if r < c.length]

    def release(self) -> None:
        """Unlock, unmap, close; safe to call twice and from two threads."""
        with self.guard:  # take them first: stop() and the thread may both get here
            held, fds = self.held, self.fds
            self.held, self.fds, self.bytes_locked = [], [], 0
        for _, _, mapping in held:
            mapping.unlock()
            mapping.close()
        for fd in fds:
            os.close(fd)
