"""Real page-cache tests of the warm: evict, warm, check residency with mincore.

Every test here evicts and warms the session's ``pagecache_model``, so they share the
"pagecache" xdist group and run one after another.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from conftest import MADV_PAGEOUT, evict_file, warm_watched

import warmpool
from warmpool import ProgressView, _platform
from warmpool._plan import contiguous_runs
from warmpool._pool.worker import FAULT_READAHEAD_MIN

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


def resident_vector(path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _platform.resident_pages(fd, 0, 0)
    finally:
        os.close(fd)


def reclaimed_pages(path, pages) -> int:
    """Pages of the set that were cached and reclaimed since the file was last evicted.

    Reclaim leaves a shadow entry in the page cache for each page it takes (mm/workingset.c),
    which cachestat(2) counts as ``nr_evicted``; ``evict_file`` (fadvise DONTNEED) removes
    them, and a read that brings a page back replaces its shadow.  This VM's DAMON pages out
    idle physical memory, and page cache that lands in a region it judged idle can go within
    seconds of the warm: counted here, that is a page the warm read, not one it missed.  0
    where cachestat is missing (the caller then sees residency alone)."""
    if not _platform.supports_cachestat():
        return 0
    from warmpool._platform.linux import _cachestat

    page, total = _platform.PAGE_SIZE, 0
    member = bytearray(max(pages) + 1)
    for p in pages:
        member[p] = 1
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end in _platform.page_runs(bytes(member)):
            total += _cachestat(fd, start * page, (end - start) * page).nr_evicted
    finally:
        os.close(fd)
    return total


def residency_of(path, pages):
    """Fraction of the pages the warm read: resident now, or reclaimed since the eviction."""
    vector = resident_vector(path)
    resident = sum(vector[p] for p in pages)
    reclaimed = reclaimed_pages(path, pages)
    if reclaimed:
        print(f"{reclaimed} of {len(pages)} pages were reclaimed after being read")
    return (resident + reclaimed) / len(pages)


def resident_selected_bytes(path, pages) -> int:
    """Resident bytes of these pages, by the test's own mincore pass (the file's owner: exact)."""
    vector = resident_vector(path)
    return sum(vector[p] for p in pages) * _platform.PAGE_SIZE


def test_page_cache_tests_run_in_one_xdist_group(request):
    """The tests of this group evict and warm one shared model, so xdist must run them one after
    another on one worker: --dist loadgroup marks their node ids with the group.  pytest 9.2
    broke that silently (pytest-xdist issue 1386; the test extra pins pytest below it)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        pytest.skip("not under xdist: one process runs every test in turn")
    assert request.node.nodeid.endswith("@pagecache"), (
        f"{request.node.nodeid}: xdist did not group the page-cache tests (--dist loadgroup ignored)")


def test_a_page_reclaimed_after_the_warm_read_it_counts_as_read(pagecache_model):
    """The residency checks of this module count reclaimed pages as read (reclaimed_pages):
    that must see a page read then paged out, and must not see a page never read."""
    if not _platform.supports_cachestat():
        pytest.skip("no cachestat(2) here: the checks count residency alone")
    import mmap

    # Pages in the middle of the file: tests on the other xdist worker read the header of this
    # model (its first pages) at any time, and a page read there would be cached again.
    page = _platform.PAGE_SIZE
    first = os.path.getsize(pagecache_model) // page // 2
    read, unread = set(range(first, first + 256)), set(range(first + 256, first + 512))
    evict_file(pagecache_model)
    fd = os.open(pagecache_model, os.O_RDONLY)
    cpus = os.sched_getaffinity(0)
    # One CPU for the read and the pageout: new folios wait in a per-CPU batch before they join
    # the LRU (mm/swap.c), and a pageout takes only folios on the LRU.  Unpinned, it left 9 of
    # the 256 pages cached in 4 of 28 runs; pinned, none in 16.
    os.sched_setaffinity(0, {min(cpus)})
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: exactly these pages
        os.pread(fd, 256 * page, first * page)
        with mmap.mmap(fd, 256 * page, prot=mmap.PROT_READ, offset=first * page) as window:
            window[::page]  # map them: MADV_PAGEOUT reclaims what this mapping maps
            window.madvise(MADV_PAGEOUT)  # reclaim, as DAMON's pageout does
    finally:
        os.sched_setaffinity(0, cpus)
        os.close(fd)
    vector = resident_vector(pagecache_model)
    assert sum(vector[p] for p in read) <= 0.01 * len(read), "MADV_PAGEOUT left the pages cached"
    assert residency_of(pagecache_model, read) >= 0.99
    assert residency_of(pagecache_model, unread) <= 0.01


def test_the_last_pass_reads_every_page_of_its_chunks_and_nothing_around(pagecache_model):
    """``_worker_finish.reread``, the pass each worker makes over its chunks once the warm is
    done: on an evicted file it must fault in exactly the chunk's pages (MADV_RANDOM: no
    readahead or read-around past them)."""
    from warmpool._pool.reread import reread

    page, size = _platform.PAGE_SIZE, os.path.getsize(pagecache_model)
    offset, length = size // page // 2 * page, 512 * page  # far from the header other tests read
    assert offset + length + 1024 * page < size
    evict_file(pagecache_model)
    fd = os.open(pagecache_model, os.O_RDONLY)
    try:
        reread([(fd, offset, length)])
    finally:
        os.close(fd)
    vector = resident_vector(pagecache_model)
    chunk = range(offset // page, (offset + length) // page)
    assert sum(vector[p] for p in chunk) == len(chunk)
    around = [p for p in range(chunk.start - 1024, chunk.stop + 1024) if p not in chunk]
    assert sum(vector[p] for p in around) == 0, "the pass read pages outside its chunk"


def test_pages_lost_by_the_end_of_a_warm_are_read_once_more(pagecache_model):
    """``_api._fill_holes``: a few pages of the warmed chunks gone by the end (reclaim took them)
    are read again, and nothing around them; more than 1 % gone is left as it is (memory
    cannot hold the selection) and reported by the residency check."""
    from warmpool._api import _fill_holes, _OpenFiles

    page = _platform.PAGE_SIZE
    plan = warmpool.plan_model(pagecache_model, chunk_size=1 << 20)  # everything, far from the header
    chosen = [i for i, c in enumerate(plan.chunks) if c.offset >= os.path.getsize(pagecache_model) // 2][:4]
    total = sum(plan.chunks[i].length for i in chosen) // page
    evict_file(pagecache_model)
    with _OpenFiles(plan) as files:
        _platform.advise_random(files.fds[0])  # order-0 folios: a single page can then be dropped
        for i in chosen:
            _platform.read_range(files.fds[0], plan.chunks[i].offset, plan.chunks[i].length, bytearray(1 << 20))
        lost = []
        for i in chosen:  # two single pages per chunk: under 1 % of the pages here
            c = plan.chunks[i]
            lost += [c.offset // page + k for k in (1, c.length // page // 2)]
        for p in lost:
            _platform.evict_ranges(files.fds[0], ((p * page, page),))
        assert sum(resident_vector(pagecache_model)[p] for p in lost) == 0
        assert len(lost) <= 0.01 * total
        assert _fill_holes(plan, files, chosen, files.resident(plan))
        vector = resident_vector(pagecache_model)
        assert [p for p in lost if not vector[p]] == [], "lost pages were not read again"
        end = max(plan.chunks[i].offset + plan.chunks[i].length for i in chosen) // page
        assert sum(vector[end:end + 64]) == 0, "the fill read past the warmed chunks"

        # Too many gone: nothing is read.
        first = plan.chunks[chosen[0]]
        _platform.evict_ranges(files.fds[0], ((first.offset, first.length),))
        assert not _fill_holes(plan, files, chosen, files.resident(plan))
        pages = range(first.offset // page, (first.offset + first.length) // page)
        assert sum(resident_vector(pagecache_model)[p] for p in pages) == 0


def disk_read_bytes() -> int:
    """Bytes this process and its reaped children had read from block devices (/proc/self/io:
    the kernel adds a child's I/O counters to its parent's when it is reaped, as the pool does
    with its workers)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("strategy", ["populate", "touch", "read"])
def test_warm_makes_selection_resident_and_nothing_else(pagecache_model, strategy, workers):
    plan = warmpool.plan_model(pagecache_model, **SELECTION)
    selected, unselected = page_sets(plan)
    evict_file(pagecache_model)
    assert residency_of(pagecache_model, selected) < 0.05
    measured_before = resident_selected_bytes(pagecache_model, selected)

    result = warmpool.warm(pagecache_model, strategy=strategy, workers=workers, **SELECTION)

    measured_after = resident_selected_bytes(pagecache_model, selected)
    assert residency_of(pagecache_model, selected) >= 0.99
    assert residency_of(pagecache_model, unselected) <= 0.01
    assert result.resident_fraction >= 0.99
    assert result.strategy == strategy
    assert 1 <= result.workers <= workers
    # The account against the test's own mincore passes just before and after the warm (pages
    # are counted whole here, so the page holding EOF may differ by a page; this VM reclaims
    # unmapped page cache on its own, so a few pages may go between the two measurements).
    slack = 0.01 * plan.bytes_planned
    assert result.bytes_selected == plan.bytes_planned
    assert abs(result.bytes_already_resident - measured_before) <= _platform.PAGE_SIZE
    assert abs(result.bytes_warmed - (measured_after - measured_before)) <= slack
    assert abs(result.bytes_left_cold - (plan.bytes_planned - measured_after)) <= slack


def test_willneed_reports_what_it_achieved(pagecache_model):
    evict_file(pagecache_model)
    result = warmpool.warm(pagecache_model, strategy="willneed", workers=1, **SELECTION)
    measured = warmpool.residency(pagecache_model, **SELECTION)
    # A hint: the kernel may read all, some or none of it, and may still be reading when the warm
    # measures; nothing evicts here, so what it reports can only have grown since, never shrunk.
    assert result.strategy == "willneed"
    assert result.resident_fraction <= measured.resident_fraction + 0.01
    # Once the reads have landed, a second hint finds everything there and must say so exactly.
    deadline = time.monotonic() + 10
    while warmpool.residency(pagecache_model, **SELECTION).resident_fraction < 1.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(3):
        before = warmpool.residency(pagecache_model, **SELECTION)
        again = warmpool.warm(pagecache_model, strategy="willneed", workers=1, **SELECTION)
        truth = warmpool.residency(pagecache_model, **SELECTION)
        if truth.bytes_resident == before.bytes_resident:
            break  # else this VM's proactive reclaim took pages just before the hint read them again
    assert again.resident_fraction == pytest.approx(truth.resident_fraction, abs=0.01)
    assert again.bytes_already_resident == pytest.approx(truth.bytes_resident, abs=4096)


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
    """Watch layer_ready() of every layer key from another thread during a real warm, and
    check the order in which layers became ready against the plan's order."""
    plan = warmpool.plan_model(pagecache_model, chunk_size=256 << 10)
    keys = range(-1, plan.n_layers + 1)
    # Plan order: layer k is ready once the last chunk holding it is done.
    last_chunk = {k: max(i for i, c in enumerate(plan.chunks) if c.layer_lo <= k <= c.layer_hi) for k in keys}
    expected = sorted(keys, key=lambda k: last_chunk[k])
    assert expected != list(reversed(expected))  # the order says something
    first_ready: dict[int, int] = {}
    samples = [0]

    def sample(view):
        samples[0] += 1
        for k in keys:
            if k not in first_ready and view.layer_ready(k):
                first_ready[k] = samples[0]

    evict_file(pagecache_model)
    warm_watched(pagecache_model, sample, plan=plan, workers=1)
    assert set(first_ready) == set(keys), f"layers never seen ready: {set(keys) - set(first_ready)}"
    observed = sorted(keys, key=lambda k: (first_ready[k], last_chunk[k]))
    assert len(set(first_ready.values())) > len(keys) // 2, f"too coarse to tell an order: {first_ready}"
    for a, b in zip(expected, expected[1:]):
        assert first_ready[a] <= first_ready[b], f"layer {b} was ready before layer {a}: {first_ready}"
    assert observed == expected


def test_warm_of_resident_selection_reads_nothing(pagecache_model):
    warmpool.warm(pagecache_model, **SELECTION)
    result = warmpool.warm(pagecache_model, **SELECTION)
    assert result.bytes_warmed == 0
    assert result.workers == 0  # no pool was started
    assert result.bytes_already_resident == result.bytes_selected
    assert result.resident_fraction == 1.0


def test_partially_resident_warm_reads_only_the_cold_part(pagecache_model):
    """Half the selection resident first; the disk bytes read by the warm (the workers' reads,
    counted by the kernel per process) must be the cold half, not the whole selection."""
    plan = warmpool.plan_model(pagecache_model, chunk_size=1 << 20, **SELECTION)
    selected, _ = page_sets(plan)
    evict_file(pagecache_model)
    half = plan.chunks[: len(plan.chunks) // 2]
    fd = os.open(pagecache_model, os.O_RDONLY)
    try:
        _platform.advise_random(fd)  # exact reads: no readahead into the half left cold
        for chunk in half:
            _platform.read_range(fd, chunk.offset, chunk.length, bytearray(1 << 20))
    finally:
        os.close(fd)
    warm_before = resident_selected_bytes(pagecache_model, selected)
    cold = plan.bytes_planned - warm_before
    assert sum(c.length for c in half) * 0.95 <= warm_before <= plan.bytes_planned * 0.75

    read_before = disk_read_bytes()
    result = warmpool.warm(pagecache_model, plan=plan, workers=2)
    read = disk_read_bytes() - read_before

    assert result.workers >= 1 and result.resident_fraction >= 0.99
    assert abs(result.bytes_already_resident - warm_before) <= 0.02 * plan.bytes_planned
    # Bounds from the warm's own look before it started (this VM may reclaim a few unmapped pages
    # between the test's mincore and that look); the header walk reads a few pages, readahead
    # stays inside the selection (_worker.Guards).  Reading the whole selection would exceed it.
    cold_seen = plan.bytes_planned - result.bytes_already_resident
    assert 0.95 * cold_seen <= read <= cold_seen + (1 << 20), (read, cold_seen, cold, plan.bytes_planned)
    assert plan.bytes_planned - cold_seen > 3 * (1 << 20)  # what was warm is well over the slack


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
