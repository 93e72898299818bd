"""What a worker does once every chunk of the warm is done (``_ChunkWarmer.finish``): clear
the readahead marks its huge-folio faults left (``Marks``), then read one byte of each page it
found resident in the chunks it warmed (``reread``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .. import _platform
from .._errors import WarmpoolError

__all__ = ["Marks", "reread"]


class Marks:
    """Clears the readahead marks the huge-folio faults leave, where that reads nothing.

    A fault under MADV_HUGEPAGE + MADV_RANDOM marks the PMD-size folio it reads for async
    readahead (its window is the folio itself, all of it "async"; ``ra_alloc_folio``).  An
    engine's first fault on a marked folio bypasses fault-around and runs
    ``page_cache_async_ra``, which scans the page cache up to a readahead window ahead and
    reads from the first gap: measured, one such call per folio on the engine's first pass
    (docs/folios.md).  A read(2) of one byte clears the mark the same way; done from a file
    description of our own (fresh readahead state) and only once the whole window after the
    folio is cached, that scan finds no gap and nothing is read.  Blocks within a window of
    their extent's end wait for pages past the extent, which this warm does not read: they
    keep their mark unless those pages are cached already.
    """

    def __init__(self, paths: Sequence[str], huge: int) -> None:
        self.paths, self.huge = paths, huge
        self.fds: dict[int, int] = {}
        self.pending: list[tuple[int, int, int]] = []  # (file, block offset, bytes after it to be cached)
        self.last: list[tuple[int, int, int]] = []  # near an extent's end: tried once more at the end

    def add(self, file: int, blocks: list[int], extent_end: int, ra: int) -> None:
        span = ra + self.huge  # the scan: a readahead window past the folio's first page, with margin
        for b in blocks:
            (self.pending if b + self.huge + span <= extent_end else self.last).append((file, b, span))
        self.pending = [p for p in self.pending if not self._clear(*p)]

    def _clear(self, file: int, block: int, span: int) -> bool:
        """True once the block is done with (cleared, or given up: a mark is only a cost)."""
        if file >= len(self.paths):
            return True
        try:
            fd = self.fds.get(file)
            if fd is None:
                fd = self.fds[file] = os.open(self.paths[file], os.O_RDONLY)
            start = block + self.huge
            cached = _platform.cached_bytes(fd, start, span)
            if cached is None:
                cached = _platform.resident_bytes(fd, start, span)
            if cached < min(span, max(os.fstat(fd).st_size - start, 0)):
                return False  # a gap within reach: the mark would start a read there
            _platform.read_byte(fd, block)
        except (OSError, WarmpoolError):
            pass  # the file changed or vanished: the warm itself reports that
        return True

    def close(self) -> None:
        """Once every chunk is done: all that can be cleared now."""
        self.pending = [p for p in self.pending + self.last if not self._clear(*p)]
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def reread(chunks: list[tuple[int, int, int]]) -> None:
    """Read one byte of each page of the (fd, offset, length) ranges once more, through a
    fresh mapping under MADV_RANDOM (a fault there reads no page around it: nothing outside).
    The worker passes the pages each chunk found resident when it started: its own pass read
    every other page right after faulting it.

    Why: a huge-folio fault reads the whole aligned 2 MiB block, which may reach into the next
    chunk, but ``read_pages`` reads only the pages of its own run; when the next chunk starts,
    those pages are resident and skipped, so no CPU has read them since the disk wrote them, and
    in a VM the engine's first access pays for that (docs/performance.md, "Folios and the engine's
    first pass", with the variants that did not help)."""
    for fd, offset, length in chunks:
        try:
            with _platform.FileWindow(fd, offset, length) as window:
                window.advise(0, length, "random")
                window.read_pages(0, length)
        except (OSError, WarmpoolError):
            return  # the file changed under us: the warm's own residency check reports it
