"""What a warm without worker processes could reach: the selection's whole 2 MiB blocks faulted
by threads of the process that planned it, paired with `cat` and the real CLI.

    python tools/inprocess_probe.py FILE [--rounds 8] [-ngl 99 --n-cpu-moe 4] [--no-page-reporting]

The probe child starts like the CLI (an interpreter with ``site``), imports warmpool, plans the
selection, maps the file once under ``MADV_HUGEPAGE`` + ``MADV_RANDOM``, and lets 4 threads
populate and read (one byte per page) its whole 2 MiB blocks; the selection's unaligned edges
are read with ``pread`` on a second descriptor under ``POSIX_FADV_RANDOM``.  No guard zones,
progress, verdict or error handling: an upper bound on an in-process design, not one.  Each
way runs after its own eviction, in an order rotated by one per round; the child prints the
fraction of the selection left resident.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from _bench_peers import add_no_page_reporting, page_reporting_off, timed_rounds, warmpool_argv

_CHILD = r"""
import os, sys, threading
sys.path.insert(0, sys.argv[2])
import warmpool
from warmpool import _platform
path, ngl, ncmoe = sys.argv[1], sys.argv[3], sys.argv[4]
kw = {}
if ngl != "-":
    kw["n_gpu_layers"] = int(ngl)
if ncmoe != "-":
    kw["n_cpu_moe"] = int(ncmoe)
plan = warmpool.plan_model(path, **kw)
block, size = _platform.huge_folio_size(), os.path.getsize(path)
tasks = []
for c in plan.chunks:
    lo, hi = c.offset, c.offset + c.length
    a, b = -(-lo // block) * block, hi - hi % block
    if a >= b:
        tasks.append((False, lo, hi - lo))
        continue
    tasks += [(True, p, block) for p in range(a, b, block)]
    tasks += [(False, x, y - x) for x, y in ((lo, a), (b, hi)) if x < y]
tasks.reverse()
window = _platform.FileWindow(os.open(path, os.O_RDONLY), 0, size)
window.advise(0, size, "hugepage")
window.advise(0, size, "random")
edges = os.open(path, os.O_RDONLY)
os.posix_fadvise(edges, 0, 0, os.POSIX_FADV_RANDOM)
lock = threading.Lock()
def fault():
    buffer = memoryview(bytearray(block))
    while True:
        with lock:
            if not tasks:
                return
            whole, at, n = tasks.pop()
        if whole:
            window.populate(at, n)
            window.read_pages(at, n)
        else:
            os.preadv(edges, [buffer[:n]], at)
threads = [threading.Thread(target=fault) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
resident = sum(_platform.resident_bytes(window.fd, c.offset, c.length) for c in plan.chunks)
print(f"resident: {resident / sum(c.length for c in plan.chunks):.4f} of the selection", file=sys.stderr)
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("-ngl", "--n-gpu-layers", type=int)
    p.add_argument("--n-cpu-moe", type=int)
    add_no_page_reporting(p)
    args = p.parse_args(argv)
    selection = [*(["-ngl", str(args.n_gpu_layers)] if args.n_gpu_layers is not None else []),
                 *(["--n-cpu-moe", str(args.n_cpu_moe)] if args.n_cpu_moe is not None else [])]
    ways = {
        "cat": ["cat", args.file],
        "cli": [*warmpool_argv(), "warm", args.file, "--quiet", "--no-progress", *selection],
        "inprocess": [sys.executable, "-c", _CHILD, args.file, str(HERE.parent),
                      str(args.n_gpu_layers) if args.n_gpu_layers is not None else "-",
                      str(args.n_cpu_moe) if args.n_cpu_moe is not None else "-"],
    }
    with page_reporting_off(args.no_page_reporting):
        runs = timed_rounds(args.file, ways, args.rounds)
    walls = {name: [x["wall_s"] for x in runs if x["way"] == name] for name in ways}
    print(f"\n{'way':10s} {'median s':>9s} {'paired x cat':>13s}")
    for name in ways:
        paired = statistics.median(w / c for w, c in zip(walls[name], walls["cat"]))
        print(f"{name:10s} {statistics.median(walls[name]):9.3f} {paired:12.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
