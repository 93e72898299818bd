"""Is an engine's first read of resident, mapped, idle pages slower than its second, and which
of the things another process can do to those pages in the meantime keeps it at steady speed?

    python tools/keep_idle_read.py [--seconds 240] [--every 2] [--pressure cgroup|none] [--touch-every 0.5]
        [--refresh 1] [--no-page-reporting] [MODEL]

Five 256 MiB regions of the model (default: the keep_bench model) are mapped and read whole
(a uint64 sum, an engine's mat-vec over them) every ``--every`` seconds, each twice in a row:
the first read over the second is the region's ratio for that round.  A second process holds
a mapping of its own and, between rounds: reads one byte per 2 MiB of region B and one byte
per 4 KiB page of region C every ``--touch-every`` seconds; holds region D mlocked
(``keep --lock``); refreshes region E every ``--refresh`` seconds as ``keep``'s default hold
does (``HeldMapping.refresh``).  Region A only the reader touches.  The order of the regions
rotates each round.  ``--pressure cgroup`` (default) runs the reader in a child memory cgroup
limited to the regions plus 512 MiB, with tools/mem_pressure.py's co-tenant streaming a 2 GiB
file at 128 MB/s in it, as tools/keep_bench.py does; rounds with a major fault are left out.
Prints per region the median and p99 ratio and the rounds over 1.2x, then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS.parent), str(TOOLS)]

REGION = 256 << 20
# what the other process does to each region
REGIONS = {"A": "only the reader", "B": "another process reads 1 byte per 2048 KiB",
           "C": "another process reads 1 byte per 4 KiB", "D": "another process holds it mlocked",
           "E": "another process refreshes it as keep does"}
STRIDES = {"B": 2 << 20, "C": 4096}


def _map(path: str) -> np.ndarray:
    fd = os.open(path, os.O_RDONLY)
    return np.frombuffer(mmap.mmap(fd, 0, prot=mmap.PROT_READ), dtype=np.uint8)


def _helper(path: str, every: float, refresh: float) -> None:
    from warmpool import _platform

    data = _map(path)
    fd = os.open(path, os.O_RDONLY)
    k = {name: i for i, name in enumerate(REGIONS)}
    locked = _platform.HeldMapping(fd, k["D"] * REGION, REGION)
    locked.populate(0, REGION)
    if err := locked.lock(0, REGION):
        raise SystemExit(f"keep_idle_read: mlock of region D failed: {os.strerror(err)}")
    kept = _platform.HeldMapping(fd, k["E"] * REGION, REGION)
    kept.populate(0, REGION)
    next_refresh = time.monotonic()
    while True:
        started = time.monotonic()
        for name, stride in STRIDES.items():
            int(data[k[name] * REGION:(k[name] + 1) * REGION:stride].sum())
        if started >= next_refresh:
            kept.refresh()
            next_refresh = started + refresh
        time.sleep(max(min(every, refresh) - (time.monotonic() - started), 0))


def main(argv: list[str] | None = None) -> int:
    from _bench_peers import add_no_page_reporting, page_reporting_off

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--every", type=float, default=2)
    ap.add_argument("--pressure", choices=("cgroup", "none"), default="cgroup")
    ap.add_argument("--touch-every", type=float, default=0.5)
    ap.add_argument("--refresh", type=float, default=1.0)
    add_no_page_reporting(ap)
    ap.add_argument("--helper", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from keep_bench import bench_model
    from mem_pressure import Hog, MemoryCage, make_file

    from warmpool import _platform
    from warmpool._platform.proc import page_reporting_order

    path = str(args.model or bench_model(None))
    if args.helper:
        _helper(path, args.touch_every, args.refresh)
        return 0
    if os.path.getsize(path) < len(REGIONS) * REGION:
        print(f"keep_idle_read: {path} is smaller than {len(REGIONS)} x 256 MiB", file=sys.stderr)
        return 2
    cage = hog = None
    if args.pressure == "cgroup":
        _platform.evict_file(path)  # its pages are then charged to the cgroup, as keep_bench's are
        cage = MemoryCage(len(REGIONS) * REGION + (512 << 20))
        hog_file = make_file(Path(path).parent / "co-tenant.bin", 2 << 30)
        _platform.evict_file(hog_file)
    data = _map(path)
    regions = {name: data[k * REGION:(k + 1) * REGION].view(np.uint64) for k, name in enumerate(REGIONS)}
    for region in regions.values():
        int(region.sum())  # resident and mapped before the first round
    if cage:
        hog = Hog(hog_file, 128)
    helper = subprocess.Popen([sys.executable, __file__, path, "--helper", "--touch-every", str(args.touch_every),
                               "--refresh", str(args.refresh)])
    reporting = contextlib.ExitStack()
    reporting.enter_context(page_reporting_off(args.no_page_reporting))
    order = page_reporting_order()
    rows, start = [], time.monotonic()
    try:
        for i in range(int(args.seconds / args.every) + 1):
            time.sleep(max(start + i * args.every - time.monotonic(), 0))
            if helper.poll() is not None:
                break  # reported below: rounds without the helper would measure nothing it does
            names = list(regions)[i % len(regions):] + list(regions)[:i % len(regions)]
            row = {"t": round(time.monotonic() - start, 1)}
            for name in names:
                majflt = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
                t0 = time.perf_counter()
                int(regions[name].sum())
                t1 = time.perf_counter()
                int(regions[name].sum())
                t2 = time.perf_counter()
                row[name] = None if resource.getrusage(resource.RUSAGE_SELF).ru_majflt > majflt else round((t1 - t0) / (t2 - t1), 3)
            rows.append(row)
    finally:
        reporting.close()
        helper.kill()
        helper.wait()
        if hog:
            hog.stop()
        if cage:
            cage.close()
    summary = {"tool": "keep_idle_read", "model": path, "pressure": args.pressure, "every_s": args.every,
               "touch_every_s": args.touch_every, "refresh_s": args.refresh,
               "page_reporting_order": order, "rounds": len(rows), "regions": {}}
    if helper.returncode not in (0, -9):
        print(f"keep_idle_read: the helper process failed (exit {helper.returncode})", file=sys.stderr)
        return 1
    for name, touched in REGIONS.items():
        ratios = np.array([r[name] for r in rows if r[name] is not None])
        summary["regions"][name] = {"touched_by": touched, "rounds": len(ratios),
                                    "p50": round(float(np.median(ratios)), 3), "p99": round(float(np.percentile(ratios, 99)), 3),
                                    "max": round(float(ratios.max()), 3), "over_1.2": int((ratios > 1.2).sum())}
        s = summary["regions"][name]
        print(f"{name}: {touched:<42} first/second read p50 {s['p50']:.3f} p99 {s['p99']:.3f} max {s['max']:.2f}, "
              f"{s['over_1.2']} of {s['rounds']} rounds over 1.2x")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
