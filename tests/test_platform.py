"""The OS layer against the real page cache: evict, act, then measure with mincore.

Every test writes its own file under tmp_path, so parallel xdist workers never evict
each other's pages.  Nothing here mocks the kernel.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

from warmpool import _platform, _platform_posix
from warmpool._errors import FileChangedError, PlatformError
from warmpool._platform import (
    PAGE_SIZE,
    FileWindow,
    advise_random,
    cached_bytes,
    evict,
    prefetch,
    read_range,
    readahead_size,
    resident_bytes,
    resident_pages,
    supports_cachestat,
    supports_populate,
)

MiB = 1 << 20
SIZE = 32 * MiB
ROOT = Path(__file__).parents[1]


class ColdFile(NamedTuple):
    path: Path
    fd: int
    size: int


def write_random(path: Path, size: int) -> None:
    """Random bytes (no holes a filesystem could skip), on disk, not just in cache."""
    with open(path, "wb") as f:
        for done in range(0, size, MiB):
            f.write(os.urandom(min(MiB, size - done)))
        f.flush()
        os.fsync(f.fileno())


def open_cold(path: Path, size: int) -> ColdFile:
    write_random(path, size)
    fd = os.open(path, os.O_RDONLY)
    evict(fd, 0, 0)
    return ColdFile(path, fd, size)


@pytest.fixture
def cold(tmp_path: Path) -> Iterator[ColdFile]:
    """A private 32 MiB file, written, synced and evicted."""
    file = open_cold(tmp_path / "data.bin", SIZE)
    yield file
    os.close(file.fd)


def outside(fd: int, start: int, end: int, size: int) -> int:
    """Resident bytes of the file outside [start, end)."""
    before = resident_bytes(fd, 0, start) if start else 0  # length 0 would mean "to EOF"
    return before + resident_bytes(fd, end, size - end)


def wait_until_resident(fd: int, offset: int, length: int, timeout: float = 20.0) -> int:
    """Resident bytes of the range once all of it is resident, or at the timeout
    (prefetch only queues the reads)."""
    deadline = time.monotonic() + timeout
    while (now := resident_bytes(fd, offset, length)) < length and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


# -- eviction and warming ------------------------------------------------------------


@pytest.mark.pagecache
def test_evict_leaves_nothing_resident(cold: ColdFile) -> None:
    with FileWindow(cold.fd, 0, SIZE) as window:
        window.populate(0, SIZE)
    assert resident_bytes(cold.fd, 0, 0) == SIZE
    evict(cold.fd, 0, 0)
    assert resident_bytes(cold.fd, 0, 0) <= 2 * PAGE_SIZE


@pytest.mark.pagecache
def test_evict_of_a_range_widens_to_whole_pages(cold: ColdFile) -> None:
    with FileWindow(cold.fd, 0, SIZE) as window:
        window.populate(0, SIZE)
    evict(cold.fd, MiB + 100, 3 * PAGE_SIZE)  # touches 4 pages
    pages = resident_pages(cold.fd, 0, 0)
    first = MiB // PAGE_SIZE
    assert pages[first : first + 4] == b"\0" * 4
    assert pages.count(0) == 4


@pytest.mark.pagecache
def test_populate_whole_window_makes_it_resident(cold: ColdFile) -> None:
    with FileWindow(cold.fd, 0, SIZE) as window:
        assert window.resident() == b"\0" * (SIZE // PAGE_SIZE)
        window.populate(0, SIZE)
        assert window.resident() == b"\1" * (SIZE // PAGE_SIZE)
    assert resident_bytes(cold.fd, 0, 0) == SIZE


@pytest.mark.pagecache
def test_touch_makes_window_resident(cold: ColdFile) -> None:
    with FileWindow(cold.fd, 4 * MiB, 8 * MiB) as window:
        window.touch(0, 8 * MiB)
    assert resident_bytes(cold.fd, 4 * MiB, 8 * MiB) == 8 * MiB


@pytest.mark.pagecache
def test_random_read_range_reads_exactly_the_range(cold: ColdFile) -> None:
    # REFERENCE §7: plain pread also read 12 MiB past the range; FADV_RANDOM stops it.
    advise_random(cold.fd)
    read_range(cold.fd, 12 * MiB, 8 * MiB, bytearray(MiB))
    assert resident_bytes(cold.fd, 12 * MiB, 8 * MiB) == 8 * MiB
    assert outside(cold.fd, 12 * MiB, 20 * MiB, SIZE) <= 2 * PAGE_SIZE


@pytest.mark.pagecache
def test_prefetch_then_populate_stays_inside_the_range(cold: ColdFile) -> None:
    # Populate alone read ~4 MiB either side (mmap read-around); after prefetch the
    # faults find every page already in the cache.
    start, length = 12 * MiB, 8 * MiB
    prefetch(cold.fd, start, length)
    with FileWindow(cold.fd, start, length) as window:
        window.populate(0, length)
    assert resident_bytes(cold.fd, start, length) == length
    assert outside(cold.fd, start, start + length, SIZE) <= (SIZE - length) // 100


@pytest.mark.pagecache
def test_prefetch_reads_the_whole_range_not_one_readahead(cold: ColdFile) -> None:
    # One WILLNEED is cut to the readahead size; prefetch steps past that cap.
    start, length = 4 * MiB, 24 * MiB
    assert length > readahead_size(cold.fd)
    prefetch(cold.fd, start, length)
    assert wait_until_resident(cold.fd, start, length) == length
    assert outside(cold.fd, start, start + length, SIZE) <= 2 * PAGE_SIZE


@pytest.mark.pagecache
def test_prefetch_to_eof_on_a_random_fd(cold: ColdFile) -> None:
    advise_random(cold.fd)  # FADV_RANDOM does not shrink the WILLNEED cap
    prefetch(cold.fd, 0, 0)
    assert wait_until_resident(cold.fd, 0, SIZE) == SIZE


@pytest.mark.pagecache
def test_willneed_is_only_a_hint(cold: ColdFile) -> None:
    with FileWindow(cold.fd, 0, SIZE) as window:
        window.willneed(0, SIZE)
    assert 0 <= resident_bytes(cold.fd, 0, SIZE) <= SIZE  # how much: the kernel's choice


# -- measurement ---------------------------------------------------------------------


def warm_first_half(file: ColdFile) -> None:
    # Synchronous and exact.  (Not populate + evict of the rest: populate's async
    # readahead can still be in flight, and DONTNEED skips pages under I/O.)
    advise_random(file.fd)
    read_range(file.fd, 0, file.size // 2, bytearray(MiB))


@pytest.mark.pagecache
def test_resident_pages_on_a_half_warm_file(cold: ColdFile) -> None:
    warm_first_half(cold)
    n = SIZE // PAGE_SIZE
    assert resident_pages(cold.fd, 0, 0) == b"\1" * (n // 2) + b"\0" * (n // 2)
    assert resident_pages(cold.fd, 0, SIZE) == resident_pages(cold.fd, 0, 0)
    # unaligned: [half - 100, half + 100) covers the last warm and the first cold page
    assert resident_pages(cold.fd, SIZE // 2 - 100, 200) == b"\1\0"
    # clipped at EOF
    assert resident_pages(cold.fd, SIZE - 10, 10 * MiB) == b"\0"
    assert resident_pages(cold.fd, SIZE, MiB) == b""
    assert resident_bytes(cold.fd, 0, 0) == SIZE // 2
    assert resident_bytes(cold.fd, SIZE // 2 - 100, 200) == PAGE_SIZE


@pytest.mark.pagecache
def test_resident_pages_spans_several_mapping_windows(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(_platform_posix, "_RESIDENCY_WINDOW", MiB)
    file = open_cold(tmp_path / "data.bin", 8 * MiB)
    try:
        advise_random(file.fd)
        read_range(file.fd, 3 * MiB, 3 * MiB, bytearray(MiB))
        pages = resident_pages(file.fd, MiB // 2, 7 * MiB)
        assert len(pages) == 7 * MiB // PAGE_SIZE
        before = (3 * MiB - MiB // 2) // PAGE_SIZE
        assert pages == b"\0" * before + b"\1" * (3 * MiB // PAGE_SIZE) + b"\0" * (3 * MiB // 2 // PAGE_SIZE)
    finally:
        os.close(file.fd)


@pytest.mark.pagecache
@pytest.mark.skipif(not supports_cachestat(), reason="cachestat(2) unavailable")
def test_cached_bytes_agrees_with_resident_bytes(cold: ColdFile) -> None:
    warm_first_half(cold)
    ranges = [(0, 0), (0, SIZE), (0, SIZE // 2), (SIZE // 2, SIZE // 2),
              (SIZE // 2 - 5000, 12345), (SIZE - 1, 1), (3 * MiB + 7, 0)]
    for offset, length in ranges:
        mincore = resident_pages(cold.fd, offset, length).count(1) * PAGE_SIZE
        assert cached_bytes(cold.fd, offset, length) == resident_bytes(cold.fd, offset, length)
        assert resident_bytes(cold.fd, offset, length) == mincore


@pytest.mark.pagecache
def test_partial_last_page_counts_only_file_bytes(tmp_path: Path) -> None:
    file = open_cold(tmp_path / "odd.bin", MiB + 100)
    try:
        read_range(file.fd, 0, file.size, bytearray(MiB))
        assert len(resident_pages(file.fd, 0, 0)) == MiB // PAGE_SIZE + 1
        assert resident_bytes(file.fd, 0, 0) == file.size
        assert cached_bytes(file.fd, 0, 0) in (None, file.size)
    finally:
        os.close(file.fd)


# -- a file that changes under us ----------------------------------------------------


@pytest.mark.pagecache
def test_populate_on_a_truncated_file_raises_file_changed(cold: ColdFile) -> None:
    with FileWindow(cold.fd, 0, SIZE) as window:
        os.truncate(cold.path, 4 * MiB)
        window.populate(0, 4 * MiB)  # what is still file is fine
        with pytest.raises(FileChangedError, match="shrank"):
            window.populate(0, SIZE)


@pytest.mark.pagecache
def test_touch_on_a_truncated_file_dies_of_sigbus(cold: ColdFile) -> None:
    # Why the pool touches only in worker processes: the kernel kills the toucher.
    code = (
        "import os\n"
        "from warmpool._platform import FileWindow\n"
        f"fd = os.open({str(cold.path)!r}, os.O_RDONLY)\n"
        f"window = FileWindow(fd, 0, {SIZE})\n"
        f"os.truncate({str(cold.path)!r}, {PAGE_SIZE})\n"
        f"window.touch(0, {SIZE})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    assert done.returncode == -signal.SIGBUS, done.stderr


def test_read_range_on_a_truncated_file_raises_file_changed(cold: ColdFile) -> None:
    os.truncate(cold.path, 5 * MiB + 3)
    with pytest.raises(FileChangedError, match="shrank"):
        read_range(cold.fd, 0, SIZE, bytearray(MiB))
    read_range(cold.fd, 0, 5 * MiB + 3, bytearray(MiB))  # up to the new end is fine


# -- argument and state errors -------------------------------------------------------


def test_window_misuse_raises_platform_error(cold: ColdFile) -> None:
    with pytest.raises(PlatformError, match="start on a page"):
        FileWindow(cold.fd, 100, PAGE_SIZE)
    with pytest.raises(PlatformError, match="non-empty"):
        FileWindow(cold.fd, 0, 0)
    window = FileWindow(cold.fd, PAGE_SIZE, MiB)
    assert window.address % PAGE_SIZE == 0 and (window.offset, window.length) == (PAGE_SIZE, MiB)
    with pytest.raises(PlatformError, match="outside window"):
        window.populate(MiB - PAGE_SIZE, 2 * PAGE_SIZE)
    window.close()
    window.close()  # idempotent
    with pytest.raises(PlatformError, match="closed"):
        window.populate(0, PAGE_SIZE)


def test_bad_descriptor_raises_platform_error() -> None:
    with pytest.raises(PlatformError):
        resident_pages(-1, 0, 0)
    with pytest.raises(PlatformError):
        read_range(-1, 0, 10, bytearray(4))
    with pytest.raises(PlatformError):
        evict(-1, 0, 0)


def test_read_range_needs_a_buffer(cold: ColdFile) -> None:
    with pytest.raises(PlatformError, match="buffer"):
        read_range(cold.fd, 0, PAGE_SIZE, bytearray())


# -- features, backends, import cost -------------------------------------------------


def test_readahead_size_is_a_positive_page_multiple(cold: ColdFile) -> None:
    size = readahead_size(cold.fd)
    assert size > 0 and size % PAGE_SIZE == 0
    assert readahead_size(cold.fd) == size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux kernel features")
def test_linux_features_match_the_notes() -> None:
    release = tuple(int(part) for part in os.uname().release.split(".")[:2])
    if release >= (5, 14):
        assert supports_populate()
    notes = " ".join(_platform.platform_notes())
    assert ("MADV_POPULATE_READ" in notes) != supports_populate()
    assert ("cachestat" in notes) != supports_cachestat()


def test_posix_fallback_reports_what_it_lacks(cold: ColdFile) -> None:
    posix = _platform_posix
    assert not posix.supports_populate() and not posix.supports_cachestat()
    assert posix.cached_bytes(cold.fd, 0, 0) is None
    assert any("MADV_POPULATE_READ" in note for note in posix.platform_notes())
    assert posix.readahead_size(cold.fd) == posix.DEFAULT_READAHEAD
    with posix.FileWindow(cold.fd, 0, MiB) as window, pytest.raises(PlatformError):
        window.populate(0, MiB)
    posix.advise_random(cold.fd)
    posix.read_range(cold.fd, 0, MiB, bytearray(MiB // 4))
    assert posix.resident_pages(cold.fd, 0, 0) == resident_pages(cold.fd, 0, 0)
    assert posix.resident_bytes(cold.fd, 0, 0) == MiB


def test_facade_exports_the_same_names_as_each_backend() -> None:
    assert _platform.__all__ == sorted(_platform.__all__)
    for backend in (_platform._backend, _platform_posix):
        assert backend.__all__ == sorted(backend.__all__)
        assert set(_platform.__all__) <= set(backend.__all__)


def test_import_is_stdlib_only() -> None:
    # Import the three modules without the package __init__ (not ours to measure).
    code = (
        "import sys, types\n"
        "package = types.ModuleType('warmpool'); package.__path__ = ['warmpool']\n"
        "sys.modules['warmpool'] = package; before = set(sys.modules)\n"
        "import warmpool._platform\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "sys.exit(sorted(new - set(sys.stdlib_module_names) - {'warmpool'}) or None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
