"""What keeps a held selection resident under LRU reclaim: a held mapping alone (``held``), the
page walk of MADV_POPULATE_READ over the resident pages every few seconds (``walk``), and the
keeper's refresh, that walk plus a 1-byte read per 2 MiB folio (``refresh``), each after a
default warm (2 MiB folios) or a sequential read (readahead-sized folios).

    python tools/keep_refresh_probe.py [--modes held,walk,refresh] [--warm warmpool|read]
                                       [--every 1] [--seconds 60] [--headroom 512M] [--hog-rate 128]

Same pressure as tools/keep_bench.py: this process joins a child memory cgroup limited to the
model plus ``--headroom``, and a co-tenant in it streams a 2 GiB file at ``--hog-rate`` MB/s.
Per mode, from an evicted model: warm, hold one mapping of the whole file (populated), start
the co-tenant, then every ``--every`` seconds do the mode's pass and every 5 s print the
resident fraction.  Root only (the cgroup).  One JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from keep_bench import bench_model  # noqa: E402
from mem_pressure import Hog, MemoryCage, make_file  # noqa: E402
from warmpool import _platform, evict, warm  # noqa: E402
from warmpool._units import parse_size  # noqa: E402

MODES = ("held", "walk", "refresh")


def run(mode: str, model: Path, hog_file: Path, how: str, every: float, seconds: float, headroom: int, rate: float) -> dict:
    size = model.stat().st_size
    evict(str(model))
    _platform.evict_file(hog_file)
    cage = MemoryCage(size + headroom)
    try:
        if how == "warmpool":
            warm(str(model))
        else:
            with open(model, "rb", buffering=0) as f:
                while f.read(8 << 20):
                    pass
        fd = os.open(model, os.O_RDONLY)
        held = _platform.HeldMapping(fd, 0, size)
        held.populate(0, size)
        hog = Hog(hog_file, rate)
        trace, start, due, cpu = [], time.monotonic(), 0.0, 0.0
        try:
            while (t := time.monotonic() - start) < seconds:
                if t >= due:
                    c = time.thread_time()
                    if mode == "walk":
                        held.refresh(read_folios=False)
                    elif mode == "refresh":
                        held.refresh()
                    cpu += time.thread_time() - c
                    due += every
                if not trace or t - trace[-1][0] >= 5:
                    trace.append((round(t), round(held.resident().count(1) * _platform.PAGE_SIZE / size, 4)))
                time.sleep(0.05)
        finally:
            hog.stop()
            held.close()
            os.close(fd)
        lowest = min(f for _, f in trace)
        return {"mode": mode, "warm": how, "every_s": every, "seconds": seconds, "lowest": lowest,
                "end": trace[-1][1], "pass_cpu_s": round(cpu, 3), "trace": trace, "loadavg": os.getloadavg()[0]}
    finally:
        cage.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--warm", choices=("warmpool", "read"), default="warmpool")
    ap.add_argument("--every", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--headroom", default="512M")
    ap.add_argument("--hog-rate", type=float, default=128)
    args = ap.parse_args(argv)
    model = bench_model(None)
    hog_file = make_file(model.parent / "co-tenant.bin", 2 << 30)
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"keep_refresh_probe: unknown mode {mode!r} (one of {', '.join(MODES)})")
        r = run(mode, model, hog_file, args.warm, args.every, args.seconds, parse_size(args.headroom), args.hog_rate)
        print(f"{mode:<8} warm={r['warm']:<8} every {r['every_s']:g} s: lowest {r['lowest']:.1%}, end {r['end']:.1%}, "
              f"pass CPU {r['pass_cpu_s']:.3f} s, load {r['loadavg']:.2f}", flush=True)
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
