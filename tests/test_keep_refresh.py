"""The keeper's refresh: that it maps the resident pages and reads none of the evicted ones,
and that the kernel then sees every held folio referenced (/proc/kpageflags, root only), which
is what LRU reclaim asks before it takes a mapped file folio.  Under real pressure it is
measured by tools/keep_bench.py (docs/keep.md)."""

from __future__ import annotations

import os
import re

import pytest
from conftest import MiB, evict_file, page_out, resident_fraction, write_random

import warmpool
from tests.helpers import folios
from warmpool import _platform

pytestmark = pytest.mark.pagecache



def _mapping_line(address: int) -> tuple[str, int]:
    """(permissions, Rss bytes) of this process's mapping that starts at ``address``."""
    with open("/proc/self/smaps") as f:
        text = f.read()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        start = int(block.split("-", 1)[0], 16)
        if start == address:
            perms = block.split()[1]
            rss = int(re.search(r"^Rss:\s+(\d+) kB", block, re.M).group(1)) * 1024
            return perms, rss
    raise AssertionError(f"no mapping at {address:#x}")


def test_refresh_maps_the_resident_pages_and_reads_none_of_the_evicted(tmp_path):
    path = tmp_path / "data.bin"
    write_random(path, 16 * MiB)
    evict_file(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what is read
        os.pread(fd, 8 * MiB, 0)  # the first half resident, the second half cold
        before = resident_fraction(path)
        held = _platform.HeldMapping(fd, 0, 16 * MiB)
        try:
            assert _mapping_line(held.address)[1] == 0  # mapping alone maps nothing
            refreshed = held.refresh()
            perms, rss = _mapping_line(held.address)
            assert refreshed == 8 * MiB, refreshed
            assert rss >= 8 * MiB, rss  # the resident half went through the page walk
            assert resident_fraction(path) == pytest.approx(before, abs=0.01) and before < 0.6  # nothing read
        finally:
            held.close()
    finally:
        os.close(fd)


# -- what the kernel sees ----------------------------------------------------------------------

KPF_REFD, KPF_ACTIVE = 1 << 2, 1 << 6  # /proc/kpageflags bits PG_referenced and PG_active, as the Linux kernel documents them (pagemap)
MADV_COLD = 20


def _referenced(held) -> float:
    """Share of the mapping's present pages whose folio the kernel marks referenced or active."""
    import numpy as np

    n = -(-held.length // _platform.PAGE_SIZE)
    present, pfns = folios.page_frames(held.address, n)
    flags = folios.kpageflags(pfns, present)
    assert present.sum() > 0.99 * n  # the held mapping maps the whole (resident) file
    return float(np.count_nonzero(flags[present] & (KPF_REFD | KPF_ACTIVE))) / float(present.sum())


@pytest.mark.parametrize("warmed_by", ["warmpool", "small reads"])
def test_refresh_marks_every_held_folio_accessed(private_model, warmed_by):
    """The kernel's own flags: after MADV_COLD has cleared them, one refresh marks every folio
    referenced again, whether a default warm left them (2 MiB folios mapped by PMDs, 4 KiB ones
    at extent edges) or 64 KiB reads with readahead off (4 KiB folios, mapped by PTEs); the
    page walk alone leaves the PMD-mapped ones unmarked."""
    import ctypes

    why = folios.available()
    if why:
        pytest.skip(why)
    evict_file(private_model)
    if warmed_by == "warmpool":
        warmpool.warm(private_model)
    else:
        with open(private_model, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            while f.read(64 << 10):
                pass
    fd = os.open(private_model, os.O_RDONLY)
    try:
        held = _platform.HeldMapping(fd, 0, os.fstat(fd).st_size)
        try:
            held.populate(0, held.length)
            libc = ctypes.CDLL(None, use_errno=True)
            def cold() -> None:
                assert libc.madvise(ctypes.c_void_p(held.address), ctypes.c_size_t(held.length), MADV_COLD) == 0
                assert _referenced(held) < 0.05  # the control: MADV_COLD cleared the marks

            if warmed_by == "warmpool":
                cold()
                held.refresh(read_folios=False)
                assert _referenced(held) < 0.5  # the page walk alone leaves the PMD-mapped folios unmarked
            cold()
            held.refresh()
            assert _referenced(held) >= 0.99
        finally:
            held.close()
    finally:
        os.close(fd)


# -- the paced touch (hold="touch") ---------------------------------------------------------------


def _smaps_kb(address: int, field: str) -> int:
    """One field (kB) of this process's mapping that starts at ``address``."""
    with open("/proc/self/smaps") as f:
        text = f.read()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        if int(block.split("-", 1)[0], 16) == address:
            return int(re.search(rf"^{field}:\s+(\d+) kB", block, re.M).group(1))
    raise AssertionError(f"no mapping at {address:#x}")


def _kept(path, **options):
    """A keeper whose first warm ran in this thread (no keeper thread: the test drives it)."""
    keeper = warmpool.Keeper([path], hold="touch", **options)
    keeper._first_warm(keeper.models[0])
    assert keeper.models[0].held, "the first warm holds the selection"
    return keeper


def test_touch_reads_every_resident_held_page_and_none_of_the_evicted(private_model):
    """After clear_refs has cleared the accessed bits, one touch over the held selection marks
    every mapped page referenced again (smaps' Referenced), and reads back none of the pages
    MADV_PAGEOUT took out of the second half."""
    keeper = _kept(private_model)
    try:
        model = keeper.models[0]
        (file, start, held), = model.held  # the whole file: one extent, one mapping
        cut = (held.length // 2) >> 21 << 21  # a 2 MiB boundary: whole huge folios go
        page_out(held.address + cut, held.length - cut)
        out_before = resident_fraction(private_model, start + cut, held.length - cut)
        assert out_before < 0.5, out_before  # there is something the touch must not read
        with open("/proc/self/clear_refs", "w") as f:
            f.write("1")
        rss = _smaps_kb(held.address, "Rss")
        assert rss > 0 and _smaps_kb(held.address, "Referenced") < 0.05 * rss  # the control
        model.touch_resident(0, model.held_bytes())
        assert _smaps_kb(held.address, "Referenced") >= 0.99 * _smaps_kb(held.address, "Rss")
        out_after = resident_fraction(private_model, start + cut, held.length - cut)
        assert out_after <= out_before + 2 * _platform.PAGE_SIZE / (held.length - cut), (out_before, out_after)
    finally:
        keeper.stop()


def test_touch_spreads_each_pass_over_the_refresh_period(private_model):
    """Steps cover the share of a pass that the time since the last step is of the period; a
    pass ends after one period; a long gap covers one pass at most; and a pass that cost more
    than the CPU cap allows stretches the period (the cap is REFRESH_CPU_SHARE of a core)."""
    from warmpool._keep.keeper import REFRESH_CPU_SHARE, TOUCH_TICK

    keeper = _kept(private_model, refresh=1.0)
    try:
        total, page = keeper.models[0].held_bytes(), _platform.PAGE_SIZE
        now = 1000.0
        first = keeper._touch_step(now)  # no step before: one tick's share
        assert abs(first - total * TOUCH_TICK) <= page, (first, total)
        covered, steps = first, 0
        while keeper._touch_cost == 0.0:  # until the pass ends
            now += 0.1
            covered += keeper._touch_step(now)
            steps += 1
            assert steps <= 10, "a pass took more than its 1 s period"
        assert steps == 10 and covered >= total  # 0.02 s + 10 x 0.1 s: the pass ends in the tenth step
        assert keeper._touch_step(now + 60) <= total  # a long gap: one pass, not sixty
        keeper._touch_cost = 5 * REFRESH_CPU_SHARE  # as if a pass cost 5x the cap of a 1 s period
        assert abs(keeper._touch_step(now + 60.1) - total * 0.1 / 5) <= page
    finally:
        keeper.stop()
