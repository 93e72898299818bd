"""What tools/'s benchmarks share: evicting a file and checking it went cold, its residency,
timed child processes in paired rounds, an engine's first pass over the cache a method left,
a warm's memory, the synthetic bench models, and the options every timed benchmark takes
(``--wait-after-evict``, ``--no-page-reporting``).

Module level imports only the stdlib, so the engine pass's child pays for numpy, not for
warmpool; it is also a command of its own, printed by the benchmarks that use it::

    python tools/lib/measure.py engine-pass FILE   # fresh mapping, one byte per 4 KiB page: one JSON line
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "add_no_page_reporting",
    "add_wait_after_evict",
    "compile_bytecode",
    "engine_pass",
    "evict_file",
    "file_resident",
    "median_ci",
    "page_reporting_off",
    "peak_rss_anon",
    "rss_anon_tree",
    "synthetic_model",
    "timed_child",
    "timed_rounds",
    "warmpool_argv",
]

COLD = 0.001  # after eviction at most this fraction of the file may be resident


# -- statistics ---------------------------------------------------------------------------------


def median_ci(values, level: float = 0.95) -> tuple[float, float] | None:
    """A confidence interval for the median of ``values`` that assumes no distribution: the
    order statistics at the binomial(n, 1/2) ranks whose tails hold at most (1 - level) / 2 each.
    None with too few values for one (fewer than 6 at 95%).  On this shared VM the paired ratio
    of one round moves by +-10%: a median of 3 or 5 rounds tells little without it."""
    xs = sorted(values)
    n, tail, k, below = len(xs), (1 - level) / 2, 0, 0.0
    while k < n and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    return (xs[k - 1], xs[n - k]) if k else None


# -- options --------------------------------------------------------------------------------


def add_wait_after_evict(parser) -> None:
    """``--wait-after-evict SECONDS``: on a VM with free page reporting a cold read that starts
    seconds after the eviction must have its memory backed by the host again (README, "Device
    speed depends on when the eviction happened")."""
    def seconds(text: str) -> float:
        value = float(text)
        if value < 0:
            raise ValueError(text)
        return value
    seconds.__name__ = "non-negative number of seconds"  # argparse names the type in its error

    parser.add_argument("--wait-after-evict", type=seconds, default=0.0, metavar="SECONDS",
                        help="seconds between each eviction and what follows it (default 0)")


def add_no_page_reporting(parser) -> None:
    """The ``--no-page-reporting`` option, for ``page_reporting_off(args.no_page_reporting)``."""
    parser.add_argument("--no-page-reporting", action="store_true",
                        help="switch the VM's free page reporting off for the run (root; restored after)")


@contextlib.contextmanager
def page_reporting_off(active: bool = True):
    """Free page reporting switched off for the block (when ``active``), then restored: order 11
    is above the buddy allocator's largest block (MAX_PAGE_ORDER 10), so
    ``page_reporting_process_zone`` finds nothing to report and memory an eviction frees stays
    backed by the host."""
    from warmpool._platform.proc import PAGE_REPORTING_ORDER, page_reporting_order

    before, path = page_reporting_order(), Path("/sys", PAGE_REPORTING_ORDER)
    if not active or before is None:
        yield
        return
    try:
        path.write_text("11")
    except OSError as e:
        raise SystemExit(f"{path}: cannot switch free page reporting off ({e.strerror}; needs root)")
    try:
        yield
    finally:
        path.write_text(str(before))


# -- models -----------------------------------------------------------------------------------


def synthetic_model(shape, filename: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """``warmpool.example``'s MoE of ``shape`` as ``directory/filename`` (default: the bench
    cache, ``$WARMPOOL_CACHE/bench`` else ``~/.cache/warmpool/bench``), written once behind a
    lock and reused while its size matches."""
    from warmpool.example import _cache_dir, model_nbytes, write_moe_gguf

    base = Path(directory) if directory else _cache_dir(None) / "bench"
    base.mkdir(parents=True, exist_ok=True)
    path = base / filename
    with open(base / (filename + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists() or path.stat().st_size != model_nbytes(shape):
            print(f"generating {path} ({model_nbytes(shape) / 1e9:.2f} GB, once) ...", file=sys.stderr, flush=True)
            write_moe_gguf(path, shape)
    return path


# -- eviction and residency -------------------------------------------------------------------


def file_resident(path: str | os.PathLike[str]) -> float:
    """Fraction of the whole file in the page cache (mincore; reads nothing)."""
    from warmpool import _platform

    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return _platform.resident_bytes(fd, 0, 0) / size if size else 1.0
    finally:
        os.close(fd)


def evict_file(path: str | os.PathLike[str]) -> float:
    """Drop the whole file from the page cache; return the fraction still resident.

    fdatasync first: DONTNEED skips dirty pages (a freshly written model is all dirty).  FUSE
    may not implement fsync; its pages are clean anyway.
    """
    from warmpool import _platform

    for _ in range(10):
        _platform.evict_file(path)
        left = file_resident(path)
        if left <= COLD:
            break
        time.sleep(0.2)  # pages under read-in or still mapped by an exiting child
    return left


# -- timed children -----------------------------------------------------------------------------


def warmpool_argv() -> list[str]:
    """The installed ``warmpool`` entry point next to this interpreter (no pyenv/venv shim in
    the timing), else the one on PATH, else ``python -m warmpool``."""
    beside = Path(sys.executable).with_name("warmpool")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("warmpool")
    return [found] if found else [sys.executable, "-m", "warmpool"]


def compile_bytecode(checkout: str | os.PathLike) -> None:
    """Write the bytecode of ``checkout``'s warmpool, as ``pip install`` does: a tree without
    it (an editable install under ``PYTHONDONTWRITEBYTECODE``, as on the project's VM) compiles
    each changed module from source in every timed process, 20 ms of a warm's start-up."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(checkout) / "warmpool")], env=env,
                   stdout=subprocess.DEVNULL, check=False)


def timed_child(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run argv to completion (output discarded, failure raised): (wall seconds from spawn to
    exit, CPU seconds of it and every process it waited for, from ``RUSAGE_CHILDREN``)."""
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(list(argv), env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def timed_rounds(path: str, ways: dict[str, Sequence[str] | tuple[Sequence[str], dict[str, str] | None]],
                 rounds: int, wait_s: float = 0.0,
                 after: Callable[[str, dict], None] | None = None) -> list[dict]:
    """Paired rounds: each runs every way once (``timed_child``), in an order rotated by one per
    round so that no way always runs first, each after its own eviction of ``path`` and
    ``wait_s``.  A way is an argv, or (argv, environment).  One JSON line per run is printed and
    returned ({"round", "way", "wall_s", "cpu_s"}); ``after(name, run)`` may add to it."""
    names, runs = list(ways), []
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            evict_file(path)
            time.sleep(wait_s)
            way = ways[name]
            argv, env = way if isinstance(way, tuple) else (way, None)
            wall, cpu = timed_child(argv, env)
            run = {"round": r, "way": name, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}
            if after is not None:
                after(name, run)
            runs.append(run)
            print(json.dumps(run), flush=True)
    return runs


# -- what a warm leaves an engine -------------------------------------------------------------


def _engine_pass_child(path: str) -> None:
    import mmap

    import numpy as np

    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    pages = np.frombuffer(m, np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    int(pages[::4096].sum())
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"minor_faults": after.ru_minflt - before.ru_minflt,
                      "major_faults": after.ru_majflt - before.ru_majflt, "seconds": round(seconds, 4)}))


def engine_pass(path: str | os.PathLike[str]) -> dict:
    """An engine's first request over every weight: a fresh process maps the file (no
    MAP_POPULATE) and reads one byte per 4 KiB page.  Its minor and major faults (getrusage)
    and the time of the pass alone (numpy's import excluded), as {"minor_faults",
    "major_faults", "seconds"}: few faults mean large folios (docs/folios.md)."""
    out = subprocess.run([sys.executable, __file__, "engine-pass", os.fspath(path)], capture_output=True,
                         text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- memory of a warm -------------------------------------------------------------------------


def rss_anon_tree(pid: int) -> tuple[int, int]:
    """(RssAnon in bytes, processes) of a process and its live descendants; (0, 0) once it is gone."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
        except (OSError, StopIteration, ValueError):
            pass
    return total, len(procs)


def peak_rss_anon(argv: Sequence[str], interval_s: float = 0.01) -> tuple[int, int, float]:
    """Run argv; sample RssAnon of it plus its descendants every interval.

    Returns (peak total RssAnon in bytes, most processes seen at once, wall seconds).  Run
    apart from the timed rounds: scanning /proc costs CPU that would distort the timing.
    """
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    peak = most = 0
    started = time.perf_counter()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, most
        while not done.is_set():
            rss, procs = rss_anon_tree(proc.pid)
            peak, most = max(peak, rss), max(most, procs)
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc.wait()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return peak, most, seconds


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "engine-pass":
        raise SystemExit(f"usage: python {sys.argv[0]} engine-pass FILE")
    _engine_pass_child(sys.argv[2])
