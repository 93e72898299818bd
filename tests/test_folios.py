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
