"""The keeper's refresh: that it maps the resident pages and reads none of the evicted ones,
and that the kernel then sees every held folio referenced (/proc/kpageflags, root only), which
is what LRU reclaim asks before it takes a mapped file folio.  Under real pressure it is
measured by tools/keep_bench.py (docs/keep.md)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

import warmpool
from conftest import MiB, evict_file, resident_fraction, write_random
from warmpool import _platform
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import folios  # noqa: E402

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

    page = _platform.PAGE_SIZE
    n = -(-held.length // page)
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        entries = np.frombuffer(os.pread(pagemap.fileno(), n * 8, held.address // page * 8), dtype=np.uint64)
    present = (entries >> np.uint64(63)) != 0
    pfns = (entries & np.uint64((1 << 55) - 1)).astype(np.int64)
    flags = folios._kpageflags(pfns, present)
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
