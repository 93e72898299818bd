"""Folio sizes of a file's page cache, read from the kernel's own page flags.

Root only: /proc/kpageflags is mode 0400 and /proc/self/pagemap hides PFNs from others.
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

Used by tests/test_folios.py and tests/test_keep_refresh.py, and by the benchmarks in tools/
that report the folio sizes a warm left (tools/bench_warm.py, tools/first_request.py).
"""

from __future__ import annotations

import os

from warmpool import _platform

__all__ = ["available", "histogram", "kpageflags", "page_frames", "summary"]

# KPF_RECLAIM (9) is the page flag PG_readahead shares (include/linux/page-flags.h): on a
# cached, clean file folio it is the readahead mark.
KPF_RECLAIM, KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_THP = 1 << 9, 1 << 15, 1 << 16, 1 << 22
_PFN_MASK, _PRESENT = (1 << 55) - 1, 1 << 63


def available() -> str | None:
    """None when folio sizes can be read here, else why not (one line)."""
    if os.geteuid() != 0:
        return "folio sizes need root (/proc/kpageflags is mode 0400, pagemap hides PFNs)"
    if not os.access("/proc/kpageflags", os.R_OK):
        return "/proc/kpageflags is not readable on this kernel"
    return None


def page_frames(address: int, pages: int):
    """(present, pfns) of this process's ``pages`` pages from ``address`` (/proc/self/pagemap):
    two numpy arrays, whether each page is mapped and its page frame number."""
    import numpy as np

    page = _platform.PAGE_SIZE
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        entries = np.frombuffer(os.pread(pagemap.fileno(), pages * 8, address // page * 8), dtype=np.uint64)
    present = (entries & np.uint64(_PRESENT)) != 0
    return present, (entries & np.uint64(_PFN_MASK)).astype(np.int64)


def kpageflags(pfns, present):
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


def histogram(path: str | os.PathLike[str], offset: int = 0, length: int = 0) -> dict:
    """Folio sizes of the resident pages of ``[offset, offset + length)`` (0: to EOF).

    Returns ``{"pages": resident pages, "by_order": {order: pages in folios of that order},
    "folios_by_order": {order: folios}, "thp_pages": pages flagged THP, "readahead_marked":
    folios carrying the readahead mark, "lost": pages evicted while measuring}``.  Folios that
    straddle the range's edges count only their pages inside.
    """
    import numpy as np

    why = available()
    if why:
        raise PermissionError(why)
    page = _platform.PAGE_SIZE
    empty = {"pages": 0, "by_order": {}, "folios_by_order": {}, "thp_pages": 0, "readahead_marked": 0}
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        end = size if length == 0 else min(offset + length, size)
        start = offset - offset % page
        if end <= start:
            return empty | {"lost": 0}
        vector = _platform.resident_pages(fd, start, end - start)
        with _platform.FileWindow(fd, start, end - start) as window:
            window.advise(0, window.length, "random")
            for lo, hi in _platform.page_runs(vector, 1):
                window.populate(lo * page, min(hi * page, window.length) - lo * page)
            present, pfns = page_frames(window.address, len(vector))
            flags = kpageflags(pfns, present)
        lost = int(np.count_nonzero(np.frombuffer(vector, np.uint8).astype(bool) & ~present))
    finally:
        os.close(fd)
    tail = (flags & KPF_COMPOUND_TAIL) != 0
    idx = np.flatnonzero(present)
    if idx.size == 0:
        return empty | {"lost": lost}
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
