"""Real page-cache tests of the warm: evict, warm, check residency with mincore.

Every test here evicts and warms the session's ``pagecache_model``, so they share the
"pagecache" xdist group and run one after another.
"""

from __future__ import annotations

import os
import threading

import pytest

import warmpool
from conftest import evict_file
from warmpool import _platform
from warmpool._plan import contiguous_runs
from warmpool._worker import FAULT_READAHEAD_MIN
from warmpool._progress import ProgressView

pytestmark = [pytest.mark.pagecache, pytest.mark.xdist_group("pagecache")]

SELECTION = dict(n_gpu_layers=99, n_cpu_moe=2)  # experts of blk.0 and blk.1 only


def page_sets(plan):
    """Pages of the selected tensors, and pages of the other tensors (minus shared ones)."""
    page = _platform.PAGE_SIZE

    def pages(tensors):
        out = set()
        for t in tensors:
            out.update(range(t.offset // page, -(-(t.offset + t.nbytes) // page)))
        return out

    chosen = {t.name for t in plan.selected}
    selected = pages(plan.selected)
    unselected = pages([t for t in plan.layout.tensors if t.name not in chosen]) - selected
    return selected, unselected


def residency_of(path, pages):
    fd = os.open(path, os.O_RDONLY)
    try:
        vector = _platform.resident_pages(fd, 0, 0)
    finally:
        os.close(fd)
    return sum(vector[p] for p in pages) / len(pages)


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("strategy", ["populate", "touch", "read"])
def test_warm_makes_selection_resident_and_nothing_else(pagecache_model, strategy, workers):
    plan = warmpool.plan_model(pagecache_model, **SELECTION)
    selected, unselected = page_sets(plan)
    evict_file(pagecache_model)
    assert residency_of(pagecache_model, selected) < 0.05

    result = warmpool.warm(pagecache_model, strategy=strategy, workers=workers, **SELECTION)

    assert residency_of(pagecache_model, selected) >= 0.99
    assert residency_of(pagecache_model, unselected) <= 0.01
    assert result.resident_fraction >= 0.99
    assert result.strategy == strategy
    assert 1 <= result.workers <= workers
    # The account always balances; a page or two may be gone again by the time it is measured
    # (this VM reclaims unmapped page cache on its own), so "all of it" is asked of the balance,
    # and the 99% criterion of the cold remainder.
    assert result.bytes_warmed + result.bytes_already_resident + result.bytes_left_cold == result.bytes_selected
    assert result.bytes_selected == plan.bytes_planned
    assert result.bytes_left_cold <= 0.01 * plan.bytes_planned
    assert result.bytes_warmed > 0.9 * plan.bytes_planned


def test_willneed_reports_what_it_achieved(pagecache_model):
    evict_file(pagecache_model)
    result = warmpool.warm(pagecache_model, strategy="willneed", workers=1, **SELECTION)
    measured = warmpool.residency(pagecache_model, **SELECTION)
    # A hint: the kernel may read all, some or none of it; the result must say what happened.
    assert result.strategy == "willneed"
    assert abs(result.resident_fraction - measured.resident_fraction) < 0.05


def test_default_warm_of_everything(pagecache_model):
    evict_file(pagecache_model)
    result = warmpool.warm(pagecache_model)
    assert result.strategy == ("populate" if _platform.supports_populate() else "touch")
    assert result.resident_fraction >= 0.99
    assert warmpool.residency(pagecache_model).resident_fraction >= 0.99


def test_progress_is_monotonic_and_ends_at_total(pagecache_model):
    evict_file(pagecache_model)
    seen, stop, views = [], threading.Event(), []

    def follow(name):
        view = ProgressView.attach(name)
        views.append(view)

        def poll():
            while not stop.is_set():
                seen.append(view.snapshot())
                stop.wait(0.001)

        threading.Thread(target=poll, daemon=True).start()

    result = warmpool.warm(pagecache_model, workers=2, chunk_size=1 << 20, on_start=follow)
    stop.set()
    final = views[0].snapshot()
    views[0].close()
    done = [s.done_bytes for s in seen] + [final.done_bytes]
    assert done == sorted(done), "progress went backwards"
    assert final.state == "done"
    assert final.done_bytes == final.total_bytes == result.bytes_selected
    assert len(set(done)) > 2, "progress was not reported while warming"


def test_layers_become_ready_in_plan_order(pagecache_model):
    evict_file(pagecache_model)
    order, views = [], []

    def follow(name):
        views.append(ProgressView.attach(name))

    plan = warmpool.plan_model(pagecache_model, chunk_size=1 << 20)
    warmpool.warm(pagecache_model, plan=plan, workers=1, on_start=follow)
    view = views[0]
    assert all(view.layer_ready(k) for k in range(-1, plan.n_layers + 1))
    # with one worker, chunks complete in plan order: sorted by first layer
    assert [c.layer_lo for c in plan.chunks] == sorted(c.layer_lo for c in plan.chunks)
    view.close()
    del order


def test_warm_of_resident_selection_reads_nothing(pagecache_model):
    warmpool.warm(pagecache_model, **SELECTION)
    result = warmpool.warm(pagecache_model, **SELECTION)
    assert result.bytes_warmed == 0
    assert result.workers == 0  # no pool was started
    assert result.bytes_already_resident == result.bytes_selected
    assert result.resident_fraction == 1.0


def test_partially_resident_warm_reads_only_the_cold_part(pagecache_model):
    plan = warmpool.plan_model(pagecache_model, **SELECTION)
    evict_file(pagecache_model)
    first = plan.chunks[0]
    fd = os.open(pagecache_model, os.O_RDONLY)
    try:
        buffer = bytearray(1 << 20)
        _platform.read_range(fd, first.offset, first.length, buffer)
    finally:
        os.close(fd)
    result = warmpool.warm(pagecache_model, **SELECTION)
    assert result.bytes_already_resident >= first.length
    assert result.bytes_warmed == plan.bytes_planned - result.bytes_already_resident


def test_evict_drops_the_selection(pagecache_model):
    warmpool.warm(pagecache_model)
    left = warmpool.evict(pagecache_model)
    # DONTNEED keeps whole large folios that straddle the selection's first/last page
    assert left <= 0.02 * warmpool.plan_model(pagecache_model).bytes_planned
    assert warmpool.residency(pagecache_model).resident_fraction <= 0.02


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("strategy", ["populate", "touch"])
def test_long_extent_faults_stay_inside_the_selection(pagecache_model, strategy, workers):
    """-ngl 3 keeps blk.0-5 on the CPU: one extent of ~29 MB followed by unselected layers.

    Where readahead is large (>= 1 MiB), the worker lets faults read an extent's inside and
    hints only its edges (``_worker.Guards``); the readahead those faults start must still stop
    at the selection's end.
    """
    selection = dict(n_gpu_layers=3)
    plan = warmpool.plan_model(pagecache_model, **selection)
    fd = os.open(pagecache_model, os.O_RDONLY)
    try:
        readahead = _platform.readahead_size(fd)
    finally:
        os.close(fd)
    longest = max(end - start for runs in contiguous_runs(plan.chunks).values() for start, end in runs)
    if readahead >= FAULT_READAHEAD_MIN:
        assert longest > 3 * readahead, "the model no longer exercises the guarded path"
    selected, unselected = page_sets(plan)
    evict_file(pagecache_model)
    warmpool.warm(pagecache_model, strategy=strategy, workers=workers, **selection)
    assert residency_of(pagecache_model, selected) >= 0.99
    assert residency_of(pagecache_model, unselected) <= 0.01
