"""Folio sizes of a file's page cache, and what an engine's first pass over it costs.

    python tools/folios.py FILE [--offset N --length N]   # histogram (root), JSON
    python tools/folios.py --engine-pass FILE             # fresh mapping, one byte per 4 KiB, JSON
    python tools/folios.py --compare FILE [--rounds N] [--baseline CHECKOUT]   # every way, side by side

Histogram (root only: /proc/kpageflags is mode 0400 and pagemap hides PFNs from others):
1. mincore finds the resident pages (reads nothing);
2. a read-only mapping of the file gets MADV_RANDOM, and only the resident runs are mapped
   with MADV_POPULATE_READ.  MADV_RANDOM matters: a fault on a folio still marked
   PG_readahead would otherwise start async readahead (``do_async_mmap_readahead`` returns
   early only for VM_RAND_READ), and fault-around skips such folios, so populating would read
   new pages and change what is measured.  A page evicted between the two steps is read back
   alone (order 0); the second mincore reports how many such pages there were;
3. /proc/self/pagemap gives each mapped page's PFN, /proc/kpageflags its flags
   (KPF_COMPOUND_HEAD 15, KPF_COMPOUND_TAIL 16, KPF_THP 22; Documentation/admin-guide/mm/pagemap.rst);
   a folio is a HEAD page followed by TAIL pages at consecutive PFNs, a page with neither
   flag is an order-0 folio; KPF_RECLAIM on its first page is the readahead mark (PG_readahead).

Engine pass: a fresh process maps the file (no MAP_POPULATE) and reads one byte per 4 KiB
page, as an engine's first request that touches every weight does; it reports its minor and
major faults (getrusage) and the time of the pass alone (numpy import excluded).

Importable: ``histogram(path)``, ``summary(hist)``, ``engine_pass(path)``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from warmpool import _platform  # noqa: E402

__all__ = ["available", "engine_pass", "histogram", "summary"]

# KPF_RECLAIM (9) is the page flag PG_readahead shares (include/linux/page-flags.h): on a
# cached, clean file folio it is the readahead mark.
KPF_RECLAIM, KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_THP = 1 << 9, 1 << 15, 1 << 16, 1 << 22
_PFN_MASK, _PRESENT = (1 << 55) - 1, 1 << 63


def available() -> str | None:
    """None when histograms can be taken here, else why not (one line)."""
    if os.geteuid() != 0:
        return "folio sizes need root (/proc/kpageflags is mode 0400, pagemap hides PFNs)"
    if not os.access("/proc/kpageflags", os.R_OK):
        return "/proc/kpageflags is not readable on this kernel"
    return None


def histogram(path: str | os.PathLike[str], offset: int = 0, length: int = 0) -> dict:
    """Folio sizes of the resident pages of ``[offset, offset + length)`` (0: to EOF).

    Returns ``{"pages": resident pages, "by_order": {order: pages in folios of that order},
    "folios_by_order": {order: folios}, "thp_pages": pages flagged THP, "readahead_marked":
    folios carrying the readahead mark, "lost": pages evicted while measuring}``.  Folios that straddle the range's edges count only their pages inside.
    """
    import numpy as np

    why = available()
    if why:
        raise PermissionError(why)
    page = _platform.PAGE_SIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        end = size if length == 0 else min(offset + length, size)
        start = offset - offset % page
        if end <= start:
            return {"pages": 0, "by_order": {}, "folios_by_order": {}, "thp_pages": 0, "readahead_marked": 0, "lost": 0}
        vector = _platform.resident_pages(fd, start, end - start)
        with _platform.FileWindow(fd, start, end - start) as window:
            window.advise(0, window.length, "random")
            for lo, hi in _platform.page_runs(vector, 1):
                window.populate(lo * page, min(hi * page, window.length) - lo * page)
            with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
                entries = np.frombuffer(os.pread(pagemap.fileno(), len(vector) * 8, window.address // page * 8),
                                        dtype=np.uint64)
            present = (entries & np.uint64(_PRESENT)) != 0
            pfns = (entries & np.uint64(_PFN_MASK)).astype(np.int64)
            flags = _kpageflags(pfns, present)
        lost = int(np.count_nonzero(np.frombuffer(vector, np.uint8).astype(bool) & ~present))
    finally:
        os.close(fd)
    tail = (flags & KPF_COMPOUND_TAIL) != 0
    idx = np.flatnonzero(present)
    if idx.size == 0:
        return {"pages": 0, "by_order": {}, "folios_by_order": {}, "thp_pages": 0, "readahead_marked": 0, "lost": lost}
    # a folio goes on while the next mapped page is its TAIL at the next PFN and the next virtual page
    cont = np.zeros(idx.size, dtype=bool)
    cont[1:] = tail[idx[1:]] & (pfns[idx[1:]] == pfns[idx[:-1]] + 1) & (idx[1:] == idx[:-1] + 1)
    folio_of = np.cumsum(~cont) - 1
    sizes = np.bincount(folio_of)
    marked = int(np.count_nonzero(flags[idx[~cont]] & KPF_RECLAIM))
    orders = np.ceil(np.log2(sizes)).astype(int)
    by_order = {int(o): int(sizes[orders == o].sum()) for o in np.unique(orders)}
    folios = {int(o): int((orders == o).sum()) for o in np.unique(orders)}
    return {"pages": int(idx.size), "by_order": by_order, "folios_by_order": folios,
            "thp_pages": int(np.count_nonzero(flags[idx] & KPF_THP)), "readahead_marked": marked, "lost": lost}


def _kpageflags(pfns, present):
    """Flags of each present page's PFN, one pread per run of consecutive PFNs."""
    import numpy as np

    flags = np.zeros(pfns.size, dtype=np.int64)
    idx = np.flatnonzero(present)
    if idx.size == 0:
        return flags
    p = pfns[idx]
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    with open("/proc/kpageflags", "rb", buffering=0) as kpf:
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, idx.size]):
            data = os.pread(kpf.fileno(), int(hi - lo) * 8, int(p[lo]) * 8)
            flags[idx[lo:hi]] = np.frombuffer(data, dtype=np.uint64).astype(np.int64)
    return flags


def summary(hist: dict) -> dict:
    """The few figures a table shows: order-0 pages, pages in PMD-size (order >= 9) folios,
    the page-weighted mean folio size, folios in all."""
    pages = hist["pages"] or 1
    by_order = {int(k): v for k, v in hist["by_order"].items()}
    mean_kib = sum(v * (1 << o) * 4 for o, v in by_order.items()) / pages
    return {"resident_pages": hist["pages"], "order0_pages": by_order.get(0, 0),
            "order0_fraction": round(by_order.get(0, 0) / pages, 4),
            "pmd_fraction": round(sum(v for o, v in by_order.items() if o >= 9) / pages, 4),
            "mean_folio_kib": round(mean_kib, 1), "folios": sum(hist["folios_by_order"].values()),
            "readahead_marked": hist["readahead_marked"],
            "lost_while_measuring": hist["lost"]}


def short(hist: dict) -> str:
    """One line: pages per order, e.g. ``0:1234 4:800 9:400000``."""
    return " ".join(f"{o}:{v}" for o, v in sorted((int(k), v) for k, v in hist["by_order"].items()))


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
    """Minor/major faults and seconds of a fresh process's one-byte-per-page pass (see module doc)."""
    out = subprocess.run([sys.executable, __file__, "--engine-pass", os.fspath(path)], capture_output=True,
                         text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- --compare: every way of reading the file, side by side -------------------------------------

CHUNK, STEP = 16 << 20, 8 << 20  # warmpool's default chunk and step


def _faults(path: str, advice: tuple[str, ...], threads: int = 1) -> None:
    """One process faulting the file in 16 MiB windows (MADV_POPULATE_READ in 8 MiB steps),
    each window under ``advice``; with ``threads``, that many windows at once."""
    from concurrent.futures import ThreadPoolExecutor

    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size

    def one(offset: int) -> None:
        n = min(CHUNK, size - offset)
        with _platform.FileWindow(fd, offset, n) as window:
            for a in advice:
                window.advise(0, n, a)
            for step in range(0, n, STEP):
                window.populate(step, min(STEP, n - step))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(0, size, CHUNK)))
    os.close(fd)


def _pread(path: str, advice: str | None) -> None:
    fd = os.open(path, os.O_RDONLY)
    if advice:
        os.posix_fadvise(fd, 0, 0, getattr(os, advice))
    _platform.read_range(fd, 0, os.fstat(fd).st_size, bytearray(STEP))
    os.close(fd)


def _willneed_then_fault(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    _platform.prefetch(fd, 0, 0)
    os.close(fd)
    _faults(path, ())


CANDIDATES = {  # in-process ways, run in a child: python tools/folios.py --candidate NAME FILE
    "fault": lambda p: _faults(p, ()),
    "fault MADV_SEQUENTIAL": lambda p: _faults(p, ("sequential",)),
    "fault MADV_HUGEPAGE": lambda p: _faults(p, ("hugepage",)),
    "fault MADV_HUGEPAGE+MADV_RANDOM": lambda p: _faults(p, ("hugepage", "random")),
    "fault MADV_HUGEPAGE+MADV_RANDOM, 4 threads": lambda p: _faults(p, ("hugepage", "random"), 4),
    "WILLNEED (8 MiB steps), then fault": _willneed_then_fault,
    "pread 8 MiB, FADV_SEQUENTIAL": lambda p: _pread(p, "POSIX_FADV_SEQUENTIAL"),
    "pread 8 MiB, FADV_RANDOM": lambda p: _pread(p, "POSIX_FADV_RANDOM"),
}


def _ways(path: str, baseline: str | None) -> list[tuple[str, list[str], dict | None]]:
    """(label, argv, env) of every way compared; warmpool runs from the checkout its env names
    (``python -m`` puts the working directory first on sys.path, so it also runs there)."""
    here = str(HERE.parent)
    wp = [sys.executable, "-m", "warmpool", "warm", path, "--no-progress", "--quiet"]
    ways = [("dd bs=8M", ["dd", f"if={path}", "of=/dev/null", "bs=8M", "status=none"], None),
            ("cat", ["sh", "-c", 'cat "$0" > /dev/null', path], None),
            ("vmtouch -t", ["vmtouch", "-tq", path], None)]
    roots = [("", here)] + ([(" (baseline)", baseline)] if baseline else [])
    for tag, root in roots:
        env = dict(os.environ, PYTHONPATH=root)
        ways += [(f"warmpool warm{tag}", wp, env)]
        ways += [(f"warmpool --strategy {s}{tag}", [*wp, "--strategy", s], env) for s in ("touch", "read", "willneed")]
        ways += [(f"warmpool --workers {n}{tag}", [*wp, "--workers", str(n)], env) for n in (1, 4)]
    ways += [(name, [sys.executable, __file__, "--candidate", name, path], None) for name in CANDIDATES]
    return ways


def compare(path: str, rounds: int, baseline: str | None) -> list[dict]:
    """Every way, ``rounds`` times in rotated order, each on the evicted file: its wall time,
    the histogram it left (root) and the engine pass after it."""
    import statistics

    ways = _ways(path, baseline)
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in ways}
    for r in range(rounds):
        for label, argv, env in ways[r % len(ways):] + ways[:r % len(ways)]:
            _platform.evict_file(path)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL, cwd=(env or {}).get("PYTHONPATH"))
            seconds = time.perf_counter() - t0
            hist = histogram(path) if available() is None else None
            run = {"seconds": seconds, "load_1m": load, "engine": engine_pass(path),
                   "summary": summary(hist) if hist else None, "by_order": short(hist) if hist else None}
            runs[label].append(run)
            print(f"[{r + 1}/{rounds}] {label}: {seconds:.2f} s, engine pass {run['engine']['minor_faults']} faults "
                  f"{run['engine']['seconds']:.3f} s, orders {run['by_order']}, load {load:.2f}", file=sys.stderr, flush=True)
    rows = []
    for label, _, _ in ways:
        rs = runs[label]
        med = lambda f: statistics.median(f(x) for x in rs)  # noqa: E731
        row = {"way": label, "seconds": round(med(lambda x: x["seconds"]), 3),
               "engine_minor_faults": med(lambda x: x["engine"]["minor_faults"]),
               "engine_s": round(med(lambda x: x["engine"]["seconds"]), 4),
               "load_1m": [round(x["load_1m"], 2) for x in rs], "by_order_last": rs[-1]["by_order"]}
        if all(x["summary"] for x in rs):
            row.update({k: med(lambda x, k=k: x["summary"][k]) for k in ("order0_fraction", "pmd_fraction", "mean_folio_kib")})
        rows.append(row)
    return rows


def print_compare(rows: list[dict]) -> None:
    dd = next(r for r in rows if r["way"] == "dd bs=8M")
    print("| way | seconds | engine pass faults | × dd | engine pass s | order-0 pages | PMD-size | mean folio | pages per order (last round) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        fol = (f"{r['order0_fraction']:.1%} | {r['pmd_fraction']:.1%} | {r['mean_folio_kib']:.0f} KiB"
               if "order0_fraction" in r else "– | – | –")
        print(f"| {r['way']} | {r['seconds']:.2f} | {r['engine_minor_faults']:,.0f} | "
              f"{r['engine_minor_faults'] / dd['engine_minor_faults']:.2f}× | {r['engine_s']:.3f} | {fol} | "
              f"{r['by_order_last'] or '–'} |")


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--engine-pass", action="store_true", help="measure a fresh process's pass instead")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--length", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="every way of reading the file, side by side")
    p.add_argument("--rounds", type=int, default=1, help="--compare: rounds (median)")
    p.add_argument("--baseline", help="--compare: also run warmpool from this checkout (e.g. the last release)")
    p.add_argument("--candidate", choices=sorted(CANDIDATES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.engine_pass:
        _engine_pass_child(args.file)
        return 0
    if args.candidate:
        CANDIDATES[args.candidate](args.file)
        return 0
    if args.compare:
        rows = compare(args.file, args.rounds, args.baseline)
        print_compare(rows)
        print("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
        return 0
    why = available()
    if why:
        print(f"folios: {why}", file=sys.stderr)
        return 2
    hist = histogram(args.file, args.offset, args.length)
    print(json.dumps(hist | {"summary": summary(hist)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
