"""Folio sizes of a file's page cache, and what an engine's first pass over it costs.

    python tools/folios.py FILE [--offset N --length N]   # histogram (root), JSON
    python tools/folios.py --engine-pass FILE             # fresh mapping, one byte per 4 KiB, JSON

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
   flag is an order-0 folio.

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

KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_THP = 1 << 15, 1 << 16, 1 << 22
_PFN_MASK, _PRESENT = (1 << 55) - 1, 1 << 63


def available() -> str | None:
    """None when histograms can be taken here, else why not (one line)."""
    if os.geteuid() != 0:
        return "folio sizes need root (/proc/kpageflags is mode 0400, pagemap hides PFNs)"
    if not os.access("/proc/kpageflags", os.R_OK):
        return "/proc/kpageflags is not readable on this kernel"
    return None


def _runs(vector: bytes, value: int):
    start = vector.find(value)
    while start != -1:
        end = vector.find(1 - value, start)
        end = len(vector) if end == -1 else end
        yield start, end
        start = vector.find(value, end)


def histogram(path: str | os.PathLike[str], offset: int = 0, length: int = 0) -> dict:
    """Folio sizes of the resident pages of ``[offset, offset + length)`` (0: to EOF).

    Returns ``{"pages": resident pages, "by_order": {order: pages in folios of that order},
    "folios_by_order": {order: folios}, "thp_pages": pages flagged THP, "lost": pages evicted
    while measuring}``.  Folios that straddle the range's edges count only their pages inside.
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
            return {"pages": 0, "by_order": {}, "folios_by_order": {}, "thp_pages": 0, "lost": 0}
        vector = _platform.resident_pages(fd, start, end - start)
        with _platform.FileWindow(fd, start, end - start) as window:
            window.advise(0, window.length, "random")
            for lo, hi in _runs(vector, 1):
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
        return {"pages": 0, "by_order": {}, "folios_by_order": {}, "thp_pages": 0, "lost": lost}
    # a folio goes on while the next mapped page is its TAIL at the next PFN and the next virtual page
    cont = np.zeros(idx.size, dtype=bool)
    cont[1:] = tail[idx[1:]] & (pfns[idx[1:]] == pfns[idx[:-1]] + 1) & (idx[1:] == idx[:-1] + 1)
    folio_of = np.cumsum(~cont) - 1
    sizes = np.bincount(folio_of)
    orders = np.ceil(np.log2(sizes)).astype(int)
    by_order = {int(o): int(sizes[orders == o].sum()) for o in np.unique(orders)}
    folios = {int(o): int((orders == o).sum()) for o in np.unique(orders)}
    return {"pages": int(idx.size), "by_order": by_order, "folios_by_order": folios,
            "thp_pages": int(np.count_nonzero(flags[idx] & KPF_THP)), "lost": lost}


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


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--engine-pass", action="store_true", help="measure a fresh process's pass instead")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--length", type=int, default=0)
    args = p.parse_args(argv)
    if args.engine_pass:
        _engine_pass_child(args.file)
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
