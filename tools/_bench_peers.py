"""The methods ``bench_warm.py`` compares, how each one is run, and how a run is measured.

Every method is one child process, timed from spawn to exit: the whole cost a user pays,
interpreter start-up and imports included (warmpool runs through its real CLI).  Before each
run the file is evicted (fdatasync, then POSIX_FADV_DONTNEED) and mincore must report it
cold; after it, mincore reports what the method actually left resident (docs/design.md, "Benchmark peers").

The three Python peers live here too, so their exact command can be printed and re-run::

    python tools/_bench_peers.py stride FILE     # numpy, one byte per 4 KiB of the mapping
    python tools/_bench_peers.py willneed FILE   # one madvise(MADV_WILLNEED) over the whole mapping
    python tools/_bench_peers.py seed FILE       # first and last byte of each tensor

Module level imports only the stdlib: a child pays for numpy or warmpool only if it uses them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "Method",
    "Sample",
    "after_effects",
    "catalogue",
    "evict_file",
    "file_resident",
    "peak_rss_anon",
    "run_method",
    "timed_child",
    "timed_rounds",
    "unavailable",
    "warmpool_argv",
]

HERE = Path(__file__).resolve().parent
FILE = "{file}"  # placeholder in a method's argv
SETTLE_S = 1.0  # a hint's reads complete asynchronously: measure residency this long after it
COLD = 0.001  # after eviction at most this fraction of the file may be resident
ENGINE_MIN_RESIDENT = 0.99  # the engine pass runs only after methods that left the file this warm


class Method(NamedTuple):
    key: str  # name for --methods
    label: str  # name in tables and JSON
    family: str  # "warmpool", "peer", "hint" (leaves pages cold by design) or "limit" (fio)
    argv: tuple[str, ...]  # FILE stands for the file
    requires: str | None = None  # executable or module that must exist ("install X" if not)
    local_only: bool = False  # direct I/O: not on FUSE
    settle_s: float = 0.0

    def command(self, path: str | os.PathLike[str]) -> list[str]:
        return [a.replace(FILE, os.fspath(path)) for a in self.argv]

    def shown(self) -> str:
        """The command as README prints it, with the interpreter and tool paths shortened."""
        words = [a.replace(FILE, "FILE") for a in self.argv]
        words[0] = os.path.basename(words[0])
        if words[0].startswith("python"):
            words[0] = "python"
        if len(words) > 1 and words[1] == str(HERE / "_bench_peers.py"):
            words[1] = "tools/_bench_peers.py"
        return shlex.join(words)


class Sample(NamedTuple):
    method: str
    storage: str
    round_no: int
    seconds: float | None  # None: the run failed (see error)
    selection_resident: float  # fraction of the warmpool selection (whole model by default)
    file_resident: float  # fraction of the whole file
    cold_before: float  # file fraction resident right before the run (should be ~0)
    extra: dict  # warmpool's --json object, fio's bandwidth
    error: str | None = None


def add_wait_after_evict(parser) -> None:
    """``--wait-after-evict SECONDS``, which both benchmarks take: on a VM with free page
    reporting a cold read that starts seconds after the eviction must have its memory backed
    by the host again (README, "Device speed depends on when the eviction happened")."""
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


def warmpool_argv() -> list[str]:
    """The installed ``warmpool`` entry point next to this interpreter (no pyenv/venv shim in
    the timing), else the one on PATH, else ``python -m warmpool``."""
    beside = Path(sys.executable).with_name("warmpool")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("warmpool")
    return [found] if found else [sys.executable, "-m", "warmpool"]


def _fio_engine() -> str:
    """libaio where fio has it (queue depth 16 really in flight), else psync."""
    try:
        engines = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "psync"
    return "libaio" if "libaio" in engines.split() else "psync"


# each of 4 dd processes reads its own quarter of $1 (in 8 MiB blocks), all at once
_DD4 = ('q=$(( ($(stat -c %s "$1") + 33554431) / 33554432 )); for i in 0 1 2 3; do '
        'dd if="$1" of=/dev/null bs=8M skip=$((i * q)) count=$q status=none & done; wait')


@functools.cache
def catalogue() -> tuple[Method, ...]:
    """Every method, in the order tables list them."""
    wp = [*warmpool_argv(), "warm", FILE, "--no-progress", "--json"]
    py = [sys.executable, str(HERE / "_bench_peers.py")]
    engine = _fio_engine() if shutil.which("fio") else "libaio"
    methods = [Method("warmpool", "warmpool", "warmpool", tuple(wp))]
    methods += [Method(s, f"warmpool --strategy {s}", "warmpool" if s != "willneed" else "hint",
                       (*wp, "--strategy", s), settle_s=SETTLE_S if s == "willneed" else 0.0)
                for s in ("populate", "touch", "read", "willneed")]
    methods += [Method(f"w{n}", f"warmpool --workers {n}", "warmpool", (*wp, "--workers", str(n)))
                for n in (1, 2, 4, 8, 16, 32)]
    # selective warms (a fraction of the file; one extent, and three extents per layer)
    methods += [Method(key, f"warmpool {' '.join(flags)}", "warmpool", (*wp, *flags))
                for key, flags in (("sel-ngl8", ("-ngl", "8")), ("sel-ncmoe4", ("-ngl", "99", "--n-cpu-moe", "4")))]
    methods += [
        Method("vmtouch", "vmtouch -t", "peer", ("vmtouch", "-t", FILE), requires="vmtouch"),
        Method("cat", "cat > /dev/null", "peer", ("cat", FILE)),
        Method("dd", "dd bs=8M", "peer", ("dd", f"if={FILE}", "of=/dev/null", "bs=8M", "status=none")),
        # four sequential readers at once: whether parallel reads get more from the device than one
        Method("dd4", "4 x dd bs=8M in parallel", "peer", ("sh", "-c", _DD4, "dd4", FILE)),
        Method("fio", "fio --direct=1", "limit",
               ("fio", "--name=seqread", f"--filename={FILE}", "--rw=read", "--bs=1M", "--iodepth=16",
                f"--ioengine={engine}", "--direct=1", "--readonly", "--output-format=json"),
               requires="fio", local_only=True),
        Method("stride", "stride touch (numpy)", "peer", (*py, "stride", FILE), requires="numpy"),
        Method("madv-willneed", "whole-file WILLNEED", "hint", (*py, "willneed", FILE), settle_s=SETTLE_S),
        Method("seed", "seed loop", "hint", (*py, "seed", FILE)),
    ]
    return tuple(methods)


def unavailable(method: Method) -> str | None:
    """Why a method cannot run here (one line), or None."""
    need = method.requires
    if need is None:
        return None
    if need == "numpy":
        import importlib.util

        return None if importlib.util.find_spec("numpy") else "unavailable (pip install numpy)"
    return None if shutil.which(need) else f"unavailable (install {need})"


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


# -- running one method -----------------------------------------------------------------------


def _parse_extra(method: Method, stdout: str) -> dict:
    if method.label.startswith("warmpool"):
        data = json.loads(stdout)
        return {k: data[k] for k in ("workers", "strategy", "seconds", "resident_fraction", "bytes_selected")}
    if method.key == "fio":
        read = json.loads(stdout[stdout.index("{"):])["jobs"][0]["read"]
        return {"fio_bw_bytes": read["bw_bytes"], "fio_runtime_ms": read["runtime"]}
    return {}


def run_method(method: Method, path: str, storage: str, round_no: int,
               selection_fraction: Callable[[], float], timeout_s: float, engine: bool = True,
               wait_s: float = 0.0) -> Sample:
    """Evict, wait ``wait_s``, run the method's command, and measure what it left resident (and,
    with ``engine``, its folio sizes and an engine's first pass after it: ``after_effects``)."""
    cold = evict_file(path)
    time.sleep(wait_s)
    parse = method.label.startswith("warmpool") or method.key == "fio"
    started = time.perf_counter()
    try:
        proc = subprocess.run(method.command(path), stdin=subprocess.DEVNULL, text=True,
                              stdout=subprocess.PIPE if parse else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout_s, check=False)
        seconds = time.perf_counter() - started
        error = None if proc.returncode == 0 else f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        seconds, error, proc = None, f"timed out after {timeout_s:.0f} s", None
    if method.settle_s:
        time.sleep(method.settle_s)
    extra = {}
    if proc is not None and error is None and parse:
        try:
            extra = _parse_extra(method, proc.stdout)
        except (ValueError, KeyError, IndexError) as exc:
            error = f"cannot parse its output: {exc}"
    resident = file_resident(path)
    if error is None and engine:
        extra.update(after_effects(path, resident))
    return Sample(method.label, storage, round_no, None if error else seconds, selection_fraction(),
                  resident, cold, extra, error)


def timed_child(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run argv to completion (output discarded, failure raised): (wall seconds from spawn to
    exit, CPU seconds of it and every process it waited for, from ``RUSAGE_CHILDREN``)."""
    import resource

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


def after_effects(path: str, resident: float) -> dict:
    """What the method left for an engine: the folio sizes of the file's cache (root only) and
    a fresh process's first pass over it (``tools/folios.py``).  Not taken where the method
    left the file mostly cold: the pass would then measure the storage, not the cache."""
    import folios

    out: dict = {"folios": None, "engine": None}
    if folios.available() is None:
        out["folios"] = folios.summary(folios.histogram(path))
    if resident >= ENGINE_MIN_RESIDENT:
        out["engine"] = folios.engine_pass(path)
    return out


# -- memory of a warm -------------------------------------------------------------------------


def _rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    """Direct children, from /proc/*/stat (this kernel has no /proc/PID/task/TID/children)."""
    kids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def peak_rss_anon(argv: Sequence[str], interval_s: float = 0.01) -> tuple[int, int, float]:
    """Run argv; sample RssAnon of it plus its children every interval.

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
            pids = [proc.pid, *_children(proc.pid)]
            peak = max(peak, sum(_rss_anon_kb(p) for p in pids))
            most = max(most, len(pids))
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc.wait()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return peak * 1024, most, seconds


# -- the Python peers (child side) ------------------------------------------------------------


def _map(path: str) -> tuple[object, mmap.mmap]:
    f = open(path, "rb")  # noqa: SIM115 - closed by the caller with the mapping
    return f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)


def stride_touch(path: str) -> None:
    """One process reading one byte per 4 KiB page of a read-only mapping (numpy)."""
    import numpy as np

    f, m = _map(path)
    pages = np.frombuffer(m, np.uint8)
    int(pages[::4096].sum())
    del pages
    m.close()
    f.close()


def whole_willneed(path: str) -> None:
    """llama.cpp style: one madvise(MADV_WILLNEED) over the whole mapping, a capped hint."""
    f, m = _map(path)
    m.madvise(mmap.MADV_WILLNEED)
    m.close()
    f.close()


def seed_loop(path: str) -> None:
    """The seed engine's pre-fault: the first and last byte of each tensor."""
    from warmpool import read_layout

    f, m = _map(path)
    total = 0
    for t in read_layout(path).tensors:
        if t.nbytes:
            total += m[t.offset] + m[t.offset + t.nbytes - 1]
    m.close()
    f.close()


_PEERS = {"stride": stride_touch, "willneed": whole_willneed, "seed": seed_loop}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in _PEERS:
        raise SystemExit(f"usage: python {sys.argv[0]} {{{'|'.join(_PEERS)}}} FILE")
    _PEERS[sys.argv[1]](sys.argv[2])
