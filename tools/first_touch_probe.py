"""The read paths of a cold whole-file read, stripped of warmpool's pool: which one pays for
memory the host no longer backs (free page reporting), and how much.

    python tools/first_touch_probe.py FILE [--rounds 6] [--ways cat,seq,huge:1,huge:4] [--no-page-reporting]

Ways, each one child process after its own eviction, in an order rotated by one per round:

- ``cat``: ``cat FILE > /dev/null`` (read(2) with the file's sequential readahead);
- ``seq``: one plain mapping of the file, ``MADV_POPULATE_READ`` then one byte read per page,
  8 MiB at a time (the fault path's own readahead, folio sizes as readahead grows them);
- ``huge:N``: the mapping under ``MADV_HUGEPAGE`` + ``MADV_RANDOM``, N threads taking 2 MiB
  blocks in file order, each block populated (one synchronous 2 MiB folio read) and then read
  one byte per page, as warmpool's fault threads do, but in one process with no pool around it.

Per run: wall time from spawn to exit and the child's CPU (user + system).  A JSON line per
run, then a table of medians.  ``--no-page-reporting`` (root) switches the VM's free page
reporting off for the run, so every read refills memory the host still backs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from _bench_peers import add_no_page_reporting, page_reporting_off, timed_rounds

_CHILD = r"""
import os, sys, threading
sys.path.insert(0, sys.argv[4])
from warmpool import _platform
path, way, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
size = os.path.getsize(path)
window = _platform.FileWindow(os.open(path, os.O_RDONLY), 0, size)
if way == "huge":
    block = _platform.huge_folio_size()
    window.advise(0, size, "hugepage")
    window.advise(0, size, "random")
    blocks = list(range(0, size - size % block, block))[::-1]
    lock = threading.Lock()
    def fault():
        while True:
            with lock:
                if not blocks:
                    return
                at = blocks.pop()
            window.populate(at, block)
            window.read_pages(at, block)
    started = [threading.Thread(target=fault) for _ in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
else:
    step = 8 << 20
    for at in range(0, size, step):
        window.populate(at, min(step, size - at))
        window.read_pages(at, min(step, size - at))
"""


def _ways(text: str) -> list[tuple[str, int]]:
    ways = []
    for item in text.split(","):
        name, _, n = item.partition(":")
        if name not in ("cat", "seq", "huge") or (n and not n.isdigit()) or (n and int(n) < 1):
            raise SystemExit(f"--ways: {item!r} is not cat, seq or huge:N")
        ways.append((name, int(n or 1)))
    return ways


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--ways", default="cat,seq,huge:1,huge:4")
    add_no_page_reporting(p)
    args = p.parse_args(argv)
    ways = _ways(args.ways)
    argvs = {f"{way}:{threads}": ["cat", args.file] if way == "cat" else
             [sys.executable, "-c", _CHILD, args.file, way, str(threads), str(HERE.parent)]
             for way, threads in ways}
    with page_reporting_off(args.no_page_reporting):
        runs = timed_rounds(args.file, argvs, args.rounds)
    print(f"\n{'way':8s} {'median s':>9s} {'CPU s':>6s}  CPU s per round")
    for way, threads in ways:
        mine = [x for x in runs if x["way"] == f"{way}:{threads}"]
        print(f"{way}:{threads:<6d} {statistics.median(x['wall_s'] for x in mine):9.3f} "
              f"{statistics.median(x['cpu_s'] for x in mine):6.2f}  {[x['cpu_s'] for x in mine]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
