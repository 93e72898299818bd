"""What one residency sample of every expert slice costs (docs/experts.md).

Reads no tensor data: cachestat (or mincore) only, so it can run beside an engine or a
benchmark that uses the model.  Prints per-pass wall and CPU time, syscalls per pass (counted
by strace -c -f in a second run when strace is there), the model's residency, and one JSON line.

    python tools/expert_sample_cost.py MODEL [--passes 20] [--max-slices N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from warmpool import _platform
from warmpool._experts.ranking import Ranker
from warmpool._experts.slices import expert_slices
from warmpool._gguf.layout import read_layout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--max-slices", type=int, default=None)
    ap.add_argument("--no-strace", action="store_true")
    args = ap.parse_args()
    layout = read_layout(args.model)
    slices = expert_slices(layout)
    fds = [os.open(f.path, os.O_RDONLY) for f in layout.files]
    ranker = Ranker(slices, max_slices=args.max_slices)
    walls, cpus = [], []
    for _ in range(args.passes):
        t = time.perf_counter()
        ranker.sample(fds)
        walls.append(time.perf_counter() - t)
        cpus.append(ranker.last_pass_seconds)
    resident = sum(_platform.cached_bytes(fd, 0, 0) or 0 for fd in fds) / sum(f.size for f in layout.files)
    per_pass = min(ranker.max_slices, len(slices))
    # The ranges the ranker asks about (its largest slice per expert, more for tiny slices).
    ranges = sum(len(r) for r in ranker._ranges.values()) * per_pass // max(len(slices), 1)
    syscalls = None
    if not args.no_strace and shutil.which("strace"):
        import tempfile

        with tempfile.NamedTemporaryFile("r", suffix=".strace") as log:
            subprocess.run(["strace", "-f", "-o", log.name, sys.executable, __file__, args.model, "--passes", "10",
                            "--no-strace"] + (["--max-slices", str(args.max_slices)] if args.max_slices else []),
                           capture_output=True, check=True)
            counts = {"cachestat": 0, "mincore": 0}
            for line in log:
                # strace < 6.3 (strace -c too) does not know cachestat by name: syscall 451 = 0x1c3.
                call = line.split(maxsplit=1)[-1]
                if call.startswith(("cachestat(", "syscall_0x1c3(")):
                    counts["cachestat"] += 1
                elif call.startswith("mincore("):
                    counts["mincore"] += 1
        # per pass; the interpreter's start-up (imports, the layout walk) makes none of these.
        syscalls = {k: v / 10 for k, v in counts.items()}
    result = dict(model=args.model, slices=len(slices), slices_per_pass=per_pass, ranges_per_pass=ranges,
                  method=ranker.method, resident_fraction=round(resident, 4),
                  wall_ms_median=round(statistics.median(walls) * 1e3, 2), cpu_ms_median=round(statistics.median(cpus) * 1e3, 2),
                  wall_ms_max=round(max(walls) * 1e3, 2), syscalls_per_pass=syscalls)
    if args.no_strace:
        return
    print(f"{len(slices)} slices, {per_pass} per pass ({ranges} ranges), {ranker.method}, model {resident:.1%} resident")
    print(f"per pass: wall median {result['wall_ms_median']} ms (max {result['wall_ms_max']}), CPU median {result['cpu_ms_median']} ms")
    print(f"syscalls per pass (strace -f, 10 passes): {syscalls}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
