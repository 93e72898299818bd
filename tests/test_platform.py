"""The OS layer against the real page cache: evict, act, then measure with mincore.

Every test writes its own file under tmp_path, so parallel xdist workers never evict
each other's pages.  Nothing here mocks the kernel.

Background reclaim: this VM runs a DAMON "pageout" scheme on idle, *unmapped* page
cache, so pages that were read but are not mapped can vanish at any moment (512 MiB
idle lost 11% in 5.5 min; a few hundred pages went within a second of a read).  Mapped
pages are exempt.  So the tests say exactly what was read with the task's disk-read
counter (``/proc/self/io``, which reclaim cannot touch), and they keep warm ranges
mapped (``pinned``) while claiming they are resident.  Reclaim only ever lowers
residency, so "nothing outside the range" claims need no such care.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from conftest import SIZE, ColdFile, MiB, open_cold, pinned

from warmpool import _platform
from warmpool._errors import FileChangedError, PlatformError
from warmpool._platform import (
    PAGE_SIZE,
    FileWindow,
    advise_random,
    cached_bytes,
    evict,
    read_range,
    readahead_size,
    resident_bytes,
    resident_pages,
    supports_cachestat,
    supports_populate,
)
from warmpool._platform import posix as _platform_posix

ROOT = Path(__file__).parents[1]


# -- eviction and warming ------------------------------------------------------------


@pytest.mark.pagecache
def test_evict_leaves_nothing_resident(cold: ColdFile) -> None:
    with pinned(cold.fd, 0, SIZE):
        assert resident_bytes(cold.fd, 0, 0) == SIZE
    evict(cold.fd, 0, 0)
    assert resident_bytes(cold.fd, 0, 0) <= 2 * PAGE_SIZE


@pytest.mark.pagecache
def test_evict_of_a_range_widens_to_whole_pages(cold: ColdFile) -> None:
    # Pin the two neighbours (mapped pages survive DONTNEED); their read-around warms
    # the four pages between, which are not mapped.
    with pinned(cold.fd, MiB - PAGE_SIZE, PAGE_SIZE), pinned(cold.fd, MiB + 4 * PAGE_SIZE, PAGE_SIZE):
        assert resident_pages(cold.fd, MiB - PAGE_SIZE, 6 * PAGE_SIZE) == b"\1" * 6
        evict(cold.fd, MiB + 100, 3 * PAGE_SIZE)  # partly covers pages first and first+3
        assert resident_pages(cold.fd, MiB - PAGE_SIZE, 6 * PAGE_SIZE) == b"\1\0\0\0\0\1"


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
        assert window.resident() == b"\1" * (8 * MiB // PAGE_SIZE)


# -- measurement ---------------------------------------------------------------------


@contextmanager
def half_warm(file: ColdFile) -> Iterator[None]:
    """The first half exactly resident (and pinned), the second half cold."""
    advise_random(file.fd)  # exact and synchronous, unlike populate's read-around
    read_range(file.fd, 0, file.size // 2, bytearray(MiB))
    with pinned(file.fd, 0, file.size // 2):
        yield


@pytest.mark.pagecache
def test_resident_pages_on_a_half_warm_file(cold: ColdFile) -> None:
    n = SIZE // PAGE_SIZE
    with half_warm(cold):
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
        with pinned(file.fd, 3 * MiB, 3 * MiB):
            pages = resident_pages(file.fd, MiB // 2, 7 * MiB)
        cold_before, warm, cold_after = (2 * MiB + MiB // 2, 3 * MiB, MiB + MiB // 2)
        assert pages == b"\0" * (cold_before // PAGE_SIZE) + b"\1" * (warm // PAGE_SIZE) + b"\0" * (
            cold_after // PAGE_SIZE)
    finally:
        os.close(file.fd)


@pytest.mark.pagecache
@pytest.mark.skipif(not supports_cachestat(), reason="cachestat(2) unavailable")
def test_cached_bytes_agrees_with_resident_bytes(cold: ColdFile) -> None:
    ranges = [(0, 0), (0, SIZE), (0, SIZE // 2), (SIZE // 2, SIZE // 2),
              (SIZE // 2 - 5000, 12345), (SIZE - 1, 1), (3 * MiB + 7, 0)]
    with half_warm(cold):
        for offset, length in ranges:
            mincore = resident_pages(cold.fd, offset, length).count(1) * PAGE_SIZE
            assert cached_bytes(cold.fd, offset, length) == resident_bytes(cold.fd, offset, length)
            assert resident_bytes(cold.fd, offset, length) == mincore


@pytest.mark.pagecache
def test_partial_last_page_counts_only_file_bytes(tmp_path: Path) -> None:
    file = open_cold(tmp_path / "odd.bin", MiB + 100)
    try:
        with pinned(file.fd, 0, file.size):
            assert len(resident_pages(file.fd, 0, 0)) == MiB // PAGE_SIZE + 1
            assert resident_bytes(file.fd, 0, 0) == file.size
            assert cached_bytes(file.fd, 0, 0) in (None, file.size)
    finally:
        os.close(file.fd)


# -- a file that changes under us ----------------------------------------------------


@pytest.mark.pagecache
@pytest.mark.parametrize("method", ["populate", "read_pages"])
def test_populate_or_read_pages_on_a_truncated_file_raises_file_changed(cold: ColdFile, method: str) -> None:
    # read_pages: the kernel reads the bytes (pwritev from the mapping on Linux), so a page
    # past EOF is an error there, not SIGBUS in this process.
    if method == "read_pages" and not sys.platform.startswith("linux"):
        pytest.skip("the kernel-side read_pages is Linux's; elsewhere it touches, like touch")
    with FileWindow(cold.fd, 0, SIZE) as window:
        os.truncate(cold.path, 4 * MiB)
        getattr(window, method)(0, 4 * MiB)  # what is still file is fine
        with pytest.raises(FileChangedError, match="shrank"):
            getattr(window, method)(0, SIZE)


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


@pytest.mark.pagecache
def test_read_pages_reads_every_page(cold: ColdFile) -> None:
    # read_pages exists to load each page with the CPU; on a cold window that faults every page in.
    with FileWindow(cold.fd, 4 * MiB, 8 * MiB) as window:
        window.read_pages(0, 8 * MiB)
        assert window.resident() == b"\1" * (8 * MiB // PAGE_SIZE)


@pytest.mark.pagecache
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the memfd sink of read_pages is Linux's")
def test_read_pages_from_short_lived_threads_leaves_no_descriptor(cold: ColdFile) -> None:
    # Each thread writes into a memfd of its own (threads sharing one took turns on its inode
    # lock); a worker's fault threads live for one chunk, so each one's memfd must go with it.
    import threading

    def memfds() -> int:
        return sum("warmpool-read-pages" in os.readlink(f"/proc/self/fd/{fd}")
                   for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))

    before, seen = memfds(), []
    with FileWindow(cold.fd, 0, 8 * MiB) as window:
        for i in range(8):
            def read(i: int = i) -> None:
                window.read_pages(i * MiB, MiB)
                seen.append(memfds())
            thread = threading.Thread(target=read)
            thread.start()
            thread.join()
        assert window.resident() == b"\1" * (8 * MiB // PAGE_SIZE)
    assert seen == [before + 1] * 8  # the thread's own memfd while it runs, as read_pages uses it
    assert memfds() == before


@pytest.mark.pagecache
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
    major, minor = re.match(r"(\d+)\.(\d+)", os.uname().release).groups()
    if (int(major), int(minor)) >= (5, 14):
        assert supports_populate()
    notes = " ".join(_platform.platform_notes())
    assert ("MADV_POPULATE_READ" in notes) != supports_populate()
    assert ("cachestat" in notes) != supports_cachestat()


@pytest.mark.pagecache
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
    with pinned(cold.fd, 0, MiB):
        assert posix.resident_pages(cold.fd, 0, 0) == resident_pages(cold.fd, 0, 0)
        assert posix.resident_bytes(cold.fd, 0, 0) == MiB


FACADE_ONLY = {"evict_file", "evict_ranges", "open_model", "page_runs"}  # composed in the facade, or pure (page_runs)


def test_facade_exports_the_same_names_as_each_backend() -> None:
    from warmpool._platform import (  # the keeper's calls: one module each under both backends
        blockdev,
        mapping,
        proc,
    )

    assert _platform.__all__ == sorted(_platform.__all__)
    for backend in (_platform._backend, _platform_posix):
        assert backend.__all__ == sorted(backend.__all__)
        assert set(_platform.__all__) - FACADE_ONLY - set(mapping.__all__) - set(proc.__all__) - set(blockdev.__all__) <= set(backend.__all__)


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
