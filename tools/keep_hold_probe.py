"""What keeps warmed pages resident against this machine's reclaim, and at what CPU cost.

Writes one file per mode (random bytes), evicts and warms each (MADV_POPULATE_READ in 8 MiB
steps, as warmpool's workers do), then starts one holder process per mode and samples every
file's residency (mincore through a fresh mapping of the sampler's own) for ``--seconds``:

* ``none``    no process maps the file after the warm (a one-shot warm);
* ``lazy``    a process holds a read-only mapping but never touches it (no page table entries);
* ``map``     a process holds a mapping populated once (every page mapped), then sleeps;
* ``touch4k`` ``map`` plus one byte read per 4 KiB page every ``--interval`` seconds;
* ``touch2m`` ``map`` plus one byte read per 2 MiB every ``--interval`` seconds.

Prints one line per sample and a JSON line per mode: residency at the end, the holder's CPU
seconds per interval (its touch passes), VmPTE (page tables of the mapping) and RssAnon.

    python tools/keep_hold_probe.py --size 512M --seconds 180 --interval 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

from first_request import resident  # noqa: E402

from warmpool import _platform  # noqa: E402
from warmpool._units import parse_size  # noqa: E402

MODES = ("none", "lazy", "map", "touch4k", "touch2m")
STEP = 8 << 20

HOLDER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[4])
from warmpool import _platform
path, mode, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
held = _platform.HeldMapping(fd, 0, size)
if mode != "lazy":
    held.populate(0, size)
stride = {"touch4k": 4096, "touch2m": 2 << 20}.get(mode)
print("ready", flush=True)
while True:
    time.sleep(interval)
    if stride:
        held.touch(0, size, stride)
"""


def _warm(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _platform.evict_file(path)
        size = os.fstat(fd).st_size
        held = _platform.HeldMapping(fd, 0, size)
        for pos in range(0, size, STEP):
            held.populate(pos, min(STEP, size - pos))
        held.close()
    finally:
        os.close(fd)


def _proc(pid: int) -> dict:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    out = {"cpu_s": cpu}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmPTE", "RssAnon"):
                out[key + "_kb"] = int(line.split()[1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512M")
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--interval", type=float, default=10)
    ap.add_argument("--sample", type=float, default=15)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    size, modes = parse_size(args.size), args.modes.split(",")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = tempfile.mkdtemp(prefix="keep-probe-", dir=args.dir)
    paths = {}
    for mode in modes:
        paths[mode] = os.path.join(workdir, f"{mode}.bin")
        with open(paths[mode], "wb") as f:
            left = size
            while left:
                n = min(left, 64 << 20)
                f.write(os.urandom(n))
                left -= n
            f.flush()
            os.fsync(f.fileno())
    holders = {}
    try:
        for mode in modes:
            _warm(paths[mode])
            if mode != "none":
                p = subprocess.Popen([sys.executable, "-c", HOLDER, paths[mode], mode, str(args.interval), root],
                                     stdout=subprocess.PIPE, text=True)
                p.stdout.readline()
                holders[mode] = (p, _proc(p.pid))
        start = time.monotonic()
        print(f"# {len(modes)} files of {size >> 20} MiB in {workdir}; loadavg {open('/proc/loadavg').read().split()[:3]}")
        print("t_s " + " ".join(f"{m:>8}" for m in modes))
        while True:
            t = time.monotonic() - start
            print(f"{t:5.0f} " + " ".join(f"{resident(paths[m]):8.1%}" for m in modes), flush=True)
            if t >= args.seconds:
                break
            time.sleep(min(args.sample, args.seconds - t + 0.01))
        elapsed = time.monotonic() - start
        for mode in modes:
            row = {"mode": mode, "size": size, "seconds": round(elapsed, 1), "interval": args.interval,
                   "resident_fraction": round(resident(paths[mode]), 4)}
            if mode in holders:
                p, before = holders[mode]
                now = _proc(p.pid)
                row["cpu_s_per_interval"] = round((now["cpu_s"] - before["cpu_s"]) / (elapsed / args.interval), 4)
                row["cpu_share"] = round((now["cpu_s"] - before["cpu_s"]) / elapsed, 4)
                row["VmPTE_kb"], row["RssAnon_kb"] = now.get("VmPTE_kb"), now.get("RssAnon_kb")
            print(json.dumps(row))
        print(f"# loadavg {open('/proc/loadavg').read().split()[:3]}")
    finally:
        for p, _ in holders.values():
            p.kill()
            p.wait()
        for path in paths.values():
            os.unlink(path)
        os.rmdir(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
