"""Readahead and hints against the real page cache: what prefetch, WILLNEED and pread read.

The kernel facts these check are in docs/design.md ("Readahead and hints").  Each test works on
its own evicted file (the ``cold`` fixture) and says exactly what was read with the task's
disk-read counter, which the VM's background reclaim cannot touch (see test_platform).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import SIZE, ColdFile, MiB, bytes_read_by, outside, wait_until_resident

from warmpool._platform import (
    PAGE_SIZE,
    FileWindow,
    advise_random,
    prefetch,
    read_range,
    readahead_size,
    resident_bytes,
)


@pytest.mark.pagecache
def test_random_read_range_reads_exactly_the_range(cold: ColdFile) -> None:
    # Plain pread reads ahead past its range; FADV_RANDOM stops it (docs/design.md).
    advise_random(cold.fd)
    got = bytes_read_by(lambda: read_range(cold.fd, 12 * MiB, 8 * MiB, bytearray(MiB)))
    assert got in (None, 8 * MiB)
    assert resident_bytes(cold.fd, 12 * MiB, 8 * MiB) >= 8 * MiB * 9 // 10  # less: reclaim
    assert outside(cold.fd, 12 * MiB, 20 * MiB, SIZE) <= 2 * PAGE_SIZE


@pytest.mark.pagecache
def test_prefetch_then_populate_stays_inside_the_range(cold: ColdFile) -> None:
    # Populate alone reads well past both ends (mmap read-around: 24 MiB resident for
    # this 8 MiB window); after prefetch the faults find every page in the cache.
    start, length = 12 * MiB, 8 * MiB

    def warm() -> None:
        prefetch(cold.fd, start, length)
        with FileWindow(cold.fd, start, length) as window:
            window.populate(0, length)
            assert resident_bytes(cold.fd, start, length) == length

    assert bytes_read_by(warm) in (None, length)
    assert outside(cold.fd, start, start + length, SIZE) <= (SIZE - length) // 100


@pytest.mark.pagecache
def test_prefetch_reads_the_whole_range_not_one_readahead(cold: ColdFile) -> None:
    # One WILLNEED is cut to the readahead size (8 MiB here); prefetch steps past it.
    start, length = 4 * MiB, 24 * MiB
    assert length > readahead_size(cold.fd)
    assert bytes_read_by(lambda: prefetch(cold.fd, start, length)) in (None, length)
    assert wait_until_resident(cold.fd, start, length, length * 9 // 10)  # less: reclaim
    assert outside(cold.fd, start, start + length, SIZE) <= 2 * PAGE_SIZE


@pytest.mark.pagecache
def test_prefetch_to_eof_on_a_random_fd(cold: ColdFile) -> None:
    advise_random(cold.fd)  # FADV_RANDOM does not shrink the WILLNEED cap
    assert bytes_read_by(lambda: prefetch(cold.fd, 0, 0)) in (None, SIZE)


def willneed_cap(fd: int) -> int:
    """What one WILLNEED reads at most: max(bdi io_pages, ra_pages) (force_page_cache_ra in
    mm/readahead.c); io_pages is the device's max_sectors_kb, where sysfs has one."""
    dev = os.fstat(fd).st_dev
    node = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    io_bytes = 0
    for queue in (f"{node}/queue", f"{node}/../queue"):
        try:
            io_bytes = int(Path(queue, "max_sectors_kb").read_text()) * 1024
            break
        except (OSError, ValueError):
            continue
    return max(readahead_size(fd), io_bytes)


@pytest.mark.pagecache
@pytest.mark.parametrize(("offset", "length"), [(4 * MiB, MiB), (0, SIZE), (3 * MiB, 12 * MiB)])
def test_willneed_reads_exactly_the_range_up_to_the_cap(cold: ColdFile, offset: int, length: int) -> None:
    # A hint, and a capped one: it reads exactly [offset, offset + min(length, cap)), nothing else.
    want = min(length, willneed_cap(cold.fd))
    with FileWindow(cold.fd, offset, length) as window:
        assert bytes_read_by(lambda: window.willneed(0, length)) in (None, want)
    assert wait_until_resident(cold.fd, offset, want, want * 9 // 10)  # less: reclaim
    assert outside(cold.fd, offset, offset + want, SIZE) == 0
