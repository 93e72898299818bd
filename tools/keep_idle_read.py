"""Is an engine's first read of resident, mapped, idle pages slower than its second, and does
another process reading those pages in the meantime keep it at steady speed?

    python tools/keep_idle_read.py [--seconds 240] [--every 2] [--pressure cgroup|none] [--touch-every 0.5] [MODEL]

Three 256 MiB regions of the model (default: the keep_bench model) are mapped and read whole
(a uint64 sum, an engine's mat-vec over them) every ``--every`` seconds, each twice in a row:
the first read over the second is the region's ratio for that round.  Between rounds a second
process, through a mapping of its own, reads one byte per 2 MiB of region B and one byte per
4 KiB page of region C every ``--touch-every`` seconds; region A only the reader touches.  The
order of the regions rotates each round.  ``--pressure cgroup`` (default) runs the reader in a
child memory cgroup limited to the three regions plus 512 MiB, with tools/mem_pressure.py's
co-tenant streaming a 2 GiB file at 128 MB/s in it, as tools/keep_bench.py does; rounds with a
major fault are left out.  Prints per region the median and p99 ratio and the rounds over 1.2x,
then one JSON line.
"""

from __future__ import annotations

import argparse
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
STRIDES = {"A": None, "B": 2 << 20, "C": 4096}  # what the other process reads of each region


def _map(path: str) -> np.ndarray:
    fd = os.open(path, os.O_RDONLY)
    return np.frombuffer(mmap.mmap(fd, 0, prot=mmap.PROT_READ), dtype=np.uint8)


def _toucher(path: str, every: float) -> None:
    data = _map(path)
    while True:
        started = time.perf_counter()
        for k, (name, stride) in enumerate(STRIDES.items()):
            if stride:
                int(data[k * REGION:(k + 1) * REGION:stride].sum())
        time.sleep(max(every - (time.perf_counter() - started), 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--every", type=float, default=2)
    ap.add_argument("--pressure", choices=("cgroup", "none"), default="cgroup")
    ap.add_argument("--touch-every", type=float, default=0.5)
    ap.add_argument("--toucher", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from keep_bench import bench_model
    from mem_pressure import Hog, MemoryCage, make_file

    from warmpool import _platform

    path = str(args.model or bench_model(None))
    if args.toucher:
        _toucher(path, args.touch_every)
        return 0
    if os.path.getsize(path) < 3 * REGION:
        print(f"keep_idle_read: {path} is smaller than 3 x 256 MiB", file=sys.stderr)
        return 2
    cage = hog = None
    if args.pressure == "cgroup":
        _platform.evict_file(path)  # its pages are then charged to the cgroup, as keep_bench's are
        cage = MemoryCage(3 * REGION + (512 << 20))
        hog_file = make_file(Path(path).parent / "co-tenant.bin", 2 << 30)
        _platform.evict_file(hog_file)
    data = _map(path)
    regions = {name: data[k * REGION:(k + 1) * REGION].view(np.uint64) for k, name in enumerate(STRIDES)}
    for region in regions.values():
        int(region.sum())  # resident and mapped before the first round
    if cage:
        hog = Hog(hog_file, 128)
    toucher = subprocess.Popen([sys.executable, __file__, path, "--toucher", "--touch-every", str(args.touch_every)])
    rows, start = [], time.monotonic()
    try:
        for i in range(int(args.seconds / args.every) + 1):
            time.sleep(max(start + i * args.every - time.monotonic(), 0))
            names = list(regions)[i % 3:] + list(regions)[:i % 3]
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
        toucher.kill()
        toucher.wait()
        if hog:
            hog.stop()
        if cage:
            cage.close()
    summary = {"tool": "keep_idle_read", "model": path, "pressure": args.pressure, "every_s": args.every,
               "touch_every_s": args.touch_every, "rounds": len(rows), "regions": {}}
    for name, stride in STRIDES.items():
        ratios = np.array([r[name] for r in rows if r[name] is not None])
        touched = f"another process reads 1 byte per {stride // 1024} KiB" if stride else "only the reader"
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
