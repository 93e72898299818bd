"""Folio quality of a warm (issue 9): what the page cache looks like after it, on this machine.

A warm should leave the selection in folios as large as a sequential reader leaves, so an
engine's first pass maps many pages per fault (docs/folios.md).  Folio sizes are read with
tests/helpers/folios.py (/proc/self/pagemap + /proc/kpageflags): root only, skipped otherwise.  The
guard-zone guarantee (no unselected page read) is checked here for the huge-folio path too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import evict_file

import warmpool
from tests.helpers import folios
from warmpool import _platform
from warmpool._pool.worker import FAULT_READAHEAD_MIN, Guards

HUGE = 2 << 20


def test_parts_cut_an_extent_at_its_block_edges():
    # one extent [1 MiB, 9.5 MiB): head [1, 2) MiB, whole blocks [2, 8) MiB, tail [8, 9.5) MiB
    mib = 1 << 20
    guards = Guards([(0, 1 * mib, 4 * mib), (0, 5 * mib, 4 * mib + mib // 2), (1, 0, 3 * mib)])
    assert guards.parts(0, 1 * mib, 4 * mib, HUGE) == [(1 * mib, 2 * mib, False), (2 * mib, 5 * mib, True)]
    assert guards.parts(0, 5 * mib, 4 * mib + mib // 2, HUGE) == [(5 * mib, 8 * mib, True),
                                                                   (8 * mib, 9 * mib + mib // 2, False)]
    # an extent shorter than a block after rounding is all edge; files are apart
    short = Guards([(0, 3 * mib, mib)])
    assert short.parts(0, 3 * mib, mib, HUGE) == [(3 * mib, 4 * mib, False)]
    assert guards.parts(1, 0, 3 * mib, HUGE) == [(0, 2 * mib, True), (2 * mib, 3 * mib, False)]


def test_interior_keeps_fault_readahead_inside_its_extent():
    mib, ra = 1 << 20, 8 << 20
    guards = Guards([(0, 1 * mib, 48 * mib), (0, 49 * mib, 51 * mib), (1, 0, 20 * mib)])
    # extent [1, 100) MiB: readahead reaches 2 * ra + a block past a faulted page, and a fault
    # reads from its block's start, so [round_up(1 + 8, 2), 100 - 16 - 2) = [10, 82) MiB
    assert guards.interior(0, 1 * mib, 48 * mib, ra, HUGE) == (10 * mib, 49 * mib)
    assert guards.interior(0, 49 * mib, 51 * mib, ra, HUGE) == (49 * mib, 82 * mib)
    assert guards.interior(1, 0, 20 * mib, ra, HUGE) is None  # too short to hold any
    # a small window leaves more of the extent inside
    assert guards.interior(0, 1 * mib, 48 * mib, 1 * mib, HUGE) == (4 * mib, 49 * mib)


class _Count:
    """The worker's progress slot, as a plain sum (the test reads it; nothing else does)."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, n: int) -> None:
        self.total += n


@pytest.mark.pagecache
@pytest.mark.xdist_group("pagecache")
def test_the_inside_of_an_extent_is_streamed_and_its_reads_stay_in_the_extent(pagecache_model):
    """One worker's warmer over one extent that leaves 4 MiB cold at each end of the file: the
    inside of the extent is read by the stream (``streamed`` counts it), the edges by the fault
    threads, every page of the extent is resident and almost nothing outside it."""
    from test_warm import residency_of

    from warmpool._pool.worker import _ChunkWarmer

    mib, page = 1 << 20, _platform.PAGE_SIZE
    fd = os.open(pagecache_model, os.O_RDONLY)
    try:
        ra, huge = _platform.readahead_size(fd), _platform.huge_folio_size()
        if huge is None or ra < FAULT_READAHEAD_MIN:
            pytest.skip("no huge folios or a small readahead here: warms take the hinted path, nothing is streamed")
        size = os.fstat(fd).st_size
        start, end = 4 * mib, (size - 4 * mib) // page * page
        chunks = [(0, off, min(16 * mib, end - off)) for off in range(start, end, 16 * mib)]
        inner = Guards(chunks).interior(0, start, end - start, ra, huge)
        if inner is None:
            pytest.skip(f"a {(end - start) // mib} MiB extent has no inside with {ra // 1024} KiB readahead")
        evict_file(pagecache_model)
        count = _Count()
        warmer = _ChunkWarmer("populate", count, Guards(chunks), [str(pagecache_model)])
        errors = []
        for _, off, length in chunks:
            warmer.warm(fd, 0, off, length, lambda e: e and errors.append(e))
        warmer.finish()
    finally:
        os.close(fd)
    assert not errors and count.total == end - start
    assert warmer.streamed == inner[1] - inner[0]
    assert residency_of(pagecache_model, range(start // page, end // page)) >= 0.99
    outside = [*range(start // page), *range(-(-end // page), size // page)]
    assert residency_of(pagecache_model, outside) <= 0.01


def _order0_in(path: Path, lo: int, hi: int) -> tuple[int, int, int]:
    """(order-0 pages, resident pages, folios carrying the readahead mark) of [lo, hi)."""
    hist = folios.histogram(path, lo, hi - lo)
    return hist["by_order"].get(0, 0), hist["pages"], hist["readahead_marked"]


def _sequential_read(path: Path) -> None:
    """What `dd bs=8M` does: plain reads, the kernel's sequential readahead."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _platform.read_range(fd, 0, os.fstat(fd).st_size, bytearray(8 << 20))
    finally:
        os.close(fd)


def _needs_folio_view(path: Path) -> None:
    why = folios.available()
    if why:
        pytest.skip(why)
    if _platform.huge_folio_size() is None:
        pytest.skip("this kernel has no transparent huge pages: folio sizes are not warmpool's to choose")
    fd = os.open(path, os.O_RDONLY)
    try:
        if _platform.readahead_size(fd) < FAULT_READAHEAD_MIN:
            pytest.skip("the test file's device has a small readahead: warms hint whole runs there (4 KiB folios)")
    finally:
        os.close(fd)


@pytest.mark.pagecache
@pytest.mark.xdist_group("pagecache")
@pytest.mark.parametrize("strategy", ["auto", "touch"])
def test_default_warm_leaves_no_more_small_folios_than_a_sequential_read(pagecache_model, strategy):
    _needs_folio_view(pagecache_model)
    plan = warmpool.plan_model(pagecache_model)
    lo, hi = plan.chunks[0].offset, plan.chunks[-1].offset + plan.chunks[-1].length

    evict_file(pagecache_model)
    _sequential_read(pagecache_model)
    seq_small, seq_pages, seq_marked = _order0_in(pagecache_model, lo, hi)

    evict_file(pagecache_model)
    result = warmpool.warm(pagecache_model, strategy=strategy, workers=2)
    warm_small, warm_pages, warm_marked = _order0_in(pagecache_model, lo, hi)

    assert result.resident_fraction == 1.0
    assert seq_pages >= 0.99 * (hi - lo) // _platform.PAGE_SIZE and warm_pages >= seq_pages - 1
    assert warm_small <= seq_small, (
        f"warm left {warm_small} order-0 pages of {warm_pages}, a sequential read {seq_small} of {seq_pages}")
    # a readahead mark left on a folio costs the engine's first fault on it a page-cache scan
    assert warm_marked <= seq_marked, f"warm left {warm_marked} folios marked for readahead, a sequential read {seq_marked}"


@pytest.mark.pagecache
@pytest.mark.xdist_group("pagecache")
@pytest.mark.parametrize("workers", [1, 3])
def test_huge_folio_warm_of_many_extents_reads_nothing_unselected(pagecache_model, workers):
    """Three expert tensors per layer: every extent has unaligned edges and unselected
    neighbours; the warm must read all of them and (almost) nothing else."""
    from test_warm import page_sets, residency_of

    selection = dict(n_gpu_layers=99, overrides=(("ffn_(up|down)_exps", "CPU"),))
    plan = warmpool.plan_model(pagecache_model, **selection)
    selected, unselected = page_sets(plan)
    assert len(plan.chunks) > 4 and unselected, "the selection no longer has several extents"
    evict_file(pagecache_model)
    warmpool.warm(pagecache_model, workers=workers, **selection)
    assert residency_of(pagecache_model, selected) >= 0.99
    assert residency_of(pagecache_model, unselected) <= 0.01
